"""The functional core of the meta-learning algorithms: parameters in, parameters out.

The inner loop never mutates a module and never copies one. A task's loss is a pure function
of a parameter dict (``task_loss_fn``, via ``torch.func.functional_call``), and adaptation
(``adapt``) maps a parameter dict to a new one by plain SGD, Dou et al. (2019) Eq. 1:

    θ_i^(k) = θ_i^(k-1) − α ∇_θ L_i(f_{θ_i^(k-1)})

With ``first_order=False`` the new parameters stay differentiable functions of the old ones
(``create_graph=True``), so a loss at θ^(k) backpropagates to θ through every inner step
(second-order MAML). With ``first_order=True`` each inner gradient is detached, θ' = θ − α·g,
so that path is the identity and ∇_θ L(θ^(k)) = ∇_{θ^(k)} L(θ^(k)) (first-order MAML, Reptile).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from metalm.contracts import Batch, Params  # noqa: F401  (Params re-exported)
from metalm.tasks.kinds import task_loss
LossFn = Callable[[Params, Batch], Tensor]


def trainable_params(model: nn.Module) -> Params:
    """The parameters that get gradients, by name (tied weights appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _checkpointing(encoder) -> bool:
    """Whether Hugging Face activation (gradient) checkpointing is on, without deprecated names."""
    if encoder is None:
        return False
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(encoder), name):
            return bool(getattr(encoder, name))
    return False


def task_loss_fn(model: nn.Module, task: str) -> LossFn:
    """``loss(params, batch)``: ``task``'s loss with ``params`` substituted into ``model``.

    Names missing from ``params`` (frozen parameters) keep the module's own tensors; buffers
    always do. Weights tied in ``model`` stay tied (``functional_call``'s ``tie_weights``), so
    pass each tied tensor once, under the name ``named_parameters`` gives it.

    Args:
        model: a ``MultiTaskModel`` (``forward(task, batch)`` -> logits, ``kinds[task]``).
        task: the head to use.

    Returns:
        A function of (params, batch) returning a scalar loss tensor.
    """
    kind = model.kinds[task]
    if _checkpointing(getattr(model, "encoder", None)):
        # Its recomputation runs in backward, after functional_call has put the module's own
        # weights back, so gradients at adapted parameters come out wrong (measured: errors of
        # order 10 on a tiny BERT). Refuse rather than train on wrong meta-gradients.
        raise ValueError("the encoder has Hugging Face gradient checkpointing enabled, which gives wrong "
                         "gradients under torch.func.functional_call; disable it for meta-learning")

    def loss(params: Params, batch: Batch) -> Tensor:
        state = {**dict(model.named_buffers()), **params}
        logits = torch.func.functional_call(model, state, (task, batch))  # (B, C) or (B, T, C)
        return task_loss(kind, logits, batch["labels"])

    return loss


def inner_step(loss_fn: LossFn, params: Params, batch: Batch, *, lr: float,
               first_order: bool) -> tuple[Params, Tensor]:
    """One SGD step on one batch, Dou et al. Eq. 1: θ' = θ − α ∇L(θ).

    Args:
        loss_fn: ``loss(params, batch)``, e.g. from ``task_loss_fn``.
        params: the current parameters; entries that do not require grad pass through.
        batch: the support batch of this step.
        lr: the inner learning rate α.
        first_order: detach the gradient (no second derivatives through this step).

    Returns:
        (new params, the loss at ``params`` detached). Parameters the loss does not reach
        (another task's head) are passed through as the same tensor objects.
    """
    loss = loss_fn(params, batch)
    grads = _gradients(loss, params, first_order=first_order)
    new = dict(params)
    for name, grad in grads.items():
        if grad is None:
            continue
        # first order: `grad` carries no graph, so dθ'/dθ = I
        new[name] = torch.add(params[name], grad, alpha=-lr)  # θ − α·g in one kernel, no α·g temporary
    return new, loss.detach()


def _gradients(loss: Tensor, params: Params, *, first_order: bool) -> dict[str, Tensor | None]:
    """∇loss for every parameter that requires grad (None where the loss does not reach it); with
    ``first_order`` the gradients carry no graph, otherwise they stay differentiable in ``params``."""
    names = [name for name, p in params.items() if p.requires_grad]
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
    return dict(zip(names, grads))


def adapt_with_losses(loss_fn: LossFn | Sequence[LossFn], params: Params, support: Sequence[Batch], *, lr: float,
                      first_order: bool, steps: int | None = None, recompute: bool = False,
                      optimizer=None) -> tuple[Params, list[Tensor]]:
    """``adapt`` that also returns the loss before each inner step (detached scalars).

    ``loss_fn`` may be one function per support batch (cross-task support, Lv et al.).
    ``recompute`` (second order only) keeps no activations of the inner steps: each step is
    checkpointed with its input parameters as explicit inputs and recomputed during the outer
    backward, trading one more forward/backward per inner step for memory that no longer grows
    with the activations of every step (MiniLM 8x64, k=5: 574 MB instead of 1339 MB peak, README Benchmarks).
    ``optimizer``: None for SGD with learning rate ``lr``, or an ``inner_optim.InnerAdam`` (its own lr).
    """
    steps = len(support) if steps is None else steps
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps and not support:
        raise ValueError(f"{steps} inner steps need at least one support batch, got none")
    if optimizer is not None and recompute and not first_order:
        raise ValueError("recompute_inner_steps supports the SGD inner loop only (inner_optimizer: sgd)")
    losses = []
    state = optimizer.init() if optimizer is not None else None
    for k in range(steps):
        fn = loss_fn[k % len(loss_fn)] if isinstance(loss_fn, (list, tuple)) else loss_fn
        batch = support[k % len(support)]
        if optimizer is not None:
            params, state, loss = _optimizer_step(fn, params, batch, optimizer, state, k + 1, first_order)
        elif recompute and not first_order:
            params, loss = _recomputed_step(fn, params, batch, lr=lr)
        else:
            params, loss = inner_step(fn, params, batch, lr=lr, first_order=first_order)
        losses.append(loss)
    return params, losses


def _optimizer_step(loss_fn: LossFn, params: Params, batch: Batch, optimizer, state, step: int,
                    first_order: bool) -> tuple[Params, object, Tensor]:
    """One inner step of a stateful optimiser (``inner_optim.InnerAdam``): gradients as in
    ``inner_step`` (detached for first order), then the optimiser's functional update."""
    loss = loss_fn(params, batch)
    new, state = optimizer.update(params, _gradients(loss, params, first_order=first_order), state, step)
    return new, state, loss.detach()


def _recomputed_step(loss_fn: LossFn, params: Params, batch: Batch, *, lr: float) -> tuple[Params, Tensor]:
    """A second-order inner step under non-reentrant checkpointing.

    The parameters enter as explicit checkpoint inputs, so the recomputation in backward uses
    exactly them (unlike module-level activation checkpointing, which would read the module's
    own weights). Parameters the step does not change pass through untouched.
    """
    from torch.utils.checkpoint import checkpoint

    names = [n for n, p in params.items() if p.requires_grad]

    def step(*tensors: Tensor) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            new, loss = inner_step(loss_fn, {**params, **dict(zip(names, tensors))}, batch, lr=lr, first_order=False)
        return (*(new[n] for n in names), loss)

    *tensors, loss = checkpoint(step, *(params[n] for n in names), use_reentrant=False)
    return {**params, **dict(zip(names, tensors))}, loss.detach()


def adapt(loss_fn: LossFn, params: Params, support: Sequence[Batch], *, lr: float, first_order: bool,
          steps: int | None = None) -> Params:
    """k inner SGD steps from ``params``, Dou et al. Eq. 1, one per support batch.

    Args:
        loss_fn: ``loss(params, batch)``, e.g. from ``task_loss_fn``.
        params: θ^(0); left untouched (a new dict of new tensors comes back).
        support: the support batches, used in order.
        lr: the inner learning rate α.
        first_order: True drops the second derivatives (FOMAML, Reptile); False keeps the
            adapted parameters differentiable in θ^(0) (MAML).
        steps: the number of inner steps k; None for one per support batch. With more
            steps than batches the batches are cycled.

    Returns:
        θ^(k). Parameters no loss reaches are the same tensor objects as in ``params``.
    """
    return adapt_with_losses(loss_fn, params, support, lr=lr, first_order=first_order, steps=steps)[0]


# Task kinds whose heads never read the input word embeddings (no vocabulary projection tied to
# them): only episodes made of these may run their inner loop on the embedding rows they use.
VOCAB_FREE_KINDS = frozenset({"classification", "pair_classification", "regression", "token_classification"})


def episode_vocabulary(model: nn.Module, params: Params, batches: Sequence[Batch],
                       tasks: Sequence[str]) -> tuple[Params, list[Batch]]:
    """The same computation on the word-embedding rows the batches use: a memory and time saving.

    The input word-embedding matrix E (V x H; for MiniLM 11.7M of its 22.7M parameters) gets a
    gradient only on the rows of tokens in the batch, yet an inner SGD step writes a dense V x H
    gradient and a dense E' = E - α∇E, and second-order MAML keeps both in its graph. Gathering
    E_c = E[rows] (U x H, U the distinct token ids of all ``batches``) and renumbering the input
    ids into it gives the same losses and the same meta-gradient (rows no batch uses have zero
    gradient, so SGD leaves them unchanged, and no batch reads them); the gradient reaches E
    through the gather, once, at the end.

    Applied only when it is exact: every task's kind is in ``VOCAB_FREE_KINDS``, E is a trainable
    ``nn.Embedding`` weight of ``model.encoder`` tied to no other parameter, without ``max_norm``
    or ``scale_grad_by_freq``, and every batch has ``input_ids``; otherwise the inputs come back
    unchanged. The padding row keeps its index (``padding_idx`` stays right).

    Args:
        model: a ``MultiTaskModel``.
        params: the trainable parameters by name (as from ``trainable_params``).
        batches: every batch of the episode (support and query).
        tasks: the tasks whose losses these batches feed.

    Returns:
        (params with E replaced by E_c, batches with ``input_ids`` renumbered into E_c).
    """
    unchanged = params, list(batches)
    kinds = getattr(model, "kinds", {})
    encoder = getattr(model, "encoder", None)
    if not batches or any(kinds.get(t) not in VOCAB_FREE_KINDS for t in tasks) \
            or not hasattr(encoder, "get_input_embeddings") or any("input_ids" not in b for b in batches):
        return unchanged
    emb = encoder.get_input_embeddings()
    if not isinstance(emb, nn.Embedding) or emb.max_norm is not None or emb.scale_grad_by_freq:
        return unchanged
    name = next((n for n, p in params.items() if p is emb.weight), None)
    if name is None or sum(p is emb.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1:
        return unchanged
    id_keys = ("input_ids", "input_ids_b")  # a bi-encoded pair's second texts index E too
    ids = torch.cat([b[k].reshape(-1) for b in batches for k in id_keys if k in b])
    rows = torch.unique(ids)  # (U,) sorted
    pad = emb.padding_idx
    if pad is not None:  # the padding row goes to index `pad` of E_c, where F.embedding expects it
        others = rows[rows != pad]
        if len(others) < pad:
            return unchanged
        rows = torch.cat([others[:pad], others.new_tensor([pad]), others[pad:]])
    lookup = torch.full((emb.num_embeddings,), -1, dtype=ids.dtype, device=ids.device)  # (V,)
    lookup[rows] = torch.arange(len(rows), dtype=ids.dtype, device=ids.device)
    compact = params[name].index_select(0, rows)  # (U, H)
    return {**params, name: compact}, [{**b, **{k: lookup[b[k]] for k in id_keys if k in b}} for b in batches]


def accumulate_grads(params: Params, grads: Params) -> None:
    """Adds ``grads`` into ``.grad`` of the tensors in ``params`` (the loop zeroes them first).

    Names absent from ``grads`` keep their ``.grad`` (None for a head no episode used, so
    the optimiser leaves it alone, as with plain backpropagation).
    """
    for name, grad in grads.items():
        p = params[name]
        if p.grad is None:
            p.grad = grad.detach()  # the algorithms hand over fresh tensors: no copy needed
        else:
            p.grad.add_(grad.detach())


def mean_losses(query_losses: Sequence[Tensor], support_losses: Sequence[Tensor]) -> dict[str, float]:
    """Step statistics: mean query loss, and mean first-support loss (before adaptation) if any."""
    stats = {"loss": torch.stack(list(query_losses)).mean().item()}
    if support_losses:
        stats["support_loss"] = torch.stack(list(support_losses)).mean().item()
    return stats
