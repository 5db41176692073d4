"""MAML and first-order MAML (Finn et al., 2017), as in Dou et al. (2019) §2.3.

For each episode (task i) the meta-parameters θ are adapted on the support batches by k SGD
steps (Eq. 1, ``adapt``) and the adapted θ_i^(k) are scored on a different batch, the query.
The meta-gradient is the mean over the meta-batch of

    MAML:    ∇_θ L_i(f_{θ_i^(k)})          (backpropagated through the k inner steps)
    FOMAML:  ∇_{θ_i^(k)} L_i(f_{θ_i^(k)})  (the inner steps' Jacobians replaced by I)

Dou et al. write the MetaUpdate with a sum over tasks; the mean differs only by a constant
factor on β (and none at all under Adam). The training loop's optimiser applies it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from metalm.learn.functional import (mean_losses, Params, accumulate_grads, adapt_with_losses, episode_vocabulary,
                                    task_loss_fn, trainable_params)
from metalm.learn.inner_optim import build_inner_optimizer

if TYPE_CHECKING:  # only for annotations: algorithms.py imports this module to register it
    from metalm.learn.algorithms import Episode

log = logging.getLogger(__name__)


def ensure_double_backward_attention(model: nn.Module) -> None:
    """Switches a Hugging Face encoder to ``eager`` attention, which second-order MAML needs.

    Fused SDPA kernels have no double backward: on CPU torch dispatches
    ``_scaled_dot_product_flash_attention_for_cpu`` (its backward is not differentiable,
    even in float64), and on CUDA the flash / memory-efficient kernels are likewise
    first-order only. ``eager`` attention is plain matmul + softmax and gives exact second
    derivatives. The switch is persistent (and numerically equivalent); it is logged.
    """
    encoder = getattr(model, "encoder", model)
    config = getattr(encoder, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current is None or current == "eager":
        return
    if not hasattr(encoder, "set_attn_implementation"):
        log.warning("second-order MAML: cannot switch attention %r to 'eager'; SDPA runs on its math backend",
                    current)
        return
    encoder.set_attn_implementation("eager")
    log.info("second-order MAML: switched the encoder's attention from %r to 'eager' "
             "(fused SDPA kernels have no double backward on CPU or CUDA)", current)


def _second_order_context(first_order: bool):
    """Restricts any remaining SDPA call to the math backend, which supports double backward."""
    if first_order:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def maml_grads(model: nn.Module, episodes: Sequence[Episode], *, inner_lr: float, first_order: bool,
               inner_steps: int | None = None, recompute: bool = False,
               compact_vocabulary: bool = True, inner_optimizer=None) -> tuple[Params, dict[str, float]]:
    """The MAML (or FOMAML) meta-gradient, averaged over the episodes of a meta-batch.

    ``model`` is not modified (besides, for second order, the attention switch of
    ``ensure_double_backward_attention``); no copy of it is made.

    Args:
        model: a ``MultiTaskModel``; its trainable parameters are θ.
        episodes: the meta-batch; each adapts on ``support`` and is scored on ``query``.
        inner_lr: the inner learning rate α of Eq. 1.
        first_order: FOMAML (True) or MAML with second derivatives (False).
        inner_steps: k; None for one inner step per support batch.
        recompute: second order only: recompute the inner steps in backward instead of keeping
            their activations (memory roughly flat in k, one more forward/backward per step).
        compact_vocabulary: run each episode on the word-embedding rows its batches use
            (``episode_vocabulary``; the same meta-gradient, less memory and time); it applies
            itself only where that is exact (not with inner weight decay, which moves unused rows).
        inner_optimizer: None for SGD at ``inner_lr``, or an ``inner_optim.InnerAdam``.

    Returns:
        (name -> mean meta-gradient, only for parameters some query loss reaches;
        stats: ``loss`` the mean query loss after adaptation, ``support_loss`` the mean
        loss on the first support batch, i.e. before adaptation, when there is one).
    """
    if not episodes:
        raise ValueError("maml_grads needs at least one episode")
    second_order = not first_order and inner_steps != 0 and any(e.support for e in episodes)
    if second_order:
        ensure_double_backward_attention(model)
    params = trainable_params(model)
    names = list(params)
    grads: Params = {}
    query_losses, support_losses = [], []
    with _second_order_context(not second_order):
        for episode in episodes:
            loss_fn = task_loss_fn(model, episode.task)
            inner_fns = [task_loss_fn(model, episode.support_task(i)) for i in range(len(episode.support))] \
                if episode.support_tasks else loss_fn
            inner_params, support, query = params, list(episode.support), episode.query
            if compact_vocabulary and getattr(inner_optimizer, "weight_decay", 0.0) == 0.0:
                tasks = [episode.task, *(episode.support_task(i) for i in range(len(support)))]
                inner_params, batches = episode_vocabulary(model, params, [*support, query], tasks)
                support, query = batches[:-1], batches[-1]
            adapted, losses = adapt_with_losses(inner_fns, inner_params, support, lr=inner_lr,
                                                first_order=first_order, steps=inner_steps, recompute=recompute,
                                                optimizer=inner_optimizer)
            query_loss = loss_fn(adapted, query)
            # second order: this backpropagates through every inner step to θ
            episode_grads = torch.autograd.grad(query_loss, [params[n] for n in names], allow_unused=True)
            for name, grad in zip(names, episode_grads):
                if grad is None:
                    continue
                grad = grad.detach().div_(len(episodes))  # in place: no second copy of the gradients
                if name in grads:
                    grads[name].add_(grad)
                else:
                    grads[name] = grad
            query_losses.append(query_loss.detach())
            support_losses.extend(losses[:1])
    return grads, mean_losses(query_losses, support_losses)


class MAML:
    """MAML over a meta-batch of episodes; ``first_order=True`` is FOMAML.

    Args:
        inner_lr: the inner learning rate α (Dou et al. Eq. 1).
        inner_steps: k, the inner SGD steps per episode (one support batch each).
        first_order: drop the second derivatives (FOMAML).
        cross_task: draw each support batch's task from the task distribution instead of
            the episode's task (Lv et al. 2020, Algorithm 1: meta-learning as pre-training).
        recompute_inner_steps: second order: trade compute for memory by recomputing the
            inner steps during the outer backward.
        inner_optimizer: ``sgd`` (Dou et al. Eq. 1) or ``adam`` (differentiable Adam, AdamW with
            ``inner_weight_decay``; ``metalm.learn.inner_optim``), with ``inner_betas``/``inner_eps``.
    """

    def __init__(self, *, inner_lr: float = 1e-3, inner_steps: int = 5, first_order: bool = False,
                 cross_task: bool = False, recompute_inner_steps: bool = False, inner_optimizer: str = "sgd",
                 inner_betas: tuple[float, float] = (0.9, 0.999), inner_eps: float = 1e-8,
                 inner_weight_decay: float = 0.0):
        if inner_lr < 0:
            raise ValueError(f"inner_lr must be >= 0, got {inner_lr}")
        if inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.support_batches = inner_steps
        self.cross_task_support = cross_task
        self.reduction = "mean"  # the meta-gradient is the mean over the meta-batch
        self.recompute_inner_steps = recompute_inner_steps
        self.inner_optimizer = build_inner_optimizer(inner_optimizer, lr=inner_lr, betas=inner_betas, eps=inner_eps,
                                                     weight_decay=inner_weight_decay, second_order=not first_order)
        if self.inner_optimizer is not None and recompute_inner_steps and not first_order:
            raise ValueError("recompute_inner_steps supports the SGD inner loop only (inner_optimizer: sgd)")

    def support_steps(self, task: str) -> int:
        return self.inner_steps

    def at_step(self, step: int) -> None:
        """No schedule of its own."""

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> dict[str, float]:
        """Adds the mean meta-gradient into ``.grad``; returns ``loss`` and ``support_loss``."""
        grads, stats = maml_grads(model, episodes, inner_lr=self.inner_lr, first_order=self.first_order,
                                  inner_steps=self.inner_steps, recompute=self.recompute_inner_steps,
                                  inner_optimizer=self.inner_optimizer)
        accumulate_grads(trainable_params(model), grads)
        return stats
