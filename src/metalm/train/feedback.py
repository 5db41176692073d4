"""Feedback for adaptive samplers, computed by the loop so samplers stay free of model code:
the encoder's gradient norm after a step, and every task's loss on a fixed validation batch
(the MOMETAS meta-test)."""

from __future__ import annotations

from typing import Mapping

import torch

from metalm.data.batching import to_device


def encoder_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the gradients on the shared encoder's parameters (before clipping)."""
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def validation_split(task) -> str:
    """A task's held-out split: ``validation`` (corpus objectives), else ``selection`` (a target's rows
    held out of a stage's cell), else its first eval split, else train."""
    for split in ("validation", "selection", *task.spec.eval_splits):
        if split in task.splits and task.size(split) > 0:
            return split
    return "train"


@torch.no_grad()
def validation_losses(model: torch.nn.Module, tasks: Mapping, *, batch_size: int) -> dict[str, float]:
    """Each task's loss on the first ``batch_size`` rows of its held-out split, in eval mode.

    The same rows (and, for corpus objectives, the same corruption) every time, so successive
    meta-tests differ only by the model. Leaves the model in train mode.
    """
    device = next(model.parameters()).device
    model.eval()
    try:
        losses = {}
        for name, task in tasks.items():
            split = validation_split(task)
            rows = list(range(min(batch_size, task.size(split))))
            losses[name] = float(model.loss(name, to_device(task.batch(split, rows), device)))
        return losses
    finally:
        model.train()
