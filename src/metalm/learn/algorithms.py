"""Algorithms turn episodes into gradients on the model's parameters; the loop applies them.

An episode is one task's data for one meta-step: ``support`` batches (inner-loop data,
empty for plain multi-task training) and one ``query`` batch. Joint multi-task training
is the algorithm with no support batches: it backpropagates the query loss.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import nn

from metalm.data.batching import Batch
from metalm.learn.maml import MAML
from metalm.learn.reptile import Reptile


@dataclass(frozen=True)
class Episode:
    task: str
    support: tuple[Batch, ...]
    query: Batch


class Algorithm(Protocol):
    support_batches: int
    """How many support batches each episode needs."""

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> dict[str, float]:
        """Writes ``.grad`` on the parameters it trains; returns scalar statistics."""
        ...


class MultiTask:
    """Joint multi-task training: the mean query loss over the episodes, backpropagated."""

    support_batches = 0

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> dict[str, float]:
        total = 0.0
        for episode in episodes:
            loss = model.loss(episode.task, episode.query) / len(episodes)
            loss.backward()
            total += loss.item()
        return {"loss": total}


ALGORITHMS = {
    "multitask": MultiTask,
    "maml": MAML,
    "fomaml": functools.partial(MAML, first_order=True),
    "reptile": Reptile,
}


def build_algorithm(name: str, **settings) -> Algorithm:
    """The algorithm ``name`` with its keyword settings (e.g. ``inner_lr``, ``inner_steps``)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    known = inspect.signature(ALGORITHMS[name]).parameters
    unknown = [key for key in settings if key not in known]
    if unknown:
        raise ValueError(f"algorithm {name!r}: unknown setting(s) {', '.join(unknown)} "
                         f"(known: {', '.join(known) or 'none'})")
    return ALGORITHMS[name](**settings)
