"""A small ELMo-style biLSTM language model (Peters et al., 2018), the from-scratch encoder of
Lv et al. (2020) §4.4: separate forward and backward LSTMs over shared token embeddings; the
forward state at position t predicts token t+1, the backward state token t-1, through one
softmax tied to the embeddings. Plain ``nn.LSTM`` modules, so the functional inner loop
(``torch.func.functional_call``) runs through it unchanged.

Double backward through ``nn.LSTM`` (second-order MAML) works on CPU and is checked against
finite differences (tests/test_bilstm.py). cuDNN's fused RNN kernels do not support double
backward; on a GPU, second-order steps would need ``torch.backends.cudnn.flags(enabled=False)``
around the step. Untested on GPU here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from metalm.tasks.kinds import IGNORE_INDEX


CONFIG_FILE, WEIGHTS_FILE = "bilstm.json", "bilstm.safetensors"
SIZES = {"bilstm-tiny": dict(direction_size=16, num_layers=1), "bilstm": dict(direction_size=128, num_layers=2)}
"""Named biLSTM sizes for ``encoder.name`` (random initialisation, from scratch)."""


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    """(B, T, H): forward and backward states concatenated, H = 2 × ``direction_size``."""


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first ``lengths[b]`` positions reversed, padding left in place (an involution).

    Args:
        x: (B, T, ...) values.
        lengths: (B,) valid positions per row.
    """
    t = torch.arange(x.shape[1], device=x.device)  # (T,)
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, T)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class BiLSTMEncoder(nn.Module):
    """Token embeddings, a forward and a backward LSTM stack and a projection to the embeddings.

    Args:
        vocab_size: tokenizer vocabulary size.
        direction_size: hidden size of each direction (the encoder's output is twice this).
        num_layers: LSTM layers per direction.
        dropout: dropout on embeddings and between layers.
    """

    def __init__(self, *, vocab_size: int, direction_size: int = 64, num_layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.settings = {"vocab_size": vocab_size, "direction_size": direction_size, "num_layers": num_layers,
                         "dropout": dropout}
        self.hidden_size = 2 * direction_size
        self.config = SimpleNamespace(hidden_size=self.hidden_size, **self.settings)  # what MultiTaskModel reads
        self.embeddings = nn.Embedding(vocab_size, direction_size)
        between = dropout if num_layers > 1 else 0.0
        self.forward_lstm = nn.LSTM(direction_size, direction_size, num_layers, batch_first=True, dropout=between)
        self.backward_lstm = nn.LSTM(direction_size, direction_size, num_layers, batch_first=True, dropout=between)
        self.dropout = nn.Dropout(dropout)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.settings, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dropout: float | None = None) -> "BiLSTMEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        settings = json.loads((folder / CONFIG_FILE).read_text())
        if dropout is not None:
            settings["dropout"] = dropout
        model = cls(**settings)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(1)  # (B,)
        x = self.dropout(self.embeddings(input_ids))  # (B, T, D)
        forward, _ = self.forward_lstm(x)  # (B, T, D); padding is at the end, after every valid state
        backward, _ = self.backward_lstm(reverse_padded(x, lengths))  # (B, T, D), right to left
        backward = reverse_padded(backward, lengths)
        return EncoderOutput(torch.cat([self.dropout(forward), self.dropout(backward)], dim=-1))  # (B, T, 2D)


def bilm_logits(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1, V) next-token logits of the forward states and previous-token logits of the
    backward states of (B, T, 2D) ``hidden``, through the (V, D) tied embeddings ``weight``."""
    forward, backward = hidden.chunk(2, dim=-1)  # (B, T, D) each
    return forward[:, :-1] @ weight.T, backward[:, 1:] @ weight.T


def bilm_task_loss(logits: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean of the next- and previous-token cross-entropies; ``labels`` (B, T) ids, IGNORE_INDEX at padding."""
    next_logits, previous_logits = logits
    next_loss = F.cross_entropy(next_logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    previous_loss = F.cross_entropy(previous_logits.flatten(0, 1), labels[:, :-1].flatten(),
                                    ignore_index=IGNORE_INDEX)
    return (next_loss + previous_loss) / 2


def bilm_loss(encoder: BiLSTMEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ELMo's objective: mean of the forward (next-token) and backward (previous-token)
    cross-entropies, softmax tied to the token embeddings.

    Args:
        input_ids: (B, T) token ids, padding at the end.
        attention_mask: (B, T) 1 at real tokens.
    """
    hidden = encoder(input_ids, attention_mask).last_hidden_state  # (B, T, 2D)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, T)
    return bilm_task_loss(bilm_logits(hidden, encoder.get_input_embeddings().weight), labels)
