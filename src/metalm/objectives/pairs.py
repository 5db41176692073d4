"""Sentence-pair objectives: next-sentence prediction (NSP, BERT) and sentence-order
prediction (SOP, ALBERT)."""

from __future__ import annotations

from typing import Sequence

import torch


def next_sentence_pairs(firsts: Sequence[int], nexts: Sequence[int], *, num_sentences: int,
                        generator: torch.Generator, real_prob: float = 0.5) -> tuple[list[int], list[int]]:
    """NSP: each first sentence keeps its real next sentence with ``real_prob``, else gets a
    random sentence of the corpus (never the real next one).

    Args:
        firsts: sentence indices of the first segments.
        nexts: the index of each one's real next sentence.
        num_sentences: sentences to draw random ones from.

    Returns:
        (second sentence indices, labels): label 1 = the real next sentence, 0 = random.
    """
    real = (torch.rand(len(firsts), generator=generator) < real_prob).tolist()
    randoms = torch.randint(num_sentences - 1, (len(firsts),), generator=generator).tolist()
    seconds = []
    for nxt, keep, r in zip(nexts, real, randoms):
        seconds.append(nxt if keep else (r if r < nxt else r + 1))  # skip the real next
    return seconds, [int(k) for k in real]


def sentence_order_pairs(firsts: Sequence[int], nexts: Sequence[int], *, generator: torch.Generator,
                         swap_prob: float = 0.5) -> tuple[list[tuple[int, int]], list[int]]:
    """SOP: two consecutive sentences, swapped with ``swap_prob``.

    Returns:
        ((a, b) sentence index pairs, labels): label 1 = original order, 0 = swapped.
    """
    swap = (torch.rand(len(firsts), generator=generator) < swap_prob).tolist()
    pairs = [(b, a) if s else (a, b) for a, b, s in zip(firsts, nexts, swap)]
    return pairs, [int(not s) for s in swap]
