"""Masked language modelling (BERT) and entity-guided masking (EMLM, Xiong et al. 2020).

Both return the corrupted ids and labels that hold the original id at each prediction
position and ``IGNORE_INDEX`` elsewhere; the MLM head only projects the labelled positions.
"""

from __future__ import annotations

import torch

from metalm.data.tokenize import IGNORE_INDEX


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, *, mask_id: int, random_ids: torch.Tensor,
                generator: torch.Generator, mask_prob: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1, word_starts: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each maskable token (or whole word) is chosen with ``mask_prob``; a chosen
    token becomes [MASK] with ``mask_fraction``, a random token with ``random_fraction``, else stays.

    Args:
        input_ids: (B, T) token ids.
        maskable: (B, T) bool, False at special tokens and padding.
        mask_id: the [MASK] id.
        random_ids: (R,) ids random replacements are drawn from (no special tokens).
        generator: the CPU generator every draw uses.
        word_starts: (B, T) bool, True where a word begins: whole-word masking chooses words and
            masks all their pieces. None: tokens are chosen independently.

    Returns:
        (corrupted ids (B, T), labels (B, T) with IGNORE_INDEX where nothing is predicted).
    """
    shape = input_ids.shape
    chosen = torch.rand(shape, generator=generator) < mask_prob  # (B, T)
    if word_starts is not None:
        # Every position takes the draw of its word's first piece.
        positions = torch.arange(shape[1]).expand(shape)  # (B, T)
        start_of_word = torch.where(word_starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        chosen = chosen.gather(1, start_of_word)
    chosen &= maskable
    action = torch.rand(shape, generator=generator)  # (B, T): which of the three corruptions
    to_mask = chosen & (action < mask_fraction)
    to_random = chosen & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    picks = random_ids[torch.randint(len(random_ids), shape, generator=generator)]  # (B, T)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    corrupted = torch.where(to_random, picks, corrupted)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels


def mask_entities(input_ids: torch.Tensor, entity_ids: torch.Tensor, *, mask_id: int,
                  generator: torch.Generator, entity_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """EMLM: each entity (all of its pieces) is replaced by [MASK] with ``entity_prob`` (Wu §4.1).

    Args:
        input_ids: (B, T) token ids.
        entity_ids: (B, T) ints, 0 outside entities, k > 0 for the pieces of the row's k-th entity.

    Returns:
        (corrupted ids (B, T), labels (B, T) with IGNORE_INDEX outside masked entities).
    """
    most = int(entity_ids.max()) if entity_ids.numel() else 0
    draws = torch.rand((input_ids.shape[0], most + 1), generator=generator) < entity_prob  # (B, E+1)
    draws[:, 0] = False  # 0 is "no entity"
    chosen = draws.gather(1, entity_ids.long())  # (B, T)
    corrupted = torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels
