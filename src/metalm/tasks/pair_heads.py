"""Heads that read two pooled embeddings (bi-encoders) and Xue's 2-layer MLP.

Xue §4.1: every text is mean-pooled (here: the encoder's pooling); the paraphrase head
concatenates the two pooled vectors and applies two linear layers with a GELU between; the STS
head projects each vector with one linear layer and predicts ``5 · relu(cos(W u, W v))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sentence_head(in_size: int, out_size: int, *, mlp: bool, dropout: float = 0.1) -> nn.Module:
    """Dropout + linear, or with ``mlp`` dropout + Linear(in, in) + GELU + Linear(in, out)."""
    if not mlp:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_size, out_size))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_size, in_size), nn.GELU(), nn.Linear(in_size, out_size))


class PairClassificationHead(nn.Module):
    """Logits (B, C) from the concatenated pooled embeddings [u, v] of a pair's two texts."""

    def __init__(self, hidden_size: int, num_labels: int, *, mlp: bool, dropout: float = 0.1):
        super().__init__()
        self.body = sentence_head(2 * hidden_size, num_labels, mlp=mlp, dropout=dropout)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([u, v], dim=-1))  # (B, 2H) -> (B, C)


class CosineRegressionHead(nn.Module):
    """``scale · relu(cos(W u + b, W v + b))``: (B,) scores in [0, scale] (Xue's STS head, scale 5)."""

    def __init__(self, hidden_size: int, *, scale: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.scale = scale

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(self.proj(u), self.proj(v), dim=-1)  # (B,)
        return self.scale * torch.relu(cos)
