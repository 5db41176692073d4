"""Reptile (Nichol et al., 2018), as in Dou et al. (2019) §2.3.

Each episode runs k plain SGD steps from θ on its support batches (Eq. 1) to θ_i^(k); the
MetaUpdate moves θ towards the adapted weights:

    θ ← θ + β · mean_i (θ_i^(k) − θ)

Following the protocol that algorithms write gradients and the loop steps the optimiser,
Reptile writes the pseudo-gradient ``θ − mean_i θ_i^(k)``: an outer SGD step with learning
rate β is then exactly the update above. With AdamW as the outer optimiser (the loop's
default) the pseudo-gradient is rescaled per coordinate by Adam, as in common Reptile
implementations; clipping in the loop also applies to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from metalm.learn.functional import mean_losses, Params, accumulate_grads, adapt_with_losses, task_loss_fn, trainable_params
from metalm.learn.inner_optim import build_inner_optimizer, step_decay_lr, with_lr

if TYPE_CHECKING:  # only for annotations: algorithms.py imports this module to register it
    from metalm.learn.algorithms import Episode


def reptile_grads(model: nn.Module, episodes: Sequence[Episode], *, inner_lr: float,
                  inner_steps: int | None = None, inner_optimizer=None) -> tuple[Params, dict[str, float]]:
    """The Reptile pseudo-gradient ``θ − mean_i θ_i^(k)`` over a meta-batch.

    The inner loop differentiates detached views of the parameters (no graph to θ, no
    second derivatives, no copy of the model); ``model`` is not modified.

    Args:
        model: a ``MultiTaskModel``; its trainable parameters are θ.
        episodes: the meta-batch; each adapts on its ``support`` batches.
        inner_lr: the inner learning rate α of Eq. 1.
        inner_steps: k; None for one inner step per support batch.
        inner_optimizer: None for SGD at ``inner_lr``, or an ``inner_optim.InnerAdam`` (Xue's AdamW).

    Returns:
        (name -> pseudo-gradient, only for parameters some inner step changed;
        stats: ``loss`` the mean query loss after adaptation (for logging only; the query
        batch takes no part in the update), ``support_loss`` the mean loss on the first
        support batch, i.e. before adaptation).
    """
    if not episodes:
        raise ValueError("reptile_grads needs at least one episode")
    theta = {name: p.detach().requires_grad_(True) for name, p in trainable_params(model).items()}
    grads: Params = {}
    query_losses, support_losses = [], []
    for episode in episodes:
        loss_fn = task_loss_fn(model, episode.task)
        adapted, losses = adapt_with_losses(loss_fn, theta, episode.support, lr=inner_lr, first_order=True,
                                            steps=inner_steps, optimizer=inner_optimizer)
        with torch.no_grad():
            for name, p in adapted.items():
                if p is theta[name]:  # no inner step reached it (another task's head)
                    continue
                delta = (theta[name] - p) / len(episodes)  # same shape as the parameter
                grads[name] = delta if name not in grads else grads[name] + delta
            query_losses.append(loss_fn(adapted, episode.query))
        support_losses.extend(losses[:1])
    return grads, mean_losses(query_losses, support_losses)


class Reptile:
    """Reptile over a meta-batch of episodes.

    Args:
        inner_lr: the inner learning rate α (Dou et al. Eq. 1).
        inner_steps: k, the inner SGD steps per episode (one support batch each).
        task_inner_steps: task -> its own k (Xue, Table 1: sst 4, para 4, sts 8); others use ``inner_steps``.
        inner_optimizer: ``sgd`` or ``adam`` (AdamW with ``inner_weight_decay``; Xue's inner optimiser).
        inner_lr_decay, inner_lr_decay_every: the inner learning rate at meta step t is
            ``inner_lr · decay^⌊t / every⌋`` (Xue, Table 1: 0.8 every 30); ``at_step`` sets t.
    """

    def __init__(self, *, inner_lr: float = 1e-3, inner_steps: int = 5, task_inner_steps: dict | None = None,
                 inner_optimizer: str = "sgd", inner_betas: tuple[float, float] = (0.9, 0.999),
                 inner_eps: float = 1e-8, inner_weight_decay: float = 0.0, inner_lr_decay: float = 1.0,
                 inner_lr_decay_every: int = 0):
        if inner_lr < 0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1 (Reptile with no inner step has no update), got {inner_steps}")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.support_batches = inner_steps
        self.cross_task_support = False
        self.reduction = "mean"  # the meta-gradient is the mean over the meta-batch
        self.task_inner_steps = dict(task_inner_steps or {})
        self.inner_optimizer = build_inner_optimizer(inner_optimizer, lr=inner_lr, betas=inner_betas, eps=inner_eps,
                                                     weight_decay=inner_weight_decay)
        if not 0 < inner_lr_decay <= 1 or inner_lr_decay_every < 0:
            raise ValueError(f"inner_lr_decay must be in (0, 1] and inner_lr_decay_every >= 0, got "
                             f"{inner_lr_decay} and {inner_lr_decay_every}")
        self.base_inner_lr, self.inner_lr_decay, self.inner_lr_decay_every = inner_lr, inner_lr_decay, inner_lr_decay_every
        if any(k < 1 for k in self.task_inner_steps.values()):
            raise ValueError(f"task_inner_steps must be >= 1, got {self.task_inner_steps}")

    def support_steps(self, task: str) -> int:
        """A task's own k (``task_inner_steps``), else ``inner_steps``."""
        return self.task_inner_steps.get(task, self.inner_steps)

    def at_step(self, step: int) -> None:
        """Sets the inner learning rate for meta step ``step`` (0-based; called by the loop before each step)."""
        if not self.inner_lr_decay_every:
            return
        self.inner_lr = step_decay_lr(self.base_inner_lr, decay=self.inner_lr_decay,
                                      every=self.inner_lr_decay_every, step=step)
        self.inner_optimizer = with_lr(self.inner_optimizer, self.inner_lr)

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> dict[str, float]:
        """Adds ``θ − mean_i θ_i^(k)`` into ``.grad``; returns ``loss`` and ``support_loss``."""
        # One inner step per support batch: the loop draws each task's own number of batches.
        steps = None if self.task_inner_steps else self.inner_steps
        grads, stats = reptile_grads(model, episodes, inner_lr=self.inner_lr, inner_steps=steps,
                                     inner_optimizer=self.inner_optimizer)
        accumulate_grads(trainable_params(model), grads)
        return stats
