"""Shen's teacher and student as Hugging Face masked LMs.

``hf_encoder`` wraps any masked LM (``AutoModelForMaskedLM``: BERT, RoBERTa, DistilBERT, ...) so
it answers like ``teacher/model.py``'s ``Encoder``: ``forward(tokens, keep) -> {head: logits}``.
The objective (``objective.py``) and the algorithm (``algorithm.py``) then run on it unchanged.

The heads: ``output`` is the masked LM's own head (its logits). Any other name, such as the
teacher's ``input`` head that writes x̂, is a new linear layer from the model's last hidden state
(the last entry of ``hidden_states``) to the vocabulary, like the heads of ``Encoder``.

Ids go in as ``input_ids``; token distributions (soft labels, (B, T, V)) go in as
``inputs_embeds = distribution @ W``, with W the model's word-embedding matrix, so a gradient
reaches whoever wrote the distribution. For one-hot rows this equals the lookup in any model whose
word embedding is a plain table (BERT, RoBERTa, DistilBERT); a model that scales or otherwise
transforms its embeddings inside the lookup would need its own mapping.

Soft labels differentiate through the student's gradient (a second derivative), so build the
models with ``attn_implementation="eager"``: the written-out attention supports double backward.
The wrapper holds the model as a submodule, so ``torch.func.functional_call`` with its
``named_parameters()`` (tied word and output embeddings appear once) substitutes every weight.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

OUTPUT = "output"  # the masked LM's own head


class HFEncoder(nn.Module):
    """A Hugging Face masked LM with extra linear heads, called as ``(tokens, keep) -> {head: logits}``.

    Args:
        model: a masked LM (``logits`` (B, T, V) in its output, ``get_input_embeddings()``).
        heads: nn.Linear per extra head name (not ``output``), hidden size -> vocabulary.
        names: every head to return, in order.
    """

    def __init__(self, model: nn.Module, heads: dict[str, nn.Linear], names: Sequence[str]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)
        self.names = tuple(names)

    def forward(self, tokens: Tensor, keep: Tensor) -> dict[str, Tensor]:
        """
        Args:
            tokens: ids (B, T) int64, or token distributions (B, T, V) (soft labels).
            keep: (B, T) bool, False at padding (never attended to).

        Returns:
            head name -> logits (B, T, V).
        """
        mask = keep.to(torch.long)
        want_hidden = len(self.heads) > 0
        if tokens.dtype.is_floating_point:
            table = self.model.get_input_embeddings().weight  # (V, C)
            out = self.model(inputs_embeds=tokens @ table, attention_mask=mask, output_hidden_states=want_hidden)
        else:
            out = self.model(input_ids=tokens, attention_mask=mask, output_hidden_states=want_hidden)
        logits = {}
        for name in self.names:
            if name == OUTPUT:
                logits[name] = out.logits  # (B, T, V)
            else:
                logits[name] = self.heads[name](out.hidden_states[-1])  # (B, T, C) -> (B, T, V)
        return logits


def hf_encoder(model: nn.Module, heads: Sequence[str] = (OUTPUT,)) -> HFEncoder:
    """``model`` (a Hugging Face masked LM) with the interface of ``teacher.model.Encoder``.

    Args:
        model: e.g. ``BertForMaskedLM(config)``; its dtype and device are kept.
        heads: the heads to return. ``output`` is the model's own LM head; every other name
            (the teacher's ``input``) is a new linear layer over the last hidden state,
            weights drawn from N(0, ``config.initializer_range``, default 0.02), bias 0.

    Returns:
        an ``nn.Module``: ``forward(tokens, keep) -> {head: logits (B, T, V)}``.
    """
    names = tuple(heads)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"heads must be distinct names, at least one; got {names}")
    table = model.get_input_embeddings().weight  # (V, C)
    vocab, hidden = table.shape
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    extra = {}
    for name in names:
        if name == OUTPUT:
            continue
        head = nn.Linear(hidden, vocab, dtype=table.dtype, device=table.device)
        nn.init.normal_(head.weight, mean=0.0, std=std)
        nn.init.zeros_(head.bias)
        extra[name] = head
    return HFEncoder(model, extra, names)


def hf_teacher_and_student(teacher: nn.Module, student: nn.Module) -> tuple[HFEncoder, HFEncoder]:
    """Two masked LMs as Shen's pair: the teacher with ``input`` and ``output`` heads, the student
    with ``output`` only (as ``teacher.model.teacher_and_student``)."""
    return hf_encoder(teacher, ("input", OUTPUT)), hf_encoder(student, (OUTPUT,))
