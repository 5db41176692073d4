"""The training loop every method shares.

Each step: the sampler picks tasks, their batch streams give support and query batches, the
algorithm writes gradients, and the loop clips, steps the optimiser and scheduler, logs,
evaluates and checkpoints. Everything a step depends on (model, optimiser, scheduler,
sampler, streams, RNG) is in the checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from metalm.contracts import Algorithm, Communicator, Episode, EpisodeSource, LocalCommunicator, Sampler, Task
from metalm.data.batching import BatchStream, to_device
from metalm.train.checkpoint import (CheckpointError, derived_seed, latest_checkpoint, load_checkpoint, remove_stale_temporaries,
                                    rng_state, save_checkpoint, set_rng_state)
from metalm.train.distributed import share
from metalm.train.evaluate import evaluate
from metalm.train.feedback import encoder_grad_norm, validation_losses
from metalm.train.groups import OptimGroup, accumulate, single_group, step_groups, zero_groups
from metalm.train.groups import clip_norm as clip_grads
from metalm.train.logging import RunLogger
from metalm.train.precision import autocast, check_precision
from metalm.train.progress import Progress, note


class TrainingDiverged(RuntimeError):
    """A step gave a non-finite loss or gradient; the run stops before applying it."""


@dataclass
class LoopResult:
    step: int
    last_loss: float
    evaluations: list[dict] = field(default_factory=list)
    skipped: int = 0
    """Steps skipped for a non-finite loss or gradient (``skip_nonfinite``), over the whole run."""


def make_streams(tasks: Mapping[str, Task], *, batch_size: int | Mapping[str, int], seed: int,
                 group_by_length: bool = False) -> dict[str, BatchStream]:
    """One seeded stream per task over its training split (seed offset by task order); with
    ``group_by_length``, length-grouped batches for every task that has ``lengths(split)``."""
    sizes = batch_size if isinstance(batch_size, Mapping) else {n: batch_size for n in tasks}
    streams = {}
    for i, (name, task) in enumerate(tasks.items()):
        lengths = task.lengths("train") if group_by_length else None
        streams[name] = BatchStream(task.size("train"), sizes[name], seed=seed * 1000 + i, lengths=lengths)
    return streams


def input_fingerprints(tasks: Mapping[str, Task]) -> dict[str, dict]:
    """Task -> what its training data came from: ``Task.fingerprint`` (spec, files, tokenizer) and
    the digest of the cell's rows; tasks that carry neither (corpus objectives) are left out."""
    out = {}
    for name, task in tasks.items():
        entry = {"fingerprint": task.fingerprint, "rows": (task.rows_read or {}).get("indices_sha256")}
        if any(entry.values()):
            out[name] = entry
    return out


def check_same_inputs(checkpoint: Path, then: Mapping | None, now: Mapping) -> None:
    """Refuses a resume whose tasks' data or specs changed since the checkpoint was written (a
    checkpoint from before fingerprints were recorded is not checked)."""
    if then is None:
        return
    changed = sorted(n for n in set(then) | set(now) if then.get(n) != now.get(n))
    if changed:
        what = ", ".join(f"{n} ({_what_changed(then.get(n), now.get(n))})" for n in changed)
        raise CheckpointError(f"{checkpoint}: cannot resume: the inputs changed since this checkpoint was written: "
                              f"{what}. Restore them, or start afresh with --overwrite or another output_dir")


def _what_changed(then: Mapping | None, now: Mapping | None) -> str:
    if then is None:
        return "not in the checkpoint's run"
    if now is None:
        return "no longer in the run"
    parts = [label for key, label in (("fingerprint", "spec, files or tokenizer"), ("rows", "rows of the cell"))
             if then.get(key) != now.get(key)]
    return " and ".join(parts)


def train_loop(*, model: torch.nn.Module, tasks: Mapping[str, Task], algorithm: Algorithm, sampler: Sampler,
               optimizer: torch.optim.Optimizer | None = None, scheduler=None, steps: int,
               batch_size: int | Mapping[str, int],
               seed: int, run_dir: str | Path, tasks_per_step: int = 1, clip_norm: float | None = 1.0,
               log_every: int = 10, checkpoint_every: int = 0, eval_every: int = 0,
               eval_tasks: Mapping[str, tuple[str, ...]] | None = None, resume: bool = False,
               progress: bool = True, on_step: Callable[[int], None] | None = None,
               tensorboard: bool = True, precision: str = "fp32",
               group_by_length: bool = False, evaluator: Callable[..., dict] = evaluate,
               stop: Callable[[list[dict]], bool] | None = None, all_tasks: bool = False,
               before_step: Callable[[int], None] | None = None, skip_nonfinite: int = 0,
               comm: Communicator | None = None, groups: Sequence[OptimGroup] | None = None,
               grad_accum: int = 1, source: EpisodeSource | None = None) -> LoopResult:
    """Runs ``steps`` optimiser steps (from a checkpoint when ``resume`` and one exists).

    Args:
        optimizer, scheduler, clip_norm: one optimiser group over the whole model (when ``groups``
            is None).
        groups: the optimiser groups (``metalm.train.groups``): each clipped by its own norm, then
            each optimiser and scheduler stepped, in order. The first group's learning rate is the
            logged ``lr`` and its norm the logged ``grad_norm`` when there is one group; with several,
            ``lr/<name>`` and ``grad_norm/<name>`` each, ``grad_norm`` their combined norm.
        grad_accum: algorithm steps per optimiser step, each on freshly drawn episodes; the
            gradients of each are divided by ``grad_accum`` and added up (``groups.accumulate``), the
            step statistics averaged.
        source: where episodes come from instead of ``tasks`` and their batch streams
            (``contracts.EpisodeSource``, not with ``all_tasks``): ``next_episodes(step, i)`` for
            each micro-batch ``i`` of a step; its state is checkpointed. The sampler is still
            updated, asked for feedback and checkpointed, but not sampled by the loop. With several
            processes the source must be seekable and ``grad_accum`` at least the number of
            processes: micro-batch ``i`` runs on process ``i mod world_size`` and the gradients are
            summed, so the step equals the one-process step over the same micro-batches.
        tasks_per_step: episodes per step (the meta-batch; 1 for plain multi-task training).
        eval_every: evaluate ``eval_tasks`` (task -> splits) every this many steps and at the end.
        checkpoint_every: checkpoint every this many steps and at the end (0: never).
        on_step: called with the step number after each step (tests use it to simulate a kill).
        precision: ``fp32`` or ``bf16`` (autocast for the algorithm's step, meta-tests and evaluation;
            ``metalm.train.precision``).
        group_by_length: batches of rows of similar length (``BatchStream`` with ``lengths``), less padding.
        evaluator: ``(model, task, split) -> {metric: value}`` for each evaluation (default ``evaluate``).
        stop: called with the evaluations so far after each one; True ends the run there (early stopping).
        all_tasks: one episode of every task at each step, in task order, instead of ``tasks_per_step``
            sampled ones (Xue Eq. 1); the sampler still receives ``update`` but draws nothing.
        before_step: called with the number of steps done before each step (also after a resume),
            after the algorithm's own ``at_step`` (e.g. Reptile's decaying inner learning rate).
        skip_nonfinite: how many steps with a non-finite loss or gradient norm may be skipped
            (no parameter, optimiser or sampler update; the schedule still advances; a ``skipped``
            log event each); the next such step raises `TrainingDiverged`, as the first does at 0.
        comm: the seam to other processes (``metalm.contracts.Communicator``; one process by
            default). With several (``metalm.train.distributed``), each step's episodes are split
            into contiguous shares, one per process; every process draws the same tasks and
            advances every batch stream, but builds and runs only its share. The outer gradients
            and step statistics are summed with each share's weight before clipping, so every
            process applies the same update; only rank 0 writes logs and checkpoints (which keep
            every process's RNG state).
    """
    comm = comm if comm is not None else LocalCommunicator()
    if groups is None:
        if optimizer is None or scheduler is None:
            raise TypeError("train_loop needs an optimizer and a scheduler, or groups")
        groups = [single_group(model.parameters(), optimizer, scheduler, clip_norm)]
    elif optimizer is not None or scheduler is not None:
        raise TypeError("train_loop takes either optimizer and scheduler or groups, not both")
    groups = list(groups)
    if len({g.name for g in groups}) != len(groups) or any("/" in g.name for g in groups):
        raise ValueError(f"optimiser group names must be distinct and without '/': {[g.name for g in groups]}")
    owned = {id(p) for p in model.parameters()}
    if any(id(p) not in owned for g in groups for p in g.params):
        raise ValueError("every optimiser group's parameters must be parameters of the model the loop trains")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, got {grad_accum}")
    if source is not None and all_tasks:
        raise ValueError(f"{run_dir}: an episode source runs without all_tasks")
    if source is not None and comm.world_size > 1 and not source.seekable:
        raise ValueError(f"{run_dir}: this episode source draws in call order, so it runs on one process only")
    if source is not None and comm.world_size > grad_accum:
        raise ValueError(f"{run_dir}: {grad_accum} micro-batch(es) per step cannot be shared by {comm.world_size} "
                         "processes: set grad_accum to at least the number of processes (a multiple of it for "
                         "equal shares), or start fewer processes")
    first, more = groups[0], [(g.name, g.optimizer, g.scheduler) for g in groups[1:]]
    main = comm.rank == 0
    say = note if main else _silent
    count = len(tasks) if all_tasks else tasks_per_step
    if source is None and comm.world_size > count:
        raise ValueError(f"{run_dir}: {count} episode(s) per step cannot be shared by {comm.world_size} processes: "
                         f"set train.tasks_per_step to at least {comm.world_size} (a multiple of it for equal "
                         "shares), or start fewer processes")
    if source is None:
        mine = share(count, comm.rank, comm.world_size)
        weight = len(mine) / count if algorithm.reduction == "mean" else 1.0
        stats_weight = weight
    else:  # this process's micro-batches; each one's gradient is already divided by grad_accum
        weight, stats_weight = 1.0, len(range(comm.rank, grad_accum, comm.world_size)) / grad_accum
    streams = make_streams(tasks, batch_size=batch_size, seed=seed, group_by_length=group_by_length)
    device = next(model.parameters()).device
    mixed = functools.partial(autocast, device, check_precision(precision))  # a fresh context each use
    start = 0
    if main:
        stale = remove_stale_temporaries(run_dir)
        if stale:
            note(f"removed {stale} unfinished checkpoint write(s) under {Path(run_dir) / 'checkpoints'}")
    checkpoint = latest_checkpoint(run_dir, warn=lambda m: note(f"warning: {m}")) if resume and main else None
    checkpoint = comm.broadcast_object(checkpoint)  # every process resumes from the checkpoint rank 0 chose
    machine = {"threads": torch.get_num_threads(), "device": str(device)}
    if comm.world_size > 1:
        machine["world_size"] = comm.world_size
    inputs = input_fingerprints(tasks)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=first.optimizer, scheduler=first.scheduler,
                                more=more)
        check_same_inputs(checkpoint, state.get("inputs"), inputs)
        start = state["step"]
        then = state.get("machine")
        if then is not None and then != machine:
            say(f"warning: resuming with {machine} where the checkpoint was written with {then}; the run "
                "continues (every process reads the same sampler and batch-stream state, so the data order is "
                "unchanged), but bit-exact resumption holds only with the same thread count, device and number "
                "of processes")
        ranks = state.get("rng_ranks")
        if ranks and comm.rank < len(ranks):
            set_rng_state(ranks[comm.rank])
        elif comm.rank > 0:
            torch.manual_seed(_rank_seed(seed, comm.rank, start))
        sampler.load_state_dict(state["sampler"])
        if source is not None:
            source.load_state_dict(state["source"])
        for name, stream_state in state["streams"].items():
            streams[name].load_state_dict(stream_state)
    elif comm.rank > 0:
        torch.manual_seed(_rank_seed(seed, comm.rank, 0))  # dropout: each process draws its own masks
    comm.broadcast_module(model)
    logger = (RunLogger(run_dir, resume_step=start if checkpoint is not None else None, tensorboard=tensorboard)
              if main else _NoLogger())
    result = LoopResult(step=start, last_loss=float("nan"),
                        skipped=int(state.get("skipped", 0)) if checkpoint is not None else 0)
    model.train()
    if checkpoint is not None:
        say(f"resumed {run_dir} from step {start} ({checkpoint})")
    bar = Progress(range(start, steps), initial=start, total=steps, desc=f"train {Path(run_dir).name}",
                   enabled=progress and main)
    try:
        if start == 0:
            with mixed():
                _meta_test(sampler, model, tasks, 0, seed, comm)
        for step in bar:
            algorithm.at_step(step)
            if before_step is not None:
                before_step(step)
            zero_groups(groups)
            model.zero_grad(set_to_none=True)  # parameters outside every group too: nothing carries over
            drawn, micro_stats = [], []
            for index in range(grad_accum):
                if source is not None:
                    if index % comm.world_size != comm.rank:
                        continue  # another process's micro-batch
                    episodes = source.next_episodes(step, index)
                    micro = [[e.task] for e in episodes]
                else:
                    micro = [_draw(sampler, algorithm, name=n) for n in tasks] if all_tasks else \
                        [_draw(sampler, algorithm) for _ in range(tasks_per_step)]
                    episodes = [_episode(names, tasks, streams, device, algorithm.cross_task_support,
                                         build=i in mine) for i, names in enumerate(micro)]
                    episodes = [e for e in episodes if e is not None]
                drawn += micro
                with mixed():
                    if grad_accum == 1:
                        micro_stats.append(algorithm.step(model, episodes))
                    else:
                        micro_stats.append(accumulate(list(model.parameters()), grad_accum,
                                                      lambda: algorithm.step(model, episodes)))  # noqa: B023
            stats = _mean_stats(micro_stats)
            if comm.world_size > 1:
                comm.reduce_gradients([p for p in model.parameters() if p.requires_grad], weight)
                stats = comm.reduce_mean(stats, stats_weight)
            else:
                comm.reduce_gradients([p for p in model.parameters() if p.grad is not None], weight)
            if sampler.request(step + 1).encoder_grad_norm:
                stats["encoder_grad_norm"] = encoder_grad_norm(model)
            norms = {g.name: _clip([p for p in g.params if p.grad is not None], g.clip_norm) for g in groups}
            grad_norm = norms[first.name] if len(groups) == 1 else math.sqrt(math.fsum(v * v for v in norms.values()))
            finite = math.isfinite(stats.get("loss", 0.0)) and math.isfinite(grad_norm)
            done = step + 1
            stopping = False
            if not finite:
                names = sorted({t for d in drawn for t in d})
                what = f"step {done}: loss {stats.get('loss')} and gradient norm {grad_norm} on task(s) {', '.join(names)}"
                if result.skipped >= skip_nonfinite:
                    limit = (f" after {result.skipped} skipped step(s) (train.skip_nonfinite: {skip_nonfinite})"
                             if skip_nonfinite else " (train.skip_nonfinite can allow skipping some)")
                    raise TrainingDiverged(f"{run_dir}: {what}; nothing was updated at this step{limit}; lower the "
                                           "learning rate, or check the data")
                result.skipped += 1
                zero_groups(groups)
                for group in groups:
                    group.scheduler.step()  # the schedule keeps its length; parameters, moments and sampler stay
                say(f"warning: {run_dir}: skipped {what} ({result.skipped} of at most {skip_nonfinite})")
                logger.log({"event": "skipped", "step": done, "tasks": names, "loss": str(stats.get("loss")),
                            "grad_norm": str(grad_norm), "skipped": result.skipped})
                result.step = done
            else:
                step_groups(groups)
                sampler.update({"tasks": [d[-1] for d in drawn], **stats})
                with mixed():
                    _meta_test(sampler, model, tasks, done, seed, comm)
                result.step, result.last_loss = done, stats.get("loss", float("nan"))
                if log_every and (done % log_every == 0 or done == steps):
                    rates = {"lr": first.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
                    if len(groups) > 1:
                        rates.update({f"lr/{g.name}": g.scheduler.get_last_lr()[0] for g in groups})
                        rates.update({f"grad_norm/{n}": v for n, v in norms.items()})
                    logger.log({"event": "train", "step": done, "task": drawn[0][-1], **rates, **stats})
                    bar.set_postfix(loss=f"{result.last_loss:.4f}")
            if eval_tasks and ((eval_every and done % eval_every == 0) or done == steps):
                with mixed():
                    record = {"event": "eval", "step": done, **_evaluate_all(model, tasks, eval_tasks, evaluator)}
                logger.log(record)
                result.evaluations.append(record)
                model.train()
                stopping = stop is not None and stop(result.evaluations)
            if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                ranks = comm.gather_object(rng_state()) if comm.world_size > 1 else None
                if main:
                    extra = {"sampler": sampler.state_dict(), "streams": {n: s.state_dict() for n, s in streams.items()},
                             "machine": machine, "inputs": inputs, "skipped": result.skipped}
                    if ranks is not None:
                        extra["rng_ranks"] = ranks
                    if source is not None:
                        extra["source"] = source.state_dict()
                    save_checkpoint(run_dir, done, model=model, optimizer=first.optimizer, scheduler=first.scheduler,
                                    state=extra, more=more)
                comm.barrier()  # no process runs ahead of a checkpoint that is still being written
            if on_step is not None:
                on_step(done)
            if stopping:
                break
    finally:
        bar.close()
        logger.close()
    return result


def _draw(sampler: Sampler, algorithm: Algorithm, name: str | None = None) -> list[str]:
    """The tasks of one episode's batches, support batches then the query: all the episode's task
    (``name``, or one drawn from the sampler) or, with cross-task support, each drawn (Lv et al.)."""
    if algorithm.cross_task_support:
        return [sampler.sample() for _ in range(algorithm.support_batches + 1)]
    name = sampler.sample() if name is None else name
    return [name] * (algorithm.support_steps(name) + 1)


def _episode(names: list[str], tasks: Mapping[str, Task], streams: Mapping[str, BatchStream],
             device: torch.device, cross_task: bool, *, build: bool = True) -> Episode | None:
    """Support batches then one query batch, different batches of the episode's task (Dou §2.2), or
    of each batch's own task with cross-task support. Every process advances the streams for every
    episode; with ``build`` false (another process's share) no batch is built and None is returned."""
    rows = [streams[n].next_indices() for n in names]
    if not build:
        return None
    batches = [to_device(tasks[n].batch("train", r), device) for n, r in zip(names, rows)]
    return Episode(task=names[-1], support=tuple(batches[:-1]), query=batches[-1],
                   support_tasks=tuple(names[:-1]) if cross_task else ())


def _meta_test(sampler: Sampler, model: torch.nn.Module, tasks: Mapping[str, Task], done: int, seed: int,
               comm: Communicator) -> None:
    """Validation losses of every task for samplers that request them (MOMETAS) after ``done`` steps
    (train mode, seeded dropout and rows: ``validation_losses``), averaged over processes."""
    request = sampler.request(done)
    if request.validation:
        losses = validation_losses(model, tasks, batch_size=request.validation_batch_size, seed=seed, step=done)
        sampler.update({"validation_losses": comm.reduce_mean(losses)})


def _silent(message: str) -> None:
    """Processes other than rank 0 say nothing (rank 0 speaks for the run)."""


class _NoLogger:
    """Processes other than rank 0 write no log."""

    def log(self, record: Mapping) -> None:
        return None

    def close(self) -> None:
        return None


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of process ``rank`` (> 0) when it starts at ``step`` without its own saved RNG
    state; rank 0 keeps the seed the recipe set, as a one-process run does."""
    return derived_seed(seed, rank, step)


def _clip(params: list[torch.Tensor], clip_norm: float | None) -> float:
    """The gradients' total norm before clipping (``params``: those with a gradient), clipped to
    ``clip_norm`` unless it is None or <= 0 (``groups.clip_norm``; one call per group)."""
    return clip_grads(params, clip_norm)


def _mean_stats(micro: list[dict]) -> dict:
    """The step statistics of ``grad_accum`` algorithm steps: each value averaged over the steps
    that report it (one step's statistics unchanged)."""
    if len(micro) == 1:
        return dict(micro[0])
    keys = list(dict.fromkeys(k for m in micro for k in m))
    return {k: sum(m[k] for m in micro if k in m) / sum(k in m for m in micro) for k in keys}


def _evaluate_all(model, tasks: Mapping[str, Task], eval_tasks: Mapping[str, tuple[str, ...]],
                  evaluator: Callable[..., dict] = evaluate) -> dict:
    record = {}
    for name, splits in eval_tasks.items():
        for split in splits:
            for metric, value in evaluator(model, tasks[name], split).items():
                record[f"{name}/{split}/{metric}"] = value
    return record
