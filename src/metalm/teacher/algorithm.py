"""Shen's pre-training step as an ``Algorithm`` (``metalm.contracts``): it writes ``.grad`` on the
teacher and the student, and whoever runs it (``pretrain`` through the shared training loop)
clips and applies them, one optimiser group per model.

An episode of this algorithm carries, as its first support batch, the unlabelled batch the teacher
reads (``tokens`` x_u (B, T) ids, ``keep`` (B, T) bool); the meta methods have a labelled support
batch second and a labelled query batch of the same task (``objective.py``'s batch layout). The
MLM baseline reads the unlabelled batch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from metalm.contracts import Episode, StepStats
from metalm.learn.functional import accumulate_grads, trainable_params
from metalm.teacher import objective as obj

STEP_KINDS = ("mlm", "hard", "soft")


class TeacherAndStudent(nn.Module):
    """The two encoders side by side, as one model for the training loop (no forward of its own:
    the algorithm calls each encoder)."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.student = student

    def forward(self, *args, **kwargs):
        raise TypeError("TeacherAndStudent has no forward; call .teacher or .student")


def unlabelled_batch(x_u: Tensor, pad: int = 0) -> dict[str, Tensor]:
    """The unlabelled batch an episode starts with: x_u (B, T) ids and ``keep`` (False at ``pad``)."""
    return {"tokens": x_u, "keep": x_u != pad}


@dataclass
class TeacherStudentStep:
    """One pre-training step of Shen's methods on a meta-batch of episodes.

    ``kind`` ``mlm``: the student's MLM gradient on x_u (the baseline; the teacher gets none).
    ``hard`` / ``soft``: the student trains on the teacher's pseudo data of x_u and the teacher
    gets the meta gradient (``objective.hard_label_step`` / ``soft_label_step``) plus the
    gradient of its auxiliary MLM loss (§3.4, ``teacher_aux_loss``).

    Gradients are added to ``.grad`` (several calls add up; ``metalm.train.groups.accumulate``
    divides micro-batches); with several episodes each one's gradient is divided by their number.
    Every random draw (pseudo tokens, masks) comes from ``generator``, in episode order.

    Args:
        student_optimizer: with hard labels, θ0 − θ1 of Eq. 8 is this optimiser's next step from its
            current state and learning rate (``objective.adamw_update``); None: η·g (``h_update="sgd"``).
    """

    kind: str
    scheme: obj.MaskingScheme
    generator: torch.Generator
    fixed_y: bool = False
    inner_lr: float = 0.1
    meta_weight: float = 1.0
    h_form: str = "cosine"
    student_optimizer: torch.optim.Optimizer | None = None
    support_batches: int = 1
    cross_task_support: bool = False
    reduction: str = "mean"
    h: list[float] = field(default_factory=list)
    """Hard labels: h of every episode so far."""
    skipped: int = 0
    """Hard labels: episodes whose teacher update was skipped (h not finite)."""

    def __post_init__(self):
        if self.kind not in STEP_KINDS:
            raise ValueError(f"unknown step kind {self.kind!r}; expected one of {STEP_KINDS}")

    def support_steps(self, task: str) -> int:
        return self.support_batches

    def at_step(self, step: int) -> None:
        return None

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> StepStats:
        teacher, student = model.teacher, model.student
        t_params, s_params = trainable_params(teacher), trainable_params(student)
        scale = 1.0 / len(episodes)
        losses = []
        for episode in episodes:
            loss = self._one(teacher, student, t_params, s_params, episode, scale)
            losses.append(loss)
        return {"loss": sum(losses) / len(losses)}

    def _one(self, teacher, student, t_params, s_params, episode: Episode, scale: float) -> float:
        unlabelled = episode.support[0]
        x_u, keep = unlabelled["tokens"], unlabelled["keep"]
        g = self.generator
        if self.kind == "mlm":
            out = obj.mlm_step(student, s_params, x_u, self.scheme, generator=g)
            _write(s_params, out.student_grads, scale)
            return out.stats["mlm_loss"]
        support, query = episode.support[1], episode.query
        kwargs = dict(inner_lr=self.inner_lr, meta_weight=self.meta_weight, fixed_y=self.fixed_y)
        if self.kind == "soft":
            out = obj.soft_label_step(teacher, student, t_params, s_params, x_u, keep, support, query, **kwargs)
        else:
            pre_update = None
            if self.student_optimizer is not None:
                optimizer = self.student_optimizer
                pre_update = lambda grads: obj.adamw_update(s_params, grads, optimizer)  # noqa: E731
            out = obj.hard_label_step(teacher, student, t_params, s_params, x_u, keep, support, query,
                                      h_form=self.h_form, generator=g, pre_update=pre_update, **kwargs)
            self.h.append(out.stats["h"])
            self.skipped += out.teacher_grads is None
        aux = obj.teacher_aux_loss(teacher, t_params, x_u, keep, obj.mask_tokens(x_u, self.scheme, generator=g))
        aux_grads = torch.autograd.grad(aux, list(t_params.values()))
        meta = out.teacher_grads or {}
        _write(t_params, {n: (a + meta[n] if n in meta else a) for n, a in zip(t_params, aux_grads)}, scale)
        _write(s_params, out.student_grads, scale)
        return out.stats["query_loss"]


def _write(params, grads, scale: float) -> None:
    accumulate_grads(params, grads if scale == 1.0 else {n: g * scale for n, g in grads.items()})
