"""One run of the Two Moons study: pre-train a student (MLM or a teacher's pseudo data), fine-tune it
on a labelled set, score it (Shen, §4.1-4.2, Tables 5-6).

The training step is one algorithm for every method (``algorithm.TeacherStudentStep``: the objective
functions of ``objective.py`` write the gradients); the student and the teacher are two optimiser
groups (``metalm.train.groups``: AdamW with the inverse-square-root schedule of §4.1, each clipped
by its own norm), and ``grad_accum`` micro-batches add up before each step.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from metalm.contracts import NO_FEEDBACK, Communicator, Episode, FeedbackRequest, LocalCommunicator
from metalm.teacher import objective as obj
from metalm.teacher import twomoons as tm
from metalm.teacher.algorithm import TeacherAndStudent, TeacherStudentStep, unlabelled_batch
from metalm.teacher.model import Encoder
from metalm.config import ConfigError
from metalm.files import write_text_atomic
from metalm.train.checkpoint import derived_seed, latest_checkpoint
from metalm.train.groups import OptimGroup
from metalm.train.loop import train_loop
from metalm.train.optim import build_optimizer

METHODS = ("mlm", "hard", "soft", "soft_fixed_y", "hard_fixed_y")
STREAMS = ("shared", "per_batch")
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
    streams: str = "shared"
    """Random draws (rows, tasks, masks, pseudo tokens, dropout): ``shared``, one generator in call
    order (one process); ``per_batch``, seeded afresh for each micro-batch from (seed, step, index),
    so several processes can split a step's ``grad_accum`` micro-batches and end where one process
    ends (other draws than ``shared``, so other numbers)."""

    def __post_init__(self):
        if self.streams not in STREAMS:
            raise ConfigError(f"streams: expected one of {STREAMS}, got {self.streams!r}")
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


class TaskChoice:
    """Shen's task distribution as a ``contracts.Sampler`` (§4.1): a labelled task uniformly, or
    with ``mlm_task`` (soft labels) the MLM task on unlabelled data with probability ½.

    Its generator is the one every draw of the pre-training reads (rows, masks, pseudo tokens), so
    its state is the whole run's data randomness; ``state_dict`` keeps it.

    Args:
        tasks: how many labelled tasks (named ``task0``, ``task1``, ...).
    """

    history = None

    def __init__(self, tasks: int, *, mlm_task: bool, generator: torch.Generator):
        self.count, self.mlm_task, self.g = tasks, mlm_task, generator
        self.names = tuple(f"task{i}" for i in range(tasks)) + (("mlm",) if mlm_task else ())

    def sample(self) -> str:
        if self.mlm_task and bool(torch.rand((), generator=self.g) < 0.5):
            return "mlm"
        return f"task{int(torch.randint(self.count, (), generator=self.g))}"

    def request(self, done: int) -> FeedbackRequest:
        return NO_FEEDBACK

    def update(self, feedback) -> None:
        return None

    def state_dict(self) -> dict:
        return {"generator": base64.b64encode(self.g.get_state().numpy().tobytes()).decode("ascii")}

    def load_state_dict(self, state) -> None:
        raw = bytearray(base64.b64decode(state["generator"]))
        self.g.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())


class TaskSampler:
    """Support and query batches from the same task (§4.1), ``samples_per_task`` examples per draw,
    ``batch_size // samples_per_task`` draws per batch; each draw's task comes from ``choice``.

    Args:
        tasks: per labelled task, (inputs (n, T) ids, targets (n, T) ids).
    """

    def __init__(self, tasks: list[tuple[Tensor, Tensor]], unlabelled: Tensor, scheme: obj.MaskingScheme, *,
                 choice: TaskChoice, batch_size: int, samples_per_task: int, generator: torch.Generator):
        self.tasks, self.unlabelled, self.scheme, self.choice = tasks, unlabelled, scheme, choice
        self.batch_size, self.per_task, self.g = batch_size, samples_per_task, generator

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
            name = self.choice.sample()
            task = None if name == "mlm" else int(name[len("task"):])
            support.append(self._draw(task))
            query.append(self._draw(task))
        return _pad_cat(support), _pad_cat(query)


class PretrainEpisodes:
    """The pre-training's ``contracts.EpisodeSource``: one episode per algorithm step (``draw_episode``).
    Its draws read the generator ``TaskChoice`` keeps, so it has no state of its own.

    Args:
        seed: None (``streams: shared``): the generator runs on from draw to draw, in call order (one
            process). An int (``streams: per_batch``): before each micro-batch the generator and
            torch's global RNG (dropout) are seeded from ``(seed, step, index)``, so the micro-batch
            and every draw the algorithm makes on it are the same on whichever process runs it.
    """

    def __init__(self, unlabelled: Tensor, batches: TaskSampler | None, *, batch_size: int,
                 generator: torch.Generator, seed: int | None = None):
        self.unlabelled, self.batches, self.batch_size, self.g = unlabelled, batches, batch_size, generator
        self.seed = seed
        self.seekable = seed is not None

    def next_episodes(self, step: int, index: int) -> list[Episode]:
        if self.seed is not None:
            batch_seed = derived_seed(self.seed, step, index)
            self.g.manual_seed(batch_seed)
            torch.manual_seed(batch_seed)
        return [draw_episode(self.unlabelled, self.batches, batch_size=self.batch_size, generator=self.g)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        return None


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
             scheme: obj.MaskingScheme | None = None, log_samples: Callable[[int], list] | None = None,
             run_dir: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
             on_step: Callable[[int], None] | None = None, comm: Communicator | None = None) -> dict:
    """Pre-trains ``student`` in place (and ``teacher`` for the meta methods) with the shared
    training loop: ``TeacherStudentStep`` as the algorithm, the student's and the teacher's
    optimiser groups, ``grad_accum`` micro-batches per step, the episodes from ``PretrainEpisodes``.

    Args:
        unlabelled: (N, T) ids of x_u; padding is id 0.
        tasks: the labelled tasks, each (inputs, targets) ids (see ``TaskSampler``).
        held_out: a fixed MLM batch for the student's MLM loss.
        scheme: masking (default: the Two Moons vocabulary's).
        log_samples: called with the step at each evaluation; what it returns goes to ``samples``.
        run_dir: the loop's folder (log, checkpoints, and this function's record of the curve so
            far beside each checkpoint); None: a temporary folder, removed afterwards.
        checkpoint_every, resume, on_step: as ``train_loop``'s (a resume continues bit for bit,
            with the curve, h and best state recorded up to the checkpoint it resumes from).
        comm: the seam to other processes (``metalm.train.distributed.TorchCommunicator``; one
            process by default). Several processes need ``settings.streams == "per_batch"`` and
            ``grad_accum`` at least their number: each runs its share of a step's micro-batches,
            the gradients are summed, and the run ends at the parameters one process reaches.
            Rank 0 alone evaluates, records and returns the full curve and h (the others return
            their own h only, and an empty curve).

    Returns:
        ``{"best_state": student state at the lowest held-out MLM loss, "curve": [...], "h": [...],
        "samples": [...]}``.
    """
    comm = comm if comm is not None else LocalCommunicator()
    if comm.world_size > 1 and settings.streams != "per_batch":
        raise ConfigError(f"pre-training on {comm.world_size} processes needs streams: per_batch (with streams: "
                          "shared every draw follows the one before, so the micro-batches cannot be split)")
    if run_dir is None:
        if comm.world_size > 1:
            raise ValueError("pre-training on several processes needs a run_dir that every process shares")
        with tempfile.TemporaryDirectory(prefix="pretrain-") as tmp:
            return pretrain(settings, teacher, student, unlabelled, tasks, held_out, seed=seed, scheme=scheme,
                            log_samples=log_samples, run_dir=tmp, checkpoint_every=checkpoint_every,
                            resume=False, on_step=on_step)
    run_dir = Path(run_dir)
    main = comm.rank == 0
    g = torch.Generator().manual_seed(seed)
    scheme = scheme or masking_scheme()
    choice = TaskChoice(len(tasks), mlm_task=settings.mlm_task and settings.method != "mlm", generator=g)
    batches = None
    if settings.method != "mlm":
        batches = TaskSampler(tasks, unlabelled, scheme, choice=choice, batch_size=settings.batch_size,
                              samples_per_task=settings.samples_per_task, generator=g)
    pair = TeacherAndStudent(teacher, student)
    groups = optim_groups(settings, teacher, student)
    algorithm = step_algorithm(settings, scheme, g, groups[0].optimizer)
    steps = max(1, settings.samples // (settings.batch_size * settings.grad_accum))
    eval_every = max(1, steps // settings.evals)
    record = {"curve": [], "samples": [], "h": algorithm.h, "best_mlm_loss": mlm_loss(student, held_out)}
    best_state = copy.deepcopy(student.state_dict())
    start = comm.broadcast_object(_resumed_step(run_dir) if resume and main else 0)
    if start and main:
        record, best_state = _read_record(run_dir, start, student)
        algorithm.h[:] = record["h"]
        algorithm.skipped = record["skipped"]
        record["h"] = algorithm.h
    seen = [len(algorithm.h), algorithm.skipped]  # h and skips of the steps recorded so far

    def merge_ranks() -> None:
        """Rank 0 gathers the h and skips of every process's micro-batches of this step, in
        micro-batch order (process r ran micro-batches r, r + W, ...: one episode each)."""
        mine = (algorithm.h[seen[0]:], algorithm.skipped - seen[1])
        gathered = comm.gather_object(mine)
        if main:
            world = comm.world_size
            ordered = [None] * sum(len(h) for h, _ in gathered)
            for rank, (hs, _) in enumerate(gathered):
                for k, value in enumerate(hs):
                    ordered[rank + k * world] = value
            algorithm.h[seen[0]:] = ordered
            algorithm.skipped = seen[1] + sum(n for _, n in gathered)
        seen[:] = [len(algorithm.h), algorithm.skipped]

    def after(done: int) -> None:
        nonlocal best_state
        if comm.world_size > 1:
            merge_ranks()
        if not main:
            if on_step is not None:
                on_step(done)
            return
        if done % eval_every == 0 or done == steps:
            loss = mlm_loss(student, held_out)
            record["curve"].append({"step": done, "samples": done * settings.batch_size * settings.grad_accum,
                                    "mlm_loss": loss})
            if loss < record["best_mlm_loss"]:
                record["best_mlm_loss"], best_state = loss, copy.deepcopy(student.state_dict())
            if log_samples is not None:
                record["samples"].append({"step": done, "samples": log_samples(done)})
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            _write_record(run_dir, done, {**record, "skipped": algorithm.skipped}, best_state)
        if on_step is not None:
            on_step(done)

    train_loop(model=pair, tasks={}, algorithm=algorithm, sampler=choice, groups=groups, steps=steps,
               batch_size=settings.batch_size, seed=seed, run_dir=run_dir, grad_accum=settings.grad_accum,
               source=PretrainEpisodes(unlabelled, batches, batch_size=settings.batch_size, generator=g,
                                       seed=seed if settings.streams == "per_batch" else None),
               log_every=1, checkpoint_every=checkpoint_every, resume=resume, progress=False, tensorboard=False,
               on_step=after, comm=comm)
    return {"best_state": best_state, "best_mlm_loss": record["best_mlm_loss"], "curve": record["curve"],
            "h": algorithm.h, "skipped": algorithm.skipped, "steps": steps, "samples": record["samples"]}


RECORD = "pretrain-record"


def _resumed_step(run_dir: Path) -> int:
    """The step the loop will resume ``run_dir`` from (0: none), read as the loop reads it."""
    folder = latest_checkpoint(run_dir)
    return 0 if folder is None else int(json.loads((folder / "state.json").read_text())["step"])


def _write_record(run_dir: Path, step: int, record: dict, best_state: dict) -> None:
    """The curve, h, samples and best student state after ``step`` (beside that step's checkpoint;
    the two newest kept, as the checkpoints are)."""
    root = run_dir / RECORD
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in best_state.items()}, str(root / f"best-{step:07d}.safetensors"))
    write_text_atomic(root / f"record-{step:07d}.json", json.dumps(record))
    kept = sorted(root.glob("record-*.json"))[:-2]
    for old in kept:
        old.unlink()
        (root / old.name.replace("record-", "best-").replace(".json", ".safetensors")).unlink(missing_ok=True)


def _read_record(run_dir: Path, step: int, student: Encoder) -> tuple[dict, dict]:
    root = run_dir / RECORD
    path = root / f"record-{step:07d}.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the pre-training's curve at the step it resumes from ({step}) "
                          "was not recorded; start afresh")
    record = json.loads(path.read_text())
    best = load_file(str(root / f"best-{step:07d}.safetensors"))
    like = student.state_dict()
    return record, {k: best[k].to(like[k].dtype) for k in like}
