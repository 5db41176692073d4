"""Tokenising records once, into columns that an Arrow dataset caches.

Sentence tasks keep ``input_ids`` (+ ``token_type_ids``) and one label; token tasks label
the first sub-word of every word and ``IGNORE_INDEX`` elsewhere.
"""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from metalm.data.readers import Record

IGNORE_INDEX = -100  # token positions without a label (sub-word continuations, special tokens, padding)
CHUNK = 2048


def tokenize_records(records: Sequence[Record], tokenizer, *, max_length: int, token_level: bool,
                     desc: str = "tokenise", separate_pair: bool = False) -> dict[str, list]:
    """Columns ``input_ids``, ``token_type_ids`` (when the tokenizer has them) and ``labels``; with
    ``separate_pair`` (bi-encoders) ``text_b`` is encoded on its own into ``input_ids_b`` (and
    ``token_type_ids_b``) instead of after ``text_a``."""
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    starts = range(0, len(records), CHUNK)
    for start in tqdm(starts, desc=desc, disable=len(records) < 4 * CHUNK or None, leave=False):
        chunk = records[start:start + CHUNK]
        if token_level:
            enc = tokenizer([r["tokens"] for r in chunk], is_split_into_words=True, truncation=True,
                            max_length=max_length)
            for i, record in enumerate(chunk):
                columns["labels"].append(_word_labels(enc.word_ids(i), record["tags"]))
        else:
            first = [r["text_a"] for r in chunk]
            second = [r["text_b"] for r in chunk] if "text_b" in chunk[0] else None
            if separate_pair and second is not None:
                enc_b = tokenizer(second, truncation=True, max_length=max_length)
                columns.setdefault("input_ids_b", []).extend(enc_b["input_ids"])
                if "token_type_ids" in enc_b:
                    columns.setdefault("token_type_ids_b", []).extend(enc_b["token_type_ids"])
                second = None
            enc = tokenizer(first, second, truncation=True, max_length=max_length)
            columns["labels"].extend(r["label"] for r in chunk)
        columns["input_ids"].extend(enc["input_ids"])
        if "token_type_ids" in enc:
            columns.setdefault("token_type_ids", []).extend(enc["token_type_ids"])
    return columns


def _word_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    labels, previous = [], None
    for word in word_ids:
        labels.append(tags[word] if word is not None and word != previous else IGNORE_INDEX)
        previous = word
    return labels
