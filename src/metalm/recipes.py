"""Recipes: joint multi-task training and fine-tuning, composed from the builders and the loop.

Each returns plain results and writes its run folder; the CLI and the experiment runner
call them.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from metalm.builders import (add_heads, build_model, build_objectives, build_optimization, build_sampler, build_tasks,
                             resolve_device)
from metalm.config import ConfigError, check_same_settings, to_dict
from metalm.contracts import Communicator
from metalm.learn.algorithms import algorithm_settings, build_algorithm
from metalm.learn.samplers import CategoricalSampler
from metalm.schema import FinetuneConfig, TrainConfig
from metalm.tasks.registry import get_task_spec
from metalm.files import write_text_atomic
from metalm.train.evaluate import CONSTANT, evaluate
from metalm.train.lock import run_lock
from metalm.train.distributed import communicator_from_env, local_rank
from metalm.train.loop import train_loop
from metalm.train.progress import note
from metalm.train.precision import autocast, check_precision


# Settings that may differ when a run is resumed: where things are, and how often to log.
RESUME_MAY_CHANGE = ("output_dir", "device", "threads", "data.root", "data.glue", "data.cache_dir", "train.log_every",
                     "train.checkpoint_every", "train.eval_every", "train.evaluate")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run_train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, on_step=None,
              tensorboard: bool = True, comm: Communicator | None = None) -> Path:
    """Joint multi-task training; returns the folder of the final model (``output_dir/final``).

    With ``resume``, continues from the newest checkpoint in ``output_dir``; a run that
    already finished returns its final folder without training again. The run holds
    ``output_dir/.lock`` while it runs (`metalm.train.lock`), so a second run there is refused.

    ``comm``: the processes this run is split over (`metalm.train.distributed`); by default the
    ones torchrun started, else this process alone. Rank 0 holds the lock and writes the folder.
    """
    comm = comm if comm is not None else communicator_from_env(cfg.device)
    if comm.rank != 0:
        return _run_train(cfg, resume=resume, progress=progress, on_step=on_step, tensorboard=tensorboard, comm=comm)
    with run_lock(cfg.output_dir, note=note):
        return _run_train(cfg, resume=resume, progress=progress, on_step=on_step, tensorboard=tensorboard, comm=comm)


def _run_train(cfg: TrainConfig, *, resume: bool, progress: bool, on_step, tensorboard: bool,
               comm: Communicator) -> Path:
    main = comm.rank == 0
    out = Path(cfg.output_dir)
    final = out / "final"
    if resume and (out / "config.json").exists():
        check_same_settings(json.loads((out / "config.json").read_text()), to_dict(cfg), where=f"run {out}",
                            ignore=RESUME_MAY_CHANGE)
    if resume and (final / "heads.json").exists():
        return final
    settings = cfg.train
    if not settings.tasks and not settings.objectives:
        raise ValueError("train.tasks and train.objectives are empty: name at least one task or objective")
    model, tokenizer = build_model(cfg.encoder, seed=cfg.seed, init=cfg.init)
    if not main:
        comm.barrier()  # rank 0 tokenises first and fills the cache; the others then read it
    tasks = build_stage_tasks(settings.tasks, tokenizer, cfg)
    labelled = dict(tasks)
    for name, objective in build_objectives(settings.objectives, tokenizer, data=cfg.data,
                                            max_length=cfg.encoder.max_length, seed=cfg.seed).items():
        if name in tasks:
            raise ValueError(f"objective {name} has the name of a task in train.tasks")
        tasks[name] = objective
    if main:
        comm.barrier()
    add_heads(model, tasks, seed=cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and comm.world_size > 1:
        device = torch.device("cuda", local_rank())  # one GPU per process
    model.to(device)
    optimizer, scheduler = build_optimization(model, settings.optim, steps=settings.steps)
    sampler = build_sampler(settings.sampler, tasks, seed=cfg.seed, batch_size=settings.batch_size)
    if settings.sampler.kind == "mometas":
        check_held_out(labelled)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=1))
        read = {name: {"split": "train", **task.training_rows_read()} for name, task in labelled.items()}
        write_text_atomic(out / STAGE_FILE, json.dumps({"tasks": read, "objectives": {
            name: {"split": "train", "rows": task.size("train")} for name, task in tasks.items()
            if name not in labelled}}, indent=1))
    seed_everything(cfg.seed)
    eval_tasks = {name: task.spec.eval_splits for name, task in tasks.items()
                  if all(s in task.splits for s in task.spec.eval_splits)} if settings.evaluate else {}
    algorithm = build_algorithm(settings.algorithm, **algorithm_settings(settings.algorithm, {
        "inner_steps": settings.inner_steps, "inner_lr": settings.inner_lr, "first_order": settings.first_order,
        "task_inner_steps": settings.task_inner_steps, "recompute_inner_steps": settings.recompute_inner_steps,
        "inner_optimizer": settings.inner_optimizer, "inner_betas": settings.inner_betas,
        "inner_eps": settings.inner_eps, "inner_weight_decay": settings.inner_weight_decay,
        "reduction": settings.loss_reduction, "inner_lr_decay": settings.inner_lr_decay,
        "inner_lr_decay_every": settings.inner_lr_decay_every}))
    train_loop(model=model, tasks=tasks, algorithm=algorithm, sampler=sampler,
               optimizer=optimizer, scheduler=scheduler, steps=settings.steps,
               batch_size={n: (settings.task_batch_sizes or {}).get(n, settings.batch_size) for n in tasks},
               tasks_per_step=settings.tasks_per_step, grad_accum=settings.grad_accum, seed=cfg.seed, run_dir=out,
               clip_norm=settings.optim.clip_norm, log_every=settings.log_every,
               checkpoint_every=settings.checkpoint_every or settings.steps, eval_every=settings.eval_every,
               eval_tasks=eval_tasks, resume=resume, progress=progress, on_step=on_step, tensorboard=tensorboard,
               precision=cfg.precision, group_by_length=settings.group_by_length,
               all_tasks=settings.step_tasks == "all", skip_nonfinite=settings.skip_nonfinite, comm=comm)
    if not main:
        comm.barrier()  # returns once rank 0 has written the final model
        return final
    if sampler.history is not None:  # adaptive samplers: weights and rewards over time (Wu et al. Figs. 2-3)
        write_text_atomic(out / "sampler.json", json.dumps({"names": list(sampler.names),
                                                            "history": sampler.history}, indent=1))
    tmp = out / ".final-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    comm.barrier()
    return final


STAGE_FILE = "stage.json"


def check_held_out(tasks) -> None:
    """A learned sampler's reward must come from rows the stage does not train on: refuses a task
    whose meta-test would read its training split (a target subsampled without held-out rows)."""
    for name, task in tasks.items():
        if task.held_out_split() == "train":
            raise ConfigError(f"train.sampler.kind=mometas: task {name} has no held-out split in this stage, so its "
                              "meta-test reward would read its training rows; in an experiment, set finetune.select: "
                              "best so that each cell holds out finetune.validation_fraction of its rows, or drop "
                              f"{name} from train.tasks")


def build_stage_tasks(refs, tokenizer, cfg: TrainConfig) -> dict:
    """The run's tasks; those in ``cfg.subsample`` train on their cell's rows only, and only their
    training split is loaded, so nothing of their dev or test rows reaches the run."""
    specs = [get_task_spec(ref) for ref in refs]
    unknown = sorted(set(cfg.subsample) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"subsample.{unknown[0]}: not one of train.tasks {[s.name for s in specs]}")
    tasks = {}
    for spec in specs:
        if spec.name in tasks:
            raise ValueError(f"task {spec.name} is listed twice")
        sub = cfg.subsample.get(spec.name)
        task = build_tasks([spec], tokenizer, data=cfg.data, max_length=cfg.encoder.max_length,
                           pair_max_length=cfg.encoder.pair_max_length, splits=("train",) if sub else None)[spec.name]
        if sub is not None:
            rows, held = task.training_rows(seed=sub.seed, fraction=sub.fraction, per_class=sub.per_class,
                                            validation_fraction=sub.validation_fraction)
            task = task.restricted(rows, selection=held)  # held: the cell's selection rows, never trained on
        tasks[spec.name] = task
    return tasks


@dataclass(frozen=True)
class FinetuneResult:
    scores: dict[str, dict[str, float]]
    """split -> metric -> value, after the last epoch (``select: best``: after the chosen epoch)."""
    curve: list[dict]
    """Evaluations during training: {"epoch": e, "<split>/<metric>": value, ...} (one per epoch, or
    only the last when ``eval_each_epoch`` is off)."""
    train_size: int
    degenerate: dict[str, bool]
    """split -> whether every prediction of the reported model on it was the same class or score."""
    rows_read: dict
    """Which training rows the run trained on: {rows, of, indices_sha256}."""
    selected_epoch: float | None = None
    """``select: best``: the epoch whose scores are reported."""


def check_step_bounds(settings, where: str = "finetune") -> None:
    if settings.max_steps and settings.max_steps < settings.min_steps:
        raise ConfigError(f"{where}.max_steps ({settings.max_steps}) is below {where}.min_steps "
                          f"({settings.min_steps})")


def cell_task(task, *, seed: int, fraction: float | None, per_class: int | None, validation_fraction: float = 0.0):
    """A low-resource cell of ``task``: its training rows (and a ``selection`` split when
    ``validation_fraction`` holds some out), as a stage that lists the task reads them too."""
    rows, held = task.training_rows(seed=seed, fraction=fraction, per_class=per_class,
                                    validation_fraction=validation_fraction)
    return task.restricted(rows, selection=held)


def run_finetune(cfg: FinetuneConfig, *, progress: bool = True, tensorboard: bool = True,
                 initial: tuple | None = None, stage_rows: dict | None = None) -> FinetuneResult:
    """Fine-tunes on ``cfg.task`` (subsampled by ``fraction`` or ``per_class``) and scores each epoch.

    Args:
        initial: an already built (model, tokenizer) for ``cfg.encoder``/``cfg.init``; the model is
            copied, not changed. Sweeps pass it to avoid reloading the encoder for every run.
        stage_rows: what the training stage before this run read of each task (its ``stage.json``);
            when it lists this task, the run refuses to start unless it trains on exactly those rows.
    """
    spec = get_task_spec(cfg.task)
    if initial is not None:
        model, tokenizer = copy.deepcopy(initial[0]), initial[1]
    else:
        model, tokenizer = build_model(cfg.encoder, seed=cfg.seed, init=cfg.init)
    settings = cfg.finetune
    task = build_tasks([spec], tokenizer, data=cfg.data, max_length=cfg.encoder.max_length,
                       pair_max_length=cfg.encoder.pair_max_length)[spec.name]
    select = settings.select == "best"
    task = cell_task(task, seed=cfg.seed, fraction=None if cfg.per_class is not None else cfg.fraction,
                     per_class=cfg.per_class, validation_fraction=settings.validation_fraction if select else 0.0)
    if select and "selection" not in task.splits:
        raise ConfigError(f"finetune.select=best: {task.size('train')} training rows of {spec.name} leave none "
                          f"for validation at validation_fraction {settings.validation_fraction:g}")
    check_stage_rows(spec.name, task.training_rows_read(), stage_rows)
    if spec.name in model.heads and not settings.reuse_head:
        model.remove_task(spec.name)
    add_heads(model, {spec.name: task}, seed=cfg.seed)
    model.to(resolve_device(cfg.device))
    steps_per_epoch = math.ceil(task.size("train") / settings.batch_size)
    check_step_bounds(settings)
    steps = max(steps_per_epoch * settings.epochs, settings.min_steps)
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
    # With min_steps, an "epoch" of the curve is the same fraction of the run as without it.
    eval_every = math.ceil(steps / settings.epochs) if settings.eval_each_epoch or select else steps
    optimizer, scheduler = build_optimization(model, settings.optim, steps=steps)
    splits = tuple(settings.eval_splits or spec.eval_splits)
    key = f"{spec.name}/selection/{spec.metrics[0]}"
    seed_everything(cfg.seed)
    keep = _Snapshot(model, key) if select and cfg.save_model else None
    stop = _patience_stop(key, settings.patience) if select and settings.patience else None
    if keep is not None:
        stop = keep.wrap(stop)
    result = train_loop(model=model, tasks={spec.name: task}, algorithm=build_algorithm("multitask"),
                        sampler=CategoricalSampler({spec.name: 1.0}, seed=cfg.seed), optimizer=optimizer,
                        scheduler=scheduler, steps=steps, batch_size=settings.batch_size, seed=cfg.seed,
                        run_dir=cfg.output_dir, clip_norm=settings.optim.clip_norm, log_every=eval_every,
                        eval_every=eval_every, eval_tasks={spec.name: (("selection",) if select else ()) + splits},
                        progress=progress, tensorboard=tensorboard, precision=cfg.precision,
                        evaluator=functools.partial(evaluate, flag_constant=True),
                        stop=stop)
    prefix = f"{spec.name}/"
    curve = [{"epoch": round(e["step"] / steps * settings.epochs, 3),
              **{k[len(prefix):]: v for k, v in e.items() if k.startswith(prefix) and not k.endswith(CONSTANT)}}
             for e in result.evaluations]
    chosen = max(range(len(curve)), key=lambda i: (curve[i][key[len(prefix):]], -i)) if select else len(curve) - 1
    final: dict[str, dict[str, float]] = {}
    for name, value in curve[chosen].items():
        if name != "epoch" and name.split("/", 1)[0] in splits:
            split, metric = name.split("/", 1)
            final.setdefault(split, {})[metric] = value
    record = result.evaluations[chosen]
    if cfg.save_model:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(cfg.output_dir) / "config.json", json.dumps(to_dict(cfg), indent=1))
        if keep is not None:
            keep.restore()
        folder = Path(cfg.output_dir) / "final"
        tmp = Path(cfg.output_dir) / ".final-tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, tokenizer=tokenizer)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    degenerate = {split: bool(record[f"{prefix}{split}/{CONSTANT}"]) for split in splits}
    return FinetuneResult(scores=final, curve=curve, train_size=task.size("train"), degenerate=degenerate,
                          rows_read=task.training_rows_read(),
                          selected_epoch=curve[chosen]["epoch"] if select else None)


def score_heads(cfg: FinetuneConfig, *, initial: tuple, stage_rows: dict) -> FinetuneResult:
    """Scores the stage model's own head of ``cfg.task`` on the scored splits, with no fine-tune
    (Xue's protocol for her joint and Reptile models). The stage must have trained on exactly the
    cell's training rows of the task (its ``stage.json``), so the score is leak-free as a fine-tune's.

    Args:
        initial: the stage's (model, tokenizer); the model is copied, not changed.
        stage_rows: the stage's ``stage.json`` tasks; it must list ``cfg.task``.
    """
    spec = get_task_spec(cfg.task)
    model = copy.deepcopy(initial[0])
    if spec.name not in model.heads or stage_rows is None or spec.name not in stage_rows:
        raise ConfigError(f"score: heads: the stage has no head trained on {spec.name}; list {spec.name} in "
                          "the method's train.tasks")
    task = build_tasks([spec], initial[1], data=cfg.data, max_length=cfg.encoder.max_length,
                       pair_max_length=cfg.encoder.pair_max_length)[spec.name]
    task = cell_task(task, seed=cfg.seed, fraction=None if cfg.per_class is not None else cfg.fraction,
                     per_class=cfg.per_class)
    check_stage_rows(spec.name, task.training_rows_read(), stage_rows)
    model.to(resolve_device(cfg.device)).eval()
    splits = tuple(cfg.finetune.eval_splits or spec.eval_splits)
    scores, degenerate = {}, {}
    with autocast(next(model.parameters()).device, check_precision(cfg.precision)):
        for split in splits:
            metrics = evaluate(model, task, split, flag_constant=True)
            degenerate[split] = bool(metrics.pop(CONSTANT))
            scores[split] = metrics
    curve = [{"epoch": 0.0, **{f"{split}/{k}": v for split, m in scores.items() for k, v in m.items()}}]
    return FinetuneResult(scores=scores, curve=curve, train_size=task.size("train"), degenerate=degenerate,
                          rows_read=task.training_rows_read())


def check_stage_rows(name: str, read: dict, stage_rows: dict | None) -> None:
    """Refuses a fine-tune whose training rows differ from what its stage read of the same task."""
    if not stage_rows or name not in stage_rows:
        return
    stage = stage_rows[name]
    if (stage["rows"], stage["indices_sha256"]) != (read["rows"], read["indices_sha256"]):
        raise ConfigError(f"task {name}: the training stage read {stage['rows']} of its training rows "
                          f"(digest {stage['indices_sha256'][:12]}), this fine-tune trains on {read['rows']} "
                          f"(digest {read['indices_sha256'][:12]}); a stage must see exactly the cell's rows")


class _Snapshot:
    """Keeps a copy of the weights at the best ``key`` evaluation so far (``select: best``), so the
    saved model is the one whose scores are reported; ties keep the earlier epoch, as the selection."""

    def __init__(self, model, key: str):
        self.model, self.key, self.best, self.state = model, key, None, None

    def wrap(self, stop):
        def check(evaluations: list[dict]) -> bool:
            score = evaluations[-1][self.key]
            if self.best is None or score > self.best:
                self.best = score
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            return stop(evaluations) if stop is not None else False
        return check

    def restore(self) -> None:
        if self.state is not None:
            self.model.load_state_dict(self.state)


def _patience_stop(key: str, patience: int):
    """Early stopping: True once ``patience`` evaluations in a row have not beaten the best one."""
    def stop(evaluations: list[dict]) -> bool:
        scores = [e[key] for e in evaluations]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return len(scores) - 1 - best >= patience
    return stop
