"""Heads of the pre-training objectives: the MLM head (tied to the word embeddings, as BERT)
and the contrastive (SimCSE) head and its in-batch similarity logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CSE_TEMPERATURE = 0.05  # SimCSE's τ


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the word embeddings (tied) and a bias.

    Args:
        hidden_size: H.
        vocab_size: V (the decoder bias).
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                       nn.LayerNorm(hidden_size, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden: (N, H) states at masked positions only; word_embeddings: (V, H). Returns (N, V)."""
        return self.transform(hidden) @ word_embeddings.T + self.bias


def contrastive_head(hidden_size: int) -> nn.Module:
    """SimCSE's MLP over the [CLS] vector during training."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh())


def contrastive_logits(first: torch.Tensor, second: torch.Tensor, *, temperature: float = CSE_TEMPERATURE
                       ) -> torch.Tensor:
    """Cosine similarities of every first view with every second view over τ: (B, B).

    With cross-entropy against ``arange(B)``, each sentence must pick its own second view
    (the diagonal) among the batch's other sentences (in-batch negatives, Gao et al. 2021 Eq. 1).
    """
    return F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).T / temperature  # (B, B)
