"""The meta objective of Shen (§3): a teacher writes pseudo examples, the student pre-trains on them.

One meta step unrolls Eq. 1-3 on the student, functionally (parameters in, parameters out):

    θ1 = θ0 − η ∇CE(ŷ, S(x̂; θ0))              pre-training on teacher data     (Eq. 1)
    θ2 = θ1 − η ∇CE(y_s, S(x_s; θ1))           fine-tuning on a support batch    (Eq. 2)
    L  = CE(y_q, S(x_q; θ2))                   loss on a query batch, same task  (Eq. 3)

``hard_label_step`` samples (x̂, ŷ) and scales the teacher's CE on its own sample by the scalar
h (Eq. 6-8, first-order MAML); ``soft_label_step`` feeds the teacher's probabilities to the
student and differentiates the whole unroll (§3.3). Both return gradients; the caller applies
them. A batch is a dict: ``tokens`` (B, T) ids or (B, T, V) probabilities, ``keep`` (B, T) bool
(False at padding), ``target`` ids or probabilities like ``tokens``, ``weight`` (B, T) float
(which positions count in the loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalm.learn.functional import Params, inner_step

Batch = dict[str, Tensor]
H_FORMS = ("cosine", "dot")
H_UPDATES = ("optimizer", "sgd")  # θ0 − θ1 in Eq. 8: the student optimiser's real step, or η·g


@dataclass(frozen=True)
class MaskingScheme:
    """BERT masking (Table 5): ``mask_prob`` of the content positions are predicted; of those,
    ``random_prob`` get a random content token and ``unmask_prob`` stay, the rest become [MASK]."""

    mask_id: int
    cls_mlm: int  # the task token that marks an MLM example
    content: tuple[int, int]  # [low, high) ids of ordinary tokens (maskable, random replacements)
    mask_prob: float = 0.15
    random_prob: float = 0.1
    unmask_prob: float = 0.1


def sequence_ce(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Cross entropy averaged over each sequence's weighted positions, then over sequences.

    Args:
        logits: (B, T, V).
        target: (B, T) ids, or (B, T, V) probabilities (soft labels).
        weight: (B, T) float; sequences whose weights sum to 0 are left out.
    """
    logp = logits.log_softmax(-1)  # (B, T, V)
    if target.dtype.is_floating_point:
        nll = -(target * logp).sum(-1)  # (B, T)
    else:
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    per_sequence = (nll * weight).sum(1)  # (B,)
    count = weight.sum(1)  # (B,)
    valid = count > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return (per_sequence[valid] / count[valid]).mean()


def student_loss_fn(student: nn.Module):
    """``loss(params, batch)``: the student's LM loss with ``params`` substituted (for ``inner_step``)."""

    def loss(params: Params, batch: Batch) -> Tensor:
        logits = functional_call(student, params, (batch["tokens"], batch["keep"]))["output"]  # (B, T, V)
        return sequence_ce(logits, batch["target"], batch["weight"])

    return loss


def mask_tokens(ids: Tensor, scheme: MaskingScheme, *, generator: torch.Generator | None = None) -> Batch:
    """An MLM example from unlabelled ids (B, T): x_m with [CLS1] in front, target the original
    tokens (with [CLS1]), weight 1 at the predicted positions only."""
    ids = ids.clone()
    ids[:, 0] = scheme.cls_mlm
    lo, hi = scheme.content
    content = (ids >= lo) & (ids < hi)  # (B, T)
    u = torch.rand(ids.shape, generator=generator)
    chosen = content & (u < scheme.mask_prob)
    kind = torch.rand(ids.shape, generator=generator)
    random_tokens = torch.randint(lo, hi, ids.shape, generator=generator)
    x_m = torch.where(chosen & (kind < scheme.random_prob), random_tokens, ids)
    to_mask = chosen & (kind >= scheme.random_prob + scheme.unmask_prob)
    x_m = torch.where(to_mask, torch.full_like(ids, scheme.mask_id), x_m)
    keep = ids != 0
    return {"tokens": x_m, "keep": keep, "target": ids, "weight": chosen.float()}


def teacher_aux_loss(teacher: nn.Module, t_params: Params, x_u: Tensor, keep: Tensor, mlm: Batch) -> Tensor:
    """§3.4: the teacher learns to write an MLM task (x_u marked [CLS1] -> x_m, x_u) and to do
    MLM (x_m -> x_m, y_m on the masked positions). ``mlm`` is ``mask_tokens(x_u)``."""
    marked = mlm["target"]  # x_u with [CLS1]
    every = keep.float()
    write = functional_call(teacher, t_params, (marked, keep))  # heads -> (B, T, V)
    solve = functional_call(teacher, t_params, (mlm["tokens"], keep))
    return (sequence_ce(write["input"], mlm["tokens"], every) + sequence_ce(write["output"], marked, every)
            + sequence_ce(solve["input"], mlm["tokens"], every) + sequence_ce(solve["output"], marked, mlm["weight"]))


@dataclass
class MetaStep:
    """What one meta step produces: gradients for both models, scalars to log, the pseudo data."""

    teacher_grads: Params | None  # None when the update was skipped (h not finite)
    student_grads: Params
    stats: dict[str, float] = field(default_factory=dict)
    pseudo: Batch = field(default_factory=dict)


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def sample_tokens(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token per position: logits (B, T, V) -> ids (B, T)."""
    B, T, V = logits.shape
    probs = logits.detach().softmax(-1).reshape(B * T, V)
    return torch.multinomial(probs, 1, generator=generator).reshape(B, T)


def pseudo_label_h(query_grad: Tensor, step: Tensor, *, form: str, inner_lr: float, pre_grad: Tensor) -> Tensor:
    """The teacher's scalar feedback (flat vectors over all student parameters).

    ``cosine`` (Eq. 8): S_C(∇L(θ2), θ0 − θ1). ``dot`` (Eq. 7): η ∇L(θ2) · ∇CE_pre(θ0).
    """
    if form == "cosine":
        return F.cosine_similarity(query_grad, step, dim=0, eps=1e-30)
    if form == "dot":
        return inner_lr * (query_grad @ pre_grad)
    raise ValueError(f"unknown h form {form!r}; expected one of {H_FORMS}")


def hard_label_step(teacher: nn.Module, student: nn.Module, t_params: Params, s_params: Params,
                    x_u: Tensor, keep: Tensor, support: Batch, query: Batch, *, inner_lr: float = 0.1,
                    meta_weight: float = 1.0, h_form: str = "cosine", fixed_y: bool = False,
                    generator: torch.Generator | None = None,
                    pre_update: Callable[[Params], Params] | None = None) -> MetaStep:
    """Hard labels (§3.2): sample (x̂, ŷ) ~ T(x_u); teacher gradient λ·h·∇θT CE((x̂, ŷ), T(x_u)).

    The student's two inner steps are first order (Eq. 7), so h needs only ∇L at θ2 and the
    pre-training gradient. With ``fixed_y`` (Appendix B.2) ŷ is x_u itself and the teacher's CE
    covers x̂ only. A non-finite h skips the teacher update (``teacher_grads`` is None).

    Args:
        x_u: unlabelled ids (B, T); keep: (B, T) bool.
        support, query: labelled batches of the same task.
        inner_lr: η, the SGD learning rate of both inner steps.
        meta_weight: λ_meta.
        pre_update: maps the pre-training gradient g to the student's real update θ0 − θ1 (e.g.
            ``adamw_update``: Eq. 8 is written for adaptive optimisers); None: the SGD step η·g.

    Returns:
        ``MetaStep``; ``student_grads`` is ∇θS CE(ŷ, S(x̂; θ0)) (the student trains on teacher data).
    """
    logits = functional_call(teacher, t_params, (x_u, keep))  # input/output -> (B, T, V)
    x_hat = torch.where(keep, sample_tokens(logits["input"], generator), x_u)  # padding stays padding
    y_hat = x_u if fixed_y else torch.where(keep, sample_tokens(logits["output"], generator), x_u)
    pseudo = {"tokens": x_hat, "keep": keep, "target": y_hat, "weight": keep.float()}
    loss_fn = student_loss_fn(student)
    names = list(s_params)
    theta0 = {n: s_params[n].detach().requires_grad_() for n in names}
    pre_loss = loss_fn(theta0, pseudo)
    pre_grads = torch.autograd.grad(pre_loss, [theta0[n] for n in names])
    grads0 = dict(zip(names, pre_grads))
    update = pre_update(grads0) if pre_update is not None else {n: inner_lr * g for n, g in grads0.items()}
    theta1 = {n: (theta0[n] - update[n]).detach().requires_grad_() for n in names}
    theta2, support_loss = inner_step(loss_fn, theta1, support, lr=inner_lr, first_order=True)
    query_loss = loss_fn(theta2, query)
    query_grads = torch.autograd.grad(query_loss, [theta2[n] for n in names])
    step = _flat(theta0[n].detach() - theta1[n].detach() for n in names)  # θ0 − θ1
    h = pseudo_label_h(_flat(query_grads), step, form=h_form, inner_lr=inner_lr, pre_grad=_flat(pre_grads))
    stats = {"h": float(h.detach()), "pre_loss": float(pre_loss.detach()), "support_loss": float(support_loss),
             "query_loss": float(query_loss.detach())}
    student_grads = dict(zip(names, pre_grads))
    if not bool(torch.isfinite(h)):
        stats["skipped"] = 1.0
        return MetaStep(None, student_grads, stats, pseudo)
    weight = keep.float()
    teacher_ce = sequence_ce(logits["input"], x_hat, weight)
    if not fixed_y:
        teacher_ce = (teacher_ce + sequence_ce(logits["output"], y_hat, weight)) / 2  # one sequence (x̂, ŷ)
    t_names = [n for n, p in t_params.items() if p.requires_grad]
    grads = torch.autograd.grad(meta_weight * h.detach() * teacher_ce, [t_params[n] for n in t_names],
                                allow_unused=True)
    teacher_grads = {n: torch.zeros_like(t_params[n]) if g is None else g for n, g in zip(t_names, grads)}
    return MetaStep(teacher_grads, student_grads, stats, pseudo)


@torch.no_grad()
def adamw_update(named: dict[str, Tensor], grads: Params, optimizer: torch.optim.Optimizer) -> Params:
    """θ0 − θ1 of one step of ``optimizer`` (torch AdamW) with ``grads``, from its state, unmutated.

    Decoupled decay, then Adam: δ = lr·wd·θ + (lr / (1 − β1^t)) · m / (sqrt(v / (1 − β2^t)) + ε),
    with m, v the moments after this gradient and t the step it would take. A parameter the
    optimiser does not hold, or whose gradient is missing, gets a zero update.

    Args:
        named: the optimiser's parameters by name (``dict(model.named_parameters())``).
        grads: gradient per name.
    """
    by_id = {id(p): n for n, p in named.items()}
    out = {n: torch.zeros_like(p) for n, p in named.items()}
    for group in optimizer.param_groups:
        lr, wd, (b1, b2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None or name not in grads:
                continue
            g = grads[name].detach()
            state = optimizer.state.get(p, {})
            t = float(state["step"]) + 1 if "step" in state else 1.0
            m = b1 * state["exp_avg"] + (1 - b1) * g if "exp_avg" in state else (1 - b1) * g
            v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g if "exp_avg_sq" in state else (1 - b2) * g * g
            denom = (v / (1 - b2 ** t)).sqrt() + eps
            out[name] = lr * wd * p.detach() + (lr / (1 - b1 ** t)) * m / denom
    return out


def soft_pseudo_batch(logits: dict[str, Tensor], x_u: Tensor, keep: Tensor, *, fixed_y: bool) -> Batch:
    """The teacher's probabilities as a soft batch: tokens p(x̂) (B, T, V), target p(ŷ) or one-hot x_u."""
    p_x = logits["input"].softmax(-1)  # (B, T, V)
    if fixed_y:
        p_y = F.one_hot(x_u, p_x.shape[-1]).to(p_x.dtype)  # (B, T, V), independent of the teacher
    else:
        p_y = logits["output"].softmax(-1)
    return {"tokens": p_x, "keep": keep, "target": p_y, "weight": keep.to(p_x.dtype)}


def soft_meta_loss(teacher: nn.Module, student: nn.Module, t_params: Params, s_params: Params,
                   x_u: Tensor, keep: Tensor, support: Batch, query: Batch, *, inner_lr: float = 0.1,
                   fixed_y: bool = False) -> tuple[Tensor, Params, dict[str, float], Batch]:
    """L(θT) of Eq. 3 with soft pseudo data, differentiable through both inner steps.

    Returns:
        (L, the student's pre-training gradient at θ0 (detached), scalars, the soft batch).
    """
    logits = functional_call(teacher, t_params, (x_u, keep))
    pseudo = soft_pseudo_batch(logits, x_u, keep, fixed_y=fixed_y)
    loss_fn = student_loss_fn(student)
    names = list(s_params)
    theta0 = {n: s_params[n] if s_params[n].requires_grad else s_params[n].detach().requires_grad_() for n in names}
    pre_loss = loss_fn(theta0, pseudo)
    pre_grads = torch.autograd.grad(pre_loss, [theta0[n] for n in names], create_graph=True)
    theta1 = {n: theta0[n] - inner_lr * g for n, g in zip(names, pre_grads)}  # still a function of θT
    theta2, support_loss = inner_step(loss_fn, theta1, support, lr=inner_lr, first_order=False)
    query_loss = loss_fn(theta2, query)
    stats = {"pre_loss": float(pre_loss.detach()), "support_loss": float(support_loss),
             "query_loss": float(query_loss.detach())}
    return query_loss, {n: g.detach() for n, g in zip(names, pre_grads)}, stats, pseudo


def soft_label_step(teacher: nn.Module, student: nn.Module, t_params: Params, s_params: Params,
                    x_u: Tensor, keep: Tensor, support: Batch, query: Batch, *, inner_lr: float = 0.1,
                    meta_weight: float = 100.0, fixed_y: bool = False) -> MetaStep:
    """Soft labels (§3.3): teacher gradient λ·∇θT L through the two-step unroll.

    ``student_grads`` is the gradient of CE(p(ŷ), S(p(x̂); θ0)) with the teacher's
    probabilities held fixed. ``fixed_y`` (Appendix B.2): ŷ is one-hot x_u.
    """
    query_loss, pre_grads, stats, pseudo = soft_meta_loss(
        teacher, student, t_params, s_params, x_u, keep, support, query, inner_lr=inner_lr, fixed_y=fixed_y)
    t_names = [n for n, p in t_params.items() if p.requires_grad]
    grads = torch.autograd.grad(meta_weight * query_loss, [t_params[n] for n in t_names], allow_unused=True)
    teacher_grads = {n: torch.zeros_like(t_params[n]) if g is None else g for n, g in zip(t_names, grads)}
    detached = {k: v.detach() for k, v in pseudo.items()}
    return MetaStep(teacher_grads, pre_grads, stats, detached)


def mlm_step(student: nn.Module, s_params: Params, x_u: Tensor, scheme: MaskingScheme, *,
             generator: torch.Generator | None = None) -> MetaStep:
    """The MLM baseline: the student's gradient of CE(y_m, S(x_m)) on the masked positions."""
    batch = mask_tokens(x_u, scheme, generator=generator)
    loss = student_loss_fn(student)(s_params, batch)
    names = [n for n, p in s_params.items() if p.requires_grad]
    grads = torch.autograd.grad(loss, [s_params[n] for n in names])
    return MetaStep(None, dict(zip(names, grads)), {"mlm_loss": float(loss.detach())}, batch)
