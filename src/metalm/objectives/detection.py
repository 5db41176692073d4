"""Token detection objectives (Wu et al. 2022 §4.1): added-token detection (ATD) and
deleted-token detection (DTD). Both work on unpadded id lists, since they change lengths."""

from __future__ import annotations

from typing import Sequence

import torch


def insert_tokens(ids: Sequence[int], *, random_ids: torch.Tensor, generator: torch.Generator,
                  insert_prob: float = 0.15) -> tuple[list[int], list[int]]:
    """ATD: before each token, a random token is inserted with ``insert_prob``.

    Returns:
        (new ids, labels): label 1 at inserted tokens, 0 at original ones.
    """
    inserted = (torch.rand(len(ids), generator=generator) < insert_prob).tolist()
    picks = random_ids[torch.randint(len(random_ids), (len(ids),), generator=generator)].tolist()
    out, labels = [], []
    for token, add, pick in zip(ids, inserted, picks):
        if add:
            out.append(pick)
            labels.append(1)
        out.append(token)
        labels.append(0)
    return out, labels


def delete_tokens(ids: Sequence[int], *, generator: torch.Generator,
                  delete_prob: float = 0.15) -> tuple[list[int], list[int]]:
    """DTD: each token is deleted with ``delete_prob`` (at least one token is kept).

    Returns:
        (kept ids, gaps): ``gaps[i]`` is 1 when one or more tokens were deleted right before kept
        token ``i``, and ``gaps`` has one extra final entry for deletions at the end (the
        position of the closing [SEP] once special tokens are added).
    """
    deleted = (torch.rand(len(ids), generator=generator) < delete_prob).tolist()
    if ids and all(deleted):
        deleted[0] = False
    kept, gaps, pending = [], [], 0
    for token, drop in zip(ids, deleted):
        if drop:
            pending = 1
            continue
        kept.append(token)
        gaps.append(pending)
        pending = 0
    gaps.append(pending)
    return kept, gaps
