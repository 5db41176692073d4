"""A pre-training objective on a corpus, usable wherever a labelled ``Task`` is.

``load_objective`` reads and splits the corpus, tokenises each sentence once (and tags
entities for EMLM) through the content-keyed Arrow cache, and returns an ``ObjectiveTask``
whose ``batch(split, indices)`` applies the objective's corruption. The corruption is drawn
from a generator seeded by (seed, objective, split, indices), so batches are reproducible and
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from metalm.data.batching import Batch
from metalm.data.cache import cached_columns
from metalm.data.columns import row_lengths
from metalm.data.corpus import corpus_sentences
from metalm.data.tokenize import IGNORE_INDEX
from metalm.objectives.detection import delete_tokens, insert_tokens
from metalm.objectives.masking import mask_entities, mask_tokens
from metalm.objectives.pairs import next_sentence_pairs, sentence_order_pairs

Objective = Literal["mlm", "emlm", "nsp", "sop", "cse", "atd", "dtd", "mlm_nsp", "bilm"]
# Objective -> the head kind it trains (MultiTaskModel) and whether it needs sentence pairs.
HEAD_KINDS = {"mlm": "mlm", "emlm": "mlm", "cse": "contrastive", "atd": "token_classification",
              "dtd": "token_classification", "nsp": "pair_classification", "sop": "pair_classification",
              "mlm_nsp": "mlm_nsp", "bilm": "bilm"}
PAIRED = ("nsp", "sop", "mlm_nsp")


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the training code reads of a task's spec."""

    name: str
    kind: str
    num_labels: int
    objective: str
    eval_splits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Vocabulary:
    """The token ids corruptions need."""

    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    size: int
    random_ids: torch.Tensor
    """(R,) ids random replacements draw from: the vocabulary without special or [unused] tokens."""
    continuation: torch.Tensor
    """(V,) bool: True for word pieces that continue a word (``##...``)."""

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary":
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        regular = [i for i, t in enumerate(tokens) if i not in special and not (t.startswith("[") and t.endswith("]"))]
        return cls(cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id or 0,
                   mask_id=tokenizer.mask_token_id, size=len(tokenizer), random_ids=torch.tensor(regular),
                   continuation=torch.tensor([t.startswith("##") for t in tokens]))


class ObjectiveTask:
    """An objective bound to a tokenised corpus (``train`` and ``validation`` splits).

    Args:
        name: the task (and head) name.
        objective: mlm, emlm, nsp, sop, cse, atd or dtd.
        splits: split -> columns ``ids`` (word pieces per sentence, no special tokens), ``next``
            (index of the next sentence of the same document, or -1) and, for EMLM, ``entities``.
        vocab: special ids and random-replacement ids.
        seed: seeds every corruption.
        max_length: sequence length with special tokens.
        mask_prob: MLM masking rate; ATD insertion and DTD deletion rate.
        whole_word: MLM chooses whole words.
        all_mask: MLM replaces every chosen token by [MASK] (Wu §4.1), not BERT's 80/10/10.
        entity_prob: EMLM: the fraction of entities masked.
    """

    fingerprint = None  # corpus objectives are not checked on resume (the Task contract's optional fields)
    rows_read = None

    def __init__(self, *, name: str, objective: str, splits: dict[str, dict[str, list]], vocab: Vocabulary,
                 seed: int, max_length: int, mask_prob: float = 0.15, whole_word: bool = False,
                 entity_prob: float = 0.5, all_mask: bool = False):
        if objective not in HEAD_KINDS:
            raise ValueError(f"unknown objective {objective!r} (known: {', '.join(HEAD_KINDS)})")
        kind = HEAD_KINDS[objective]
        num_labels = {"mlm": vocab.size, "mlm_nsp": vocab.size, "bilm": vocab.size, "contrastive": 0}.get(kind, 2)
        self.spec = ObjectiveSpec(name=name, kind=kind, num_labels=num_labels, objective=objective)
        self.splits, self.vocab, self.seed, self.max_length = splits, vocab, seed, max_length
        self.mask_prob, self.whole_word, self.entity_prob = mask_prob, whole_word, entity_prob
        self.all_mask = all_mask
        # Pair objectives train on sentences that have a next sentence in their document.
        self.rows = {split: [i for i, n in enumerate(cols["next"]) if n >= 0] if objective in PAIRED
                     else list(range(len(cols["ids"]))) for split, cols in splits.items()}
        for split, rows in self.rows.items():
            if split == "train" and not rows:
                raise ValueError(f"objective {name}: the corpus has no usable {'sentence pairs' if objective in PAIRED else 'sentences'}")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def size(self, split: str = "train") -> int:
        return len(self.rows[split])

    def held_out_split(self) -> str:
        """The corpus's ``validation`` sentences (``train`` when the split left none)."""
        return "validation" if self.rows.get("validation") else "train"

    def lengths(self, split: str = "train") -> np.ndarray:
        """(rows,) tokens of every row's sequence with special tokens, before corruption (for
        length-grouped batches; pair objectives: the sentence and its next one)."""
        pieces = row_lengths(self.splits[split]["ids"])  # (sentences,)
        rows = np.asarray(self.rows[split], dtype=np.int64)
        if self.spec.objective in PAIRED:
            nexts = np.asarray(self.splits[split]["next"], dtype=np.int64)[rows]
            return np.minimum(pieces[rows] + pieces[nexts] + 3, self.max_length)
        return np.minimum(pieces[rows], self.max_length - 2) + 2

    def batch(self, split: str, indices: Sequence[int]) -> Batch:
        """The corrupted batch and its labels for rows ``indices`` of ``split``."""
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, self.name, split, indices))
        cols = self.splits[split]
        rows = [self.rows[split][i] for i in indices]
        objective, v = self.spec.objective, self.vocab
        if objective in PAIRED:
            nexts = [cols["next"][r] for r in rows]
            if objective in ("nsp", "mlm_nsp"):
                seconds, labels = next_sentence_pairs(rows, nexts, num_sentences=len(cols["ids"]),
                                                      generator=generator)
                pairs = list(zip(rows, seconds))
            else:
                pairs, labels = sentence_order_pairs(rows, nexts, generator=generator)
            seqs = [self._pair(cols["ids"][a], cols["ids"][b]) for a, b in pairs]
            if objective == "mlm_nsp":
                return self._mask_pairs(self._pad(seqs), torch.tensor(labels), generator)
            return {**self._pad(seqs), "labels": torch.tensor(labels)}
        sentences = [cols["ids"][r][:self.max_length - 2] for r in rows]
        if objective in ("atd", "dtd"):
            seqs, token_labels = [], []
            for ids in sentences:
                if objective == "atd":
                    ids, marks = insert_tokens(ids, random_ids=v.random_ids, generator=generator,
                                               insert_prob=self.mask_prob)
                    ids, marks = ids[:self.max_length - 2], marks[:self.max_length - 2] + [IGNORE_INDEX]
                else:
                    ids, marks = delete_tokens(ids, generator=generator, delete_prob=self.mask_prob)
                seqs.append(([v.cls_id] + ids + [v.sep_id], [0] * (len(ids) + 2)))
                token_labels.append([IGNORE_INDEX] + marks)
            batch = self._pad(seqs)
            return {**batch, "labels": _pad_rows(token_labels, batch["input_ids"].shape[1], IGNORE_INDEX)}
        batch = self._pad([([v.cls_id] + ids + [v.sep_id], [0] * (len(ids) + 2)) for ids in sentences])
        if objective == "cse":
            return {**batch, "labels": torch.arange(len(rows))}
        if objective == "bilm":  # ELMo: the sentence itself is the target, padding ignored
            return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)}
        ids = batch["input_ids"]  # (B, T)
        if objective == "emlm":
            entities = [[0] + cols["entities"][r][:self.max_length - 2] + [0] for r in rows]
            corrupted, labels = mask_entities(ids, _pad_rows(entities, ids.shape[1], 0), mask_id=v.mask_id,
                                              generator=generator, entity_prob=self.entity_prob)
        else:
            maskable = batch["attention_mask"].bool() & (ids != v.cls_id) & (ids != v.sep_id)  # (B, T)
            corrupted, labels = mask_tokens(ids, maskable, mask_id=v.mask_id, random_ids=v.random_ids,
                                            generator=generator, mask_prob=self.mask_prob,
                                            mask_fraction=1.0 if self.all_mask else 0.8,
                                            random_fraction=0.0 if self.all_mask else 0.1,
                                            word_starts=~v.continuation[ids] if self.whole_word else None)
        return {**batch, "input_ids": corrupted, "labels": labels}

    def _mask_pairs(self, batch: Batch, pair_labels: torch.Tensor, generator: torch.Generator) -> Batch:
        """BERT's batch: NSP pairs with MLM corruption; the (B,) NSP labels ride on the [CLS]
        column of the (B, T) MLM labels (``metalm.tasks.kinds.mlm_token_labels``)."""
        ids, v = batch["input_ids"], self.vocab  # (B, T)
        maskable = batch["attention_mask"].bool() & (ids != v.cls_id) & (ids != v.sep_id)  # (B, T)
        corrupted, labels = mask_tokens(ids, maskable, mask_id=v.mask_id, random_ids=v.random_ids,
                                        generator=generator, mask_prob=self.mask_prob,
                                        word_starts=~v.continuation[ids] if self.whole_word else None)
        labels[:, 0] = pair_labels
        return {**batch, "input_ids": corrupted, "labels": labels}

    def _pair(self, a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        budget = self.max_length - 3
        while len(a) + len(b) > budget:  # longest first, as BERT
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        v = self.vocab
        return [v.cls_id] + a + [v.sep_id] + b + [v.sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1)

    def _pad(self, seqs: list[tuple[list[int], list[int]]]) -> Batch:
        longest = max(len(ids) for ids, _ in seqs)
        return {"input_ids": _pad_rows([ids for ids, _ in seqs], longest, self.vocab.pad_id),  # (B, T)
                "attention_mask": _pad_rows([[1] * len(ids) for ids, _ in seqs], longest, 0),
                "token_type_ids": _pad_rows([types for _, types in seqs], longest, 0)}


def _pad_rows(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows])  # (B, length)


def _batch_seed(seed: int, name: str, split: str, indices: Sequence[int]) -> int:
    text = json.dumps([seed, name, split, list(map(int, indices))])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def tokenise_corpus(documents: dict[str, list[list[str]]], tokenizer, *, max_length: int, entities: bool,
                    cache_dir=None, tokenizer_id: str = "") -> dict[str, dict[str, list]]:
    """Columns per split: ``ids``, ``next`` and (with ``entities``) ``entities``, cached by content."""
    out = {}
    for split, docs in documents.items():
        sentences = [s for doc in docs for s in doc]
        nexts, start = [], 0
        for doc in docs:
            nexts.extend(start + j + 1 if j + 1 < len(doc) else -1 for j in range(len(doc)))
            start += len(doc)
        digest = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
        key = {"corpus": digest, "tokenizer": tokenizer_id, "max_length": max_length, "entities": entities}
        if entities:
            from metalm.objectives.entities import tagger_version
            key["tagger"] = tagger_version()

        def build(sentences=sentences, nexts=nexts):
            if not sentences:
                return {"ids": [], "next": [], **({"entities": []} if entities else {})}
            enc = tokenizer(sentences, add_special_tokens=False, truncation=True, max_length=max_length - 2,
                            return_offsets_mapping=entities)
            columns = {"ids": enc["input_ids"], "next": nexts}
            if entities:
                from metalm.objectives.entities import entity_token_ids, tag_entities
                spans = tag_entities(sentences)
                columns["entities"] = [entity_token_ids(o, s) for o, s in zip(enc["offset_mapping"], spans)]
            return columns

        out[split] = cached_columns(key, build, cache_dir) if sentences else build()
    return out


@functools.lru_cache(maxsize=8)
def _read_corpus_cached(paths: tuple[str, ...], format: str, seed: int, validation_fraction: float,
                        max_documents: int | None, max_sentences: int | None, min_chars: int):
    return corpus_sentences(paths, format=format, seed=seed, validation_fraction=validation_fraction,
                            max_documents=max_documents, max_sentences=max_sentences, min_chars=min_chars)


def load_objective(objective: str, tokenizer, *, name: str | None = None, paths: Sequence[str],
                   format: str = "auto", seed: int = 0, validation_fraction: float = 0.05,
                   max_documents: int | None = None, max_sentences: int | None = None, min_chars: int = 20,
                   max_length: int = 128, cache_dir=None, tokenizer_id: str = "", mask_prob: float = 0.15,
                   whole_word: bool = False, entity_prob: float = 0.5, all_mask: bool = False) -> ObjectiveTask:
    """Reads the corpus (``metalm.data.corpus.corpus_sentences``) and binds ``objective`` to it."""
    docs = _read_corpus_cached(tuple(map(str, paths)), format, seed, validation_fraction, max_documents,
                               max_sentences, min_chars)
    splits = tokenise_corpus(docs, tokenizer, max_length=max_length, entities=objective == "emlm",
                             cache_dir=cache_dir, tokenizer_id=tokenizer_id)
    return ObjectiveTask(name=name or objective, objective=objective, splits=splits, vocab=Vocabulary.of(tokenizer),
                         seed=seed, max_length=max_length, mask_prob=mask_prob, whole_word=whole_word,
                         entity_prob=entity_prob, all_mask=all_mask)
