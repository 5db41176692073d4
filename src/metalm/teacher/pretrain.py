"""One run of the Two Moons study: pre-train a student (MLM or a teacher's pseudo data), fine-tune it
on a labelled set, score it (Shen, §4.1-4.2, Tables 5-6).

The training step is one algorithm for every method (``algorithm.TeacherStudentStep``: the objective
functions of ``objective.py`` write the gradients); the student and the teacher are two optimiser
groups (``metalm.train.groups``: AdamW with the inverse-square-root schedule of §4.1, each clipped
by its own norm), and ``grad_accum`` micro-batches add up before each step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from metalm.contracts import Episode
from metalm.teacher import objective as obj
from metalm.teacher import twomoons as tm
from metalm.teacher.algorithm import TeacherAndStudent, TeacherStudentStep, unlabelled_batch
from metalm.teacher.model import Encoder
from metalm.config import ConfigError
from metalm.train.groups import OptimGroup, accumulate, apply_groups
from metalm.train.optim import build_optimizer

METHODS = ("mlm", "hard", "soft", "soft_fixed_y", "hard_fixed_y")
PAD = 0  # the padding id of every vocabulary here


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training of one run (their Table 5)."""

    method: str
    samples: int  # unlabelled sequences seen (their 640k = 32k x 20 epochs)
    batch_size: int = 4
    samples_per_task: int = 4  # labelled examples drawn from one task before drawing the next
    grad_accum: int = 4
    peak_lr: float = 2.5e-3  # their lr 0.08 / sqrt(1000 warmup steps)
    warmup: int = 1000  # optimizer steps
    inner_lr: float = 0.1
    meta_weight: float | None = None  # λ_meta; None: 1 for hard labels, 100 for soft (Table 5)
    mlm_as_task: bool | None = None  # None: True for soft labels (§4.1)
    h_form: str = "cosine"
    h_update: str = "optimizer"  # θ0 − θ1 of Eq. 8: "optimizer" (the student's AdamW step) or "sgd" (η·g)
    clip: float = 5.0
    evals: int = 20  # held-out MLM losses over the run (for "MLM (best loss)")

    def __post_init__(self):
        if self.h_update not in obj.H_UPDATES:
            raise ConfigError(f"h_update: expected one of {obj.H_UPDATES}, got {self.h_update!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.batch_size % self.samples_per_task:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of samples_per_task "
                             f"{self.samples_per_task}")

    @property
    def soft(self) -> bool:
        return self.method.startswith("soft")

    @property
    def fixed_y(self) -> bool:
        return self.method.endswith("fixed_y")

    @property
    def weight(self) -> float:
        return self.meta_weight if self.meta_weight is not None else (100.0 if self.soft else 1.0)

    @property
    def mlm_task(self) -> bool:
        return self.mlm_as_task if self.mlm_as_task is not None else self.soft


def inverse_sqrt(step: int, *, peak_lr: float, warmup: int) -> float:
    """§4.1: linear warmup to ``peak_lr`` at ``warmup`` steps, then peak·sqrt(warmup/step)."""
    n = step + 1
    if n < warmup:
        return peak_lr * n / warmup
    return peak_lr * math.sqrt(max(warmup, 1) / n)


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW as in Tables 5-6 (β 0.9/0.98, ε 1e-6)."""
    return build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), eps=1e-6)


def _apply(model: nn.Module, optimizer, *, lr: float, clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def labelled_batch(tokens: Tensor, targets: Tensor) -> obj.Batch:
    keep = tokens != PAD
    return {"tokens": tokens, "keep": keep, "target": targets, "weight": keep.float()}


def _pad_cat(batches: list[obj.Batch]) -> obj.Batch:
    """Concatenate batches of different lengths, padding on the right."""
    T = max(b["tokens"].shape[1] for b in batches)
    out = {}
    for key in ("tokens", "keep", "target", "weight"):
        parts = [torch.nn.functional.pad(b[key], (0, T - b[key].shape[1])) for b in batches]
        out[key] = torch.cat(parts)
    return out


class TaskSampler:
    """Support and query batches from the same task (§4.1): a labelled task drawn uniformly, or
    (``mlm_task``, soft labels) the MLM task on unlabelled data with probability ½, with
    ``samples_per_task`` examples per draw.

    Args:
        tasks: per labelled task, (inputs (n, T) ids, targets (n, T) ids).
    """

    def __init__(self, tasks: list[tuple[Tensor, Tensor]], unlabelled: Tensor, scheme: obj.MaskingScheme, *,
                 mlm_task: bool, batch_size: int, samples_per_task: int, generator: torch.Generator):
        self.tasks, self.unlabelled, self.scheme = tasks, unlabelled, scheme
        self.mlm_task, self.batch_size, self.per_task, self.g = mlm_task, batch_size, samples_per_task, generator

    def _draw(self, task: int | None) -> obj.Batch:
        if task is None:
            idx = torch.randint(len(self.unlabelled), (self.per_task,), generator=self.g)
            return obj.mask_tokens(self.unlabelled[idx], self.scheme, generator=self.g)
        inputs, targets = self.tasks[task]
        idx = torch.randint(len(inputs), (self.per_task,), generator=self.g)
        return labelled_batch(inputs[idx], targets[idx])

    def __call__(self) -> tuple[obj.Batch, obj.Batch]:
        support, query = [], []
        for _ in range(self.batch_size // self.per_task):
            use_mlm = self.mlm_task and bool(torch.rand((), generator=self.g) < 0.5)
            task = None if use_mlm else int(torch.randint(len(self.tasks), (), generator=self.g))
            support.append(self._draw(task))
            query.append(self._draw(task))
        return _pad_cat(support), _pad_cat(query)


def masking_scheme() -> obj.MaskingScheme:
    v = tm.VOCAB
    return obj.MaskingScheme(mask_id=v.mask, cls_mlm=v.cls_mlm, content=v.content_ids)


@torch.no_grad()
def mlm_loss(student: Encoder, held_out: obj.Batch) -> float:
    """The student's MLM loss on a fixed masked held-out batch (their Fig. 1, right)."""
    student.eval()
    logits = student(held_out["tokens"], held_out["keep"])["output"]
    student.train()
    return float(obj.sequence_ce(logits, held_out["target"], held_out["weight"]))


def schedule(optimizer: torch.optim.Optimizer, *, peak_lr: float, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``inverse_sqrt`` as a LambdaLR. The optimiser must be built with lr 1, so the factor is the
    learning rate itself (1 × lr, exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: inverse_sqrt(step, peak_lr=peak_lr, warmup=warmup))


def optim_groups(settings: PretrainSettings, teacher: Encoder, student: Encoder) -> list[OptimGroup]:
    """The student's group (AdamW + inverse-sqrt schedule, clipped at ``clip``), then the teacher's
    alike for the meta methods (the MLM baseline trains the student only)."""
    groups = []
    for name, model in (("student", student), ("teacher", teacher)):
        if name == "teacher" and settings.method == "mlm":
            continue
        optimizer = adamw(model, 1.0, 0.01)
        groups.append(OptimGroup(name, tuple(model.parameters()), optimizer,
                                 schedule(optimizer, peak_lr=settings.peak_lr, warmup=settings.warmup),
                                 settings.clip))
    return groups


def step_algorithm(settings: PretrainSettings, scheme: obj.MaskingScheme, generator: torch.Generator,
                   student_optimizer: torch.optim.Optimizer) -> TeacherStudentStep:
    """The algorithm of ``settings.method`` (its h reads ``student_optimizer`` when ``h_update`` is
    ``optimizer``)."""
    kind = "mlm" if settings.method == "mlm" else ("soft" if settings.soft else "hard")
    uses_optimizer = kind == "hard" and settings.h_update == "optimizer"
    return TeacherStudentStep(kind, scheme, generator, fixed_y=settings.fixed_y, inner_lr=settings.inner_lr,
                              meta_weight=settings.weight, h_form=settings.h_form,
                              student_optimizer=student_optimizer if uses_optimizer else None)


def draw_episode(unlabelled: Tensor, sampler: TaskSampler | None, *, batch_size: int,
                 generator: torch.Generator) -> Episode:
    """One micro-batch: ``batch_size`` unlabelled rows drawn with replacement, then (meta methods,
    ``sampler`` given) a support and a query batch (``TaskSampler``)."""
    idx = torch.randint(len(unlabelled), (batch_size,), generator=generator)
    x_u = unlabelled_batch(unlabelled[idx], PAD)
    if sampler is None:
        return Episode(task="mlm", support=(x_u,), query=x_u)
    support, query = sampler()
    return Episode(task="shen", support=(x_u, support), query=query)


def pretrain(settings: PretrainSettings, teacher: Encoder, student: Encoder, unlabelled: Tensor,
             tasks: list[tuple[Tensor, Tensor]], held_out: obj.Batch, *, seed: int,
             scheme: obj.MaskingScheme | None = None, log_samples: Callable[[int], list] | None = None) -> dict:
    """Pre-trains ``student`` in place (and ``teacher`` for the meta methods).

    Args:
        unlabelled: (N, T) ids of x_u; padding is id 0.
        tasks: the labelled tasks, each (inputs, targets) ids (see ``TaskSampler``).
        held_out: a fixed MLM batch for the student's MLM loss.
        scheme: masking (default: the Two Moons vocabulary's).
        log_samples: called with the step at each evaluation; what it returns goes to ``samples``.

    Returns:
        ``{"best_state": student state at the lowest held-out MLM loss, "curve": [...], "h": [...],
        "samples": [...]}``.
    """
    g = torch.Generator().manual_seed(seed)
    scheme = scheme or masking_scheme()
    sampler = None
    if settings.method != "mlm":
        sampler = TaskSampler(tasks, unlabelled, scheme, mlm_task=settings.mlm_task, batch_size=settings.batch_size,
                              samples_per_task=settings.samples_per_task, generator=g)
    pair = TeacherAndStudent(teacher, student)
    groups = optim_groups(settings, teacher, student)
    algorithm = step_algorithm(settings, scheme, g, groups[0].optimizer)
    params = list(pair.parameters())
    steps = max(1, settings.samples // (settings.batch_size * settings.grad_accum))
    eval_every = max(1, steps // settings.evals)
    best = (mlm_loss(student, held_out), copy.deepcopy(student.state_dict()))
    curve, samples = [], []
    for step in range(steps):
        for _ in range(settings.grad_accum):
            episode = draw_episode(unlabelled, sampler, batch_size=settings.batch_size, generator=g)
            accumulate(params, settings.grad_accum, lambda: algorithm.step(pair, [episode]))  # noqa: B023
        apply_groups(groups)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            loss = mlm_loss(student, held_out)
            curve.append({"step": step + 1, "samples": (step + 1) * settings.batch_size * settings.grad_accum,
                          "mlm_loss": loss})
            if loss < best[0]:
                best = (loss, copy.deepcopy(student.state_dict()))
            if log_samples is not None:
                samples.append({"step": step + 1, "samples": log_samples(step + 1)})
    return {"best_state": best[1], "best_mlm_loss": best[0], "curve": curve, "h": algorithm.h,
            "skipped": algorithm.skipped, "steps": steps, "samples": samples}
