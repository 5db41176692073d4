"""Optimisation as a sequence of groups: each group is some parameters with their own optimiser,
learning-rate schedule and gradient clipping (Shen's teacher and student are two groups; a plain
run is one).

A step of the training loop, written with these functions:

    for each micro-batch:  accumulate(params, grad_accum, lambda: algorithm.step(...))
    norms = clip_groups(groups)          # each group clipped by its own norm
    step_groups(groups)                  # each optimiser, then its scheduler
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class OptimGroup:
    """Parameters trained together: one optimiser over them, one scheduler of that optimiser, and
    the norm their gradients are clipped to (None or <= 0: measured, not clipped)."""

    name: str
    params: tuple[Tensor, ...]
    optimizer: torch.optim.Optimizer
    scheduler: object
    clip_norm: float | None = None


def zero_groups(groups: Sequence[OptimGroup]) -> None:
    """Drops every group's gradients (``.grad`` set to None)."""
    for group in groups:
        group.optimizer.zero_grad(set_to_none=True)
        for p in group.params:
            p.grad = None


def clip_norm(params: Sequence[Tensor], max_norm: float | None) -> float:
    """The total norm of the gradients of ``params`` before clipping (those without a gradient are
    left out), clipped to ``max_norm`` in place unless it is None or <= 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def clip_groups(groups: Sequence[OptimGroup]) -> dict[str, float]:
    """Clips each group's gradients by the group's own total norm; returns group name -> norm
    before clipping."""
    return {group.name: clip_norm(group.params, group.clip_norm) for group in groups}


def step_groups(groups: Sequence[OptimGroup]) -> None:
    """Each group's optimiser step, then its scheduler step, in group order."""
    for group in groups:
        group.optimizer.step()
        group.scheduler.step()


def apply_groups(groups: Sequence[OptimGroup]) -> dict[str, float]:
    """Clips, steps and zeroes every group; returns the norms of ``clip_groups``."""
    norms = clip_groups(groups)
    step_groups(groups)
    zero_groups(groups)
    return norms


def accumulate(params: Sequence[Tensor], count: int, compute: Callable[[], T]) -> T:
    """Runs ``compute`` (which writes ``.grad`` on ``params``) as one of ``count`` micro-batches:
    the gradients it writes are divided by ``count`` and added to those already there.

    The gradients present before are set aside while ``compute`` runs, so it sees ``.grad`` None
    and its own gradient is divided before it is added (the sum of g_i / count, in micro-batch order).
    """
    params = list(params)
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        out = compute()
    finally:
        for p, before in zip(params, held):
            fresh = p.grad
            if fresh is not None and count != 1:
                fresh = fresh / count
            if before is None:
                p.grad = fresh
            elif fresh is not None:
                p.grad = before.add_(fresh)
            else:
                p.grad = before
    return out


def single_group(params: Sequence[Tensor], optimizer: torch.optim.Optimizer, scheduler,
                 clip: float | None, name: str = "model") -> OptimGroup:
    """One group over ``params`` (the training loop's default: one optimiser for the whole model)."""
    return OptimGroup(name=name, params=tuple(params), optimizer=optimizer, scheduler=scheduler, clip_norm=clip)
