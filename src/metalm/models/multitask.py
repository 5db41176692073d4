"""One shared encoder with one head per task.

``forward(task, batch)`` runs the encoder, pools (sentence kinds) and applies the task's
head, so ``torch.func.functional_call(model, params, (task, batch))`` works unchanged for
the meta-learning algorithms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metalm.data.tokenize import IGNORE_INDEX
from metalm.objectives.heads import contrastive_logits
from metalm.tasks.kinds import is_token_level, make_head, mlm_token_labels, task_loss

HEADS_FILE, HEADS_META = "heads.safetensors", "heads.json"


class MultiTaskModel(nn.Module):
    """A shared encoder and a ``ModuleDict`` of task heads.

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state``.
        pooling: ``cls`` (first token) or ``mean`` (mean over non-padding tokens).
    """

    def __init__(self, encoder: nn.Module, *, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.heads = nn.ModuleDict()
        self.kinds: dict[str, str] = {}
        self.num_labels: dict[str, int] = {}
        self.head_options: dict[str, dict] = {}
        """Task -> {head, pair, cosine_scale} of heads other than a linear one over one sequence."""

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def add_task(self, name: str, kind: str, num_labels: int, *, head: str = "linear", pair: str = "cross",
                 cosine_scale: float = 5.0) -> None:
        """Adds a freshly initialised head (no-op if a head of the same shape exists).

        Args:
            head: ``linear`` or ``mlp`` (``kinds.make_head``).
            pair: ``cross`` (one sequence of both texts) or ``bi`` (each text encoded and pooled alone).
            cosine_scale: ``bi`` regression: predictions are ``cosine_scale · relu(cos)``.
        """
        options = {} if (head, pair) == ("linear", "cross") else {"head": head, "pair": pair,
                                                                   "cosine_scale": cosine_scale}
        if name in self.heads:
            if self.kinds[name] != kind or self.num_labels[name] != num_labels or self.head_options.get(name, {}) != options:
                raise ValueError(f"task {name}: a head of another kind/size exists")
            return
        self.heads[name] = make_head(kind, self.hidden_size, num_labels, head=head, pair=pair,
                                     cosine_scale=cosine_scale)
        self.kinds[name] = kind
        self.num_labels[name] = num_labels
        if options:
            self.head_options[name] = options

    def remove_task(self, name: str) -> None:
        del self.heads[name]
        self.kinds.pop(name)
        self.num_labels.pop(name)
        self.head_options.pop(name, None)

    def forward(self, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ``task``'s head: (B, C) per sentence or (B, T, C) per token; pre-training kinds:
        (N, V) at the N masked positions (``mlm``), (B, B) view similarities (``contrastive``)."""
        kind = self.kinds[task]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if kind == "contrastive":  # SimCSE: two dropout views of every sentence in one pass
            inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}  # (2B, T)
        if self.head_options.get(task, {}).get("pair") == "bi":  # siamese: each text alone, then the head
            second = {k: batch[f"{k}_b"] for k in ("input_ids", "attention_mask", "token_type_ids") if f"{k}_b" in batch}
            u = self._pool(self.encoder(**inputs).last_hidden_state, inputs["attention_mask"])  # (B, H)
            v = self._pool(self.encoder(**second).last_hidden_state, second["attention_mask"])  # (B, H)
            return self.heads[task](u, v)  # (B, C) or (B,)
        hidden = self.encoder(**inputs).last_hidden_state  # (B, T, H)
        if kind == "mlm":  # project only the masked positions onto the (tied) vocabulary
            masked = hidden[batch["labels"] != IGNORE_INDEX]  # (N, H)
            return self.heads[task](masked, self.encoder.get_input_embeddings().weight)  # (N, V)
        if kind == "bilm":  # ELMo's next/previous-token LM (metalm.models.bilstm)
            from metalm.models.bilstm import BiLSTMEncoder, bilm_logits
            if not isinstance(self.encoder, BiLSTMEncoder):  # a transformer sees the token it would predict
                raise ValueError(f"task {task}: objective bilm needs a biLSTM encoder (encoder.name: bilstm or bilstm-tiny)")
            return bilm_logits(hidden, self.encoder.get_input_embeddings().weight)  # (B, T-1, V) x 2
        if kind == "mlm_nsp":  # both heads on the same encoding: (N, V) masked tokens, (B, 2) pair
            heads = self.heads[task]
            masked = hidden[mlm_token_labels(batch["labels"]) != IGNORE_INDEX]  # (N, H)
            return (heads["mlm"](masked, self.encoder.get_input_embeddings().weight),
                    heads["pair"](self._pool(hidden, inputs["attention_mask"])))
        if not is_token_level(kind):
            hidden = self._pool(hidden, inputs["attention_mask"])  # (B, H)
        out = self.heads[task](hidden)
        if kind == "contrastive":
            return contrastive_logits(*out.chunk(2))  # (B, B)
        return out

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, H) pooled sentence vectors of the encoder alone (no head): zero-shot similarity."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return self._pool(self.encoder(**inputs).last_hidden_state, inputs["attention_mask"])

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def loss(self, task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(self.kinds[task], self(task, batch), batch["labels"])

    def save_pretrained(self, folder: str | Path, tokenizer=None) -> None:
        """Encoder in Hugging Face format (``folder/encoder``) plus the heads as safetensors."""
        folder = Path(folder)
        self.encoder.save_pretrained(folder / "encoder")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / "encoder")
        state = {k: v.contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(folder / HEADS_FILE))
        meta = {"pooling": self.pooling, "tasks": {n: {"kind": self.kinds[n], "num_labels": self.num_labels[n],
                                                        **self.head_options.get(n, {})} for n in self.heads}}
        (folder / HEADS_META).write_text(json.dumps(meta, indent=1))


def is_metalm_folder(path: str | Path) -> bool:
    return (Path(path) / HEADS_META).exists()


def load_heads(model: MultiTaskModel, folder: str | Path) -> None:
    """Adds the heads saved by ``save_pretrained`` to ``model`` (weights included)."""
    folder = Path(folder)
    meta = json.loads((folder / HEADS_META).read_text())
    for name, info in meta["tasks"].items():
        model.add_task(name, info["kind"], info["num_labels"], head=info.get("head", "linear"),
                       pair=info.get("pair", "cross"), cosine_scale=info.get("cosine_scale", 5.0))
    if meta["tasks"]:
        model.heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
