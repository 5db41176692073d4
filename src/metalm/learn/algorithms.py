"""Algorithms turn episodes into gradients on the model's parameters; the loop applies them.

An episode is one task's data for one meta-step: ``support`` batches (inner-loop data,
empty for plain multi-task training) and one ``query`` batch. Joint multi-task training
is the algorithm with no support batches: it backpropagates the query loss.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

from torch import nn

from metalm.contracts import Algorithm, Episode, StepStats  # noqa: F401  (the contracts, re-exported)
from metalm.learn.maml import MAML
from metalm.learn.reptile import Reptile


class MultiTask:
    """Joint multi-task training: the mean (or, with ``reduction="sum"``, the sum) of the
    episodes' query losses, backpropagated. With one episode of every task per step (the loop's
    ``all_tasks``) this is Xue's Eq. 1 with λ_i = 1."""

    support_batches = 0
    cross_task_support = False

    def __init__(self, *, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected mean or sum, got {reduction!r}")
        self.reduction = reduction

    def support_steps(self, task: str) -> int:
        return 0

    def at_step(self, step: int) -> None:
        """No schedule of its own."""

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> StepStats:
        total = 0.0
        scale = len(episodes) if self.reduction == "mean" else 1
        for episode in episodes:
            loss = model.loss(episode.task, episode.query) / scale
            loss.backward()
            total += loss.item()
        return {"loss": total}


ALGORITHMS = {
    "multitask": MultiTask,
    "maml": MAML,
    "fomaml": functools.partial(MAML, first_order=True),
    "reptile": Reptile,
    # Lv et al. (2020) Algorithm 1: k inner steps on batches drawn from the task distribution
    # (possibly different tasks), then a meta-test step on a fresh batch; Eq. 4, or Eq. 5 with
    # first_order. k=0 is joint multi-task training.
    "metapretrain": functools.partial(MAML, cross_task=True),
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


def takes_setting(name: str, key: str) -> bool:
    """Whether algorithm ``name`` reads setting ``key`` (an alias's bound settings count as taken)."""
    factory = ALGORITHMS[name]
    return key in inspect.signature(factory).parameters or key in getattr(factory, "keywords", {})


def algorithm_settings(name: str, available: dict) -> dict:
    """The subset of ``available`` settings that algorithm ``name`` takes."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
    factory = ALGORITHMS[name]
    fixed = getattr(factory, "keywords", {})  # an alias such as fomaml binds first_order=True
    known = inspect.signature(factory).parameters
    return {k: v for k, v in available.items() if k in known and k not in fixed}
