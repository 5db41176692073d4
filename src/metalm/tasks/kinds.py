"""What each task kind needs from a model: a head, a loss and predictions.

Functions first: ``make_head``, ``task_loss`` and ``predict`` dispatch on the kind and are
what the model, the algorithms and evaluation call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalm.data.tokenize import IGNORE_INDEX  # token positions without a label


def make_head(kind: str, hidden_size: int, num_labels: int, *, dropout: float = 0.1, head: str = "linear",
              pair: str = "cross", cosine_scale: float = 5.0) -> nn.Module:
    """A dropout + linear head (``head="mlp"``: a 2-layer GELU MLP); sentence kinds read a pooled
    vector, token kinds every position; ``pair="bi"`` heads read two pooled vectors (u, v)."""
    if kind == "mlm":  # pre-training objectives (metalm.objectives): num_labels is the vocabulary size
        from metalm.objectives.heads import MaskedLMHead
        return MaskedLMHead(hidden_size, num_labels)
    if kind == "contrastive":
        from metalm.objectives.heads import contrastive_head
        return contrastive_head(hidden_size)
    if kind == "bilm":  # ELMo's LM: the softmax is tied to the biLSTM's embeddings, no own weights
        return nn.Identity()
    if kind == "mlm_nsp":  # BERT's summed step: an MLM head and a 2-way pair head on one batch
        from metalm.objectives.heads import MaskedLMHead
        return nn.ModuleDict({"mlm": MaskedLMHead(hidden_size, num_labels),
                              "pair": make_head("pair_classification", hidden_size, 2, dropout=dropout)})
    from metalm.tasks.pair_heads import CosineRegressionHead, PairClassificationHead, sentence_head
    if pair == "bi":
        if kind == "regression":
            return CosineRegressionHead(hidden_size, scale=cosine_scale)
        return PairClassificationHead(hidden_size, num_labels, mlp=head == "mlp", dropout=dropout)
    out = 1 if kind == "regression" else num_labels
    return sentence_head(hidden_size, out, mlp=head == "mlp", dropout=dropout)


def is_token_level(kind: str) -> bool:
    return kind == "token_classification"


def task_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification kinds, mean squared error for regression.

    Args:
        logits: (B, C) for sentence classification, (B,) or (B, 1) for regression,
            (B, T, C) for token classification.
        labels: (B,) class indices or scores, or (B, T) tag indices with IGNORE_INDEX.
            Pre-training kinds: ``mlm`` takes (N, V) logits of the N labelled positions of (B, T)
            labels; ``contrastive`` takes (B, B) similarity logits and labels ``arange(B)``.
    """
    if kind == "regression":
        return F.mse_loss(logits.reshape(-1), labels.to(logits.dtype))
    if kind == "bilm":  # ELMo: next-token and previous-token logits, (B, T-1, V) each
        from metalm.models.bilstm import bilm_task_loss
        return bilm_task_loss(logits, labels)
    if kind == "mlm_nsp":  # Lv et al. §4.2 / BERT: the sum of the two objectives' losses on one batch
        mlm_logits, pair_logits = logits  # (N, V), (B, 2)
        return (task_loss("mlm", mlm_logits, mlm_token_labels(labels))
                + task_loss("pair_classification", pair_logits, labels[:, 0]))
    if kind == "mlm":  # logits only at the labelled positions: (N, V)
        return F.cross_entropy(logits, labels[labels != IGNORE_INDEX])
    if kind == "token_classification":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels)


def mlm_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) MLM labels of an ``mlm_nsp`` batch: its NSP label rides on the [CLS] column, which
    MLM never labels, so one flat ``labels`` tensor carries both objectives."""
    tokens = labels.clone()
    tokens[:, 0] = IGNORE_INDEX
    return tokens


def predict(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """Scores (regression) or argmax class indices."""
    if kind == "regression":
        return logits.reshape(-1)
    return logits.argmax(dim=-1)
