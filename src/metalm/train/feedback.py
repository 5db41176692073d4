"""Feedback for adaptive samplers, computed by the loop so samplers stay free of model code:
the encoder's gradient norm after a step, and every task's loss on a sampled validation batch
(the MOMETAS meta-test)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from metalm.data.batching import to_device
from metalm.train.checkpoint import derived_seed


def encoder_grad_norm(model: torch.nn.Module) -> float:
    """L2 norm of the gradients on the shared encoder's parameters (before clipping)."""
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def validation_rows(size: int, batch_size: int, *, seed: int, step: int, task_index: int) -> list[int]:
    """The rows of one task's validation batch at the meta-test after ``step`` steps: ``batch_size``
    rows drawn without replacement from ``size``, from a generator seeded by (seed, step, task), so
    that each meta-test samples V afresh (Wu §3.4) and a resumed run draws the same rows."""
    rng = np.random.default_rng([seed, step, task_index])
    return sorted(int(i) for i in rng.choice(size, size=min(batch_size, size), replace=False))


@torch.no_grad()
def validation_losses(model: torch.nn.Module, tasks: Mapping, *, batch_size: int, seed: int = 0,
                      step: int = 0) -> dict[str, float]:
    """Each task's loss on ``batch_size`` sampled rows of its held-out split (``validation_rows``).

    The model stays in train mode: each objective is measured as it is trained (dropout on, so
    CSE compares two dropout views as SimCSE trains it; Wu §4.1). Dropout draws come from a forked
    RNG seeded by (seed, step): the meta-test neither consumes nor perturbs the training RNG
    stream, and a resumed run measures the same losses.
    """
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(seed, step))
        losses = {}
        for i, (name, task) in enumerate(tasks.items()):
            split = task.held_out_split()
            rows = validation_rows(task.size(split), batch_size, seed=seed, step=step, task_index=i)
            losses[name] = float(model.loss(name, to_device(task.batch(split, rows), device)))
        return losses
