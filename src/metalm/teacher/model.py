"""A small pre-LayerNorm Transformer encoder for the teacher and the student (Shen, §4.1).

Read top to bottom: embeddings -> blocks (LayerNorm at the start of each residual branch) ->
final LayerNorm -> one or more LM heads over the same vocabulary. The student has one head
(``output``); the teacher has two (``input`` writes x̂, ``output`` writes ŷ).

For soft labels (§3.3) the input may be a distribution over tokens instead of ids: the token
embedding is then applied as a linear map of the probabilities, ``probs @ W_emb``, which equals
the lookup for one-hot rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelSize:
    """Sizes of one encoder (their Table 4 by default)."""

    vocab_size: int
    n_layer: int = 2
    d_model: int = 8
    d_ff: int = 32
    n_head: int = 2
    max_positions: int = 34
    dropout: float = 0.1


class Block(nn.Module):
    """x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, size: ModelSize):
        super().__init__()
        d = size.d_model
        self.n_head = size.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, size.d_ff)
        self.fc_out = nn.Linear(size.d_ff, d)
        self.drop = nn.Dropout(size.dropout)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # Written out (not scaled_dot_product_attention) so double backward works everywhere.
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        att = att.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(dim=-1)
        att = self.drop(att)  # attention dropout
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class Encoder(nn.Module):
    """Token (or token-distribution) sequences -> logits per head.

    Args:
        size: the model sizes.
        heads: names of the LM heads, e.g. ``("output",)`` or ``("input", "output")``.
    """

    def __init__(self, size: ModelSize, *, heads: tuple[str, ...] = ("output",)):
        super().__init__()
        self.size = size
        self.wte = nn.Embedding(size.vocab_size, size.d_model)
        self.wpe = nn.Embedding(size.max_positions, size.d_model)
        self.drop = nn.Dropout(size.dropout)
        self.blocks = nn.ModuleList(Block(size) for _ in range(size.n_layer))
        self.ln_f = nn.LayerNorm(size.d_model)
        self.heads = nn.ModuleDict({name: nn.Linear(size.d_model, size.vocab_size) for name in heads})
        self.apply(_init)

    def forward(self, tokens: Tensor, keep: Tensor) -> dict[str, Tensor]:
        """
        Args:
            tokens: ids (B, T) int64, or token distributions (B, T, V) (soft labels).
            keep: (B, T) bool, False at padding (never attended to).

        Returns:
            head name -> logits (B, T, V).
        """
        T = tokens.shape[1]
        if T > self.size.max_positions:
            raise ValueError(f"sequence of {T} tokens is longer than max_positions={self.size.max_positions}")
        if tokens.dtype.is_floating_point:
            tok = tokens @ self.wte.weight  # (B, T, V) @ (V, C) -> (B, T, C)
        else:
            tok = self.wte(tokens)  # (B, T, C)
        pos = self.wpe(torch.arange(T, device=tok.device))  # (T, C)
        x = self.drop(tok + pos)
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_f(x)  # (B, T, C)
        return {name: head(x) for name, head in self.heads.items()}  # each (B, T, V)


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def teacher_and_student(size: ModelSize, *, seed: int) -> tuple[Encoder, Encoder]:
    """Same sizes, separate weights (§4.1): the teacher with input and output heads, the student with one."""
    torch.manual_seed(seed)
    teacher = Encoder(size, heads=("input", "output"))
    student = Encoder(size, heads=("output",))
    return teacher, student
