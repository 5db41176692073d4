"""The sweep: for each method, its training stages, then fine-tuning on every target, budget and
seed. Each finished fine-tune is a JSON file, so a killed sweep resumes where it stopped and
later issues only add methods.

Leak-free by construction: a stage that lists a target trains, for each (budget, seed) cell, on
exactly the rows that cell's fine-tune trains on (and loads no other split of the target); a stage
task that reads a target's file under another name is refused. Each stage writes ``stage.json``
(per task: split, rows, a digest of their indices) and every fine-tune checks it before training.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path


from metalm.builders import build_model
from metalm.experiments import SweepFailed
from metalm.config import ConfigError, check_same_settings, parse, to_dict
from metalm.experiments.references import task_references
from metalm.experiments.report import study_warnings, write_reports
from metalm.experiments.stats import aggregate, budget_label
from metalm.experiments.sampler_plots import plot_sampler_histories
from metalm.recipes import STAGE_FILE, check_step_bounds, run_finetune, run_train, score_heads
from metalm.schema import (ExperimentConfig, FinetuneConfig, FinetuneSettings, MethodConfig, SubsampleConfig,
                           TrainConfig)
from metalm.tasks.registry import get_task_spec
from metalm.files import write_text_atomic
from metalm.train.precision import check_precision
from metalm.train.lock import run_lock
from metalm.train.progress import Progress, note, quiet_libraries


@dataclass(frozen=True)
class Budget:
    """How much of a target's training split a cell uses: a fraction, or k examples per class."""

    fraction: float | None = None
    per_class: int | None = None

    @property
    def slug(self) -> str:
        return f"fraction-{self.fraction:g}" if self.fraction is not None else f"per_class-{self.per_class}"


@dataclass(frozen=True)
class Stage:
    """One training stage of a method: where it runs, its seed, and which targets it subsamples."""

    folder: Path
    seed: int
    subsample: dict[str, SubsampleConfig]


def budgets(cfg: ExperimentConfig) -> list[Budget]:
    return [Budget(fraction=f) for f in cfg.fractions] + [Budget(per_class=k) for k in cfg.per_class]


def stage_targets(method: MethodConfig, specs) -> list[str]:
    """Targets that ``method``'s stage lists; refuses a stage task reading a target's file under another name."""
    listed = [get_task_spec(t) for t in method.train.tasks]
    names = {s.name for s in specs}
    for task in listed:
        for target in specs:
            shared = sorted(set(task.files.values()) & set(target.files.values()))
            if task.name != target.name and shared:
                raise ConfigError(f"method {method.name!r}: stage task {task.name} reads {shared[0]}, a file of the "
                                  f"target {target.name}; list {target.name} itself (the runner then gives the stage "
                                  "only the cell's training rows) or drop the task")
    return [t.name for t in listed if t.name in names]


def plan_stage(cfg: ExperimentConfig, method: MethodConfig, specs, finetune: dict[str, FinetuneSettings],
               budget: Budget, seed: int) -> Stage | None:
    """The stage a (method, budget, seed) cell fine-tunes from (None: the encoder as loaded)."""
    if method.train is None or method.init is not None:
        return None
    root = Path(cfg.output_dir) / "methods" / _slug(method.name)
    stage_seed = seed if cfg.stage_seeds == "per_seed" else cfg.stage_seed
    listed = stage_targets(method, specs)
    if listed:  # the stage reads each listed target's rows of this very cell
        subsample = {t: SubsampleConfig(fraction=budget.fraction, per_class=budget.per_class, seed=seed,
                                        validation_fraction=finetune[t].validation_fraction
                                        if finetune[t].select == "best" else 0.0) for t in listed}
        return Stage(root / budget.slug / f"seed-{seed}", stage_seed, subsample)
    if cfg.stage_seeds == "per_seed":
        return Stage(root / f"seed-{seed}", stage_seed, {})
    return Stage(root, stage_seed, {})


def run_stage(cfg: ExperimentConfig, method: MethodConfig, stage: Stage, *, progress: bool) -> Path:
    """Trains (or resumes, or finds finished) a stage; returns its final model folder."""
    train_cfg = TrainConfig(train=method.train, encoder=cfg.encoder, data=cfg.data, seed=stage.seed,
                            device=cfg.device, precision=cfg.precision, output_dir=str(stage.folder),
                            subsample=stage.subsample)
    if cfg.stage_processes > 1:
        return _run_stage_processes(train_cfg, cfg.stage_processes)
    return run_train(train_cfg, resume=True, progress=progress)


def _run_stage_processes(train_cfg: TrainConfig, nproc: int) -> Path:
    """``metalm train STAGE --resume --nproc N``: the stage under torchrun with ``nproc`` processes
    (resuming what is there)."""
    import subprocess

    folder = Path(train_cfg.output_dir)
    final = folder / "final"
    if (final / "heads.json").exists():
        return final
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec = folder.parent / f".{folder.name}-stage.json"
    write_text_atomic(spec, json.dumps(to_dict(train_cfg), indent=1))
    command = [sys.executable, "-m", "metalm", "train", str(spec), "--resume", "--nproc", str(nproc)]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0 or not (final / "heads.json").exists():
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise RuntimeError(f"stage {folder} on {nproc} processes failed (exit {done.returncode}): "
                           f"{' '.join(command)}\n{tail}")
    spec.unlink()
    return final


def read_stage_rows(stage: Stage) -> dict:
    path = stage.folder / STAGE_FILE
    if not path.exists():
        raise ConfigError(f"stage {stage.folder}: {STAGE_FILE} is missing, so what it trained on cannot be checked; "
                          "delete the folder to train the stage again")
    return json.loads(path.read_text())["tasks"]


def target_finetune(cfg: ExperimentConfig, specs) -> dict[str, FinetuneSettings]:
    """Each target's fine-tuning settings: `finetune` with the target's `target_finetune` changes."""
    names = [s.name for s in specs]
    unknown = sorted(set(cfg.target_finetune) - set(names))
    if unknown:
        raise ConfigError(f"target_finetune.{unknown[0]}: not one of the targets {names}")
    settings = {name: parse(FinetuneSettings, _merge(to_dict(cfg.finetune), cfg.target_finetune[name]),
                            where=f"target_finetune.{name}") if name in cfg.target_finetune else cfg.finetune
                for name in names}
    check_step_bounds(cfg.finetune)
    for name in cfg.target_finetune:
        check_step_bounds(settings[name], where=f"target_finetune.{name}")
    return settings


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def run_settings(cfg: ExperimentConfig, method: MethodConfig, spec, finetune: FinetuneSettings,
                 stage: Stage | None) -> dict:
    """What a fine-tune result depends on besides target, budget and seed (checked on resume)."""
    precision = {} if cfg.precision == "fp32" else {"precision": cfg.precision}  # older results have no key
    stage_info = {} if stage is None else {"stage_seed": stage.seed,
                                           "stage_subsample": {t: to_dict(s) for t, s in stage.subsample.items()}}
    return json.loads(json.dumps({"method": to_dict(method), "encoder": to_dict(cfg.encoder),
                                  "finetune": to_dict(finetune), **stage_info,
                                  "source": cfg.data.source, "target": to_dict(spec), **precision}))


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> tuple[list[dict], dict[str, Path]]:
    """Runs (or resumes) the sweep; returns the result rows and the report paths. The sweep holds
    ``output_dir/.lock`` while it runs, so a second sweep into the same folder is refused."""
    with run_lock(cfg.output_dir, note=note):
        return _run_experiment(cfg, progress=progress)


def _plan(cfg: ExperimentConfig):
    """The targets, their fine-tuning settings, and every (method, budget, seed, target) cell, in
    the order that lets consecutive cells share a stage (per seed, or per budget and seed)."""
    specs = [get_task_spec(t) for t in cfg.targets]
    finetune = target_finetune(cfg, specs)
    jobs = [(m, b, seed, s) for m in cfg.methods for seed in cfg.seeds for b in budgets(cfg) for s in specs]
    return specs, finetune, jobs


def _cell(cfg: ExperimentConfig, specs, finetune, job):
    """A cell's display name, result path, stage and recorded settings."""
    method, budget, seed, spec = job
    name = f"{method.name} / {spec.name} @{budget_label((budget.fraction, budget.per_class))} seed {seed}"
    path = Path(cfg.output_dir) / "results" / _slug(method.name) / spec.name / budget.slug / f"seed-{seed}.json"
    stage = plan_stage(cfg, method, specs, finetune, budget, seed)
    return name, path, stage, run_settings(cfg, method, spec, finetune[spec.name], stage)


def _run_experiment(cfg: ExperimentConfig, *, progress: bool) -> tuple[list[dict], dict[str, Path]]:
    check_precision(cfg.precision)
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique, got {names}")
    specs, finetune, jobs = _plan(cfg)
    for method in cfg.methods:
        if method.train is not None:
            listed = stage_targets(method, specs)  # refuse a leaking stage before anything runs
            missing = [s.name for s in specs if s.name not in listed]
            if method.score == "heads" and missing:
                raise ConfigError(f"method {method.name!r}: score: heads scores the stage's own heads, but "
                                  f"train.tasks does not list the target(s) {', '.join(missing)}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=1))
    ran = {"processes": _run_pool, "slurm": _run_slurm}.get(cfg.executor, lambda *a, **k: set())(
        cfg, specs, finetune, jobs, progress=progress)
    rows: list[dict] = []
    curves: list[dict] = []
    loaded: dict[str, tuple] = {}  # stage folder -> (model, tokenizer), the latest only
    bar = Progress(jobs, desc="fine-tune runs", enabled=progress and not ran)
    for job in bar:
        method, budget, seed, spec = job
        cell_name, path, stage, settings = _cell(cfg, specs, finetune, job)
        bar.set_postfix_str(cell_name)
        if path.exists():
            result = json.loads(path.read_text())
            check_same_settings(result.get("settings", {}), settings, where=f"result {path}")
            if progress and path not in ran:
                note(f"skipped finished cell {cell_name} ({path})")
        else:
            result = _run_cell(cfg, job, finetune[spec.name], stage, settings, loaded, path=path, progress=progress)
        cell = {"method": method.name, "target": spec.name, "fraction": budget.fraction,
                "per_class": budget.per_class, "seed": seed}
        curves.append({**cell, "curve": result["curve"]})
        for split, metrics in result["scores"].items():
            for metric, value in metrics.items():
                rows.append({**cell, "split": split, "metric": metric, "value": value,
                             "train_size": result["train_size"], "scored": result.get("scored", "fine-tuned"),
                             "degenerate": bool(result.get("degenerate", {}).get(split, False))})
    bar.close()
    return rows, _report(cfg, specs, finetune, rows, curves)


def _run_cell(cfg: ExperimentConfig, job, finetune: FinetuneSettings, stage: Stage | None, settings: dict,
              loaded: dict, *, path: Path, progress: bool) -> dict:
    """Runs one cell (its stage first when that is not done) under the cell folder's lock, so two
    executors never run the same cell, and writes its result file; returns the result."""
    method, budget, seed, spec = job
    with run_lock(path.with_suffix(""), note=note):  # claims the cell
        if path.exists():  # another executor finished it meanwhile
            return json.loads(path.read_text())
        result = _fine_tune_cell(cfg, method, spec, finetune, budget, seed, stage, loaded, path=path,
                                 progress=progress)
        result["settings"] = settings
        write_text_atomic(path, json.dumps(result, indent=1))
    return result


def worker_threads(cfg: ExperimentConfig) -> int:
    """torch threads of each `executor: processes` worker: `threads`, else the CPUs shared out."""
    return cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers)


def _units(cfg: ExperimentConfig, specs, finetune, jobs) -> list[list[int]]:
    """The pool's units of work: the unfinished cells of one stage (which run it first, then
    fine-tune from it in turn), or one unfinished cell without a stage. Units with a stage go first,
    most cells first, so that the short stage-less cells fill the workers at the end."""
    units: dict[str, list[int]] = {}
    staged: set[str] = set()
    for i, job in enumerate(jobs):
        _, path, stage, _ = _cell(cfg, specs, finetune, job)
        if not path.exists():
            key = str(stage.folder) if stage is not None else str(path)
            units.setdefault(key, []).append(i)
            if stage is not None:
                staged.add(key)
    return [units[k] for k in sorted(units, key=lambda k: (k in staged, len(units[k])), reverse=True)]


def _run_pool(cfg: ExperimentConfig, specs, finetune, jobs, *, progress: bool) -> set[Path]:
    """Runs every unfinished cell on a pool of `cfg.workers` processes; returns their result paths."""
    units = _units(cfg, specs, finetune, jobs)
    if not units:
        return set()
    threads = worker_threads(cfg)
    if progress:
        note(f"running {sum(map(len, units))} cell(s) in {len(units)} unit(s) on {cfg.workers} worker "
             f"processes, {threads} torch thread(s) each")
    # spawn, not fork: a forked child of a process that has started torch's thread pool can hang.
    context = multiprocessing.get_context("spawn")
    done: set[Path] = set()
    with concurrent.futures.ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context) as pool:
        futures = [pool.submit(run_unit, cfg, unit, threads) for unit in units]
        bar = Progress(concurrent.futures.as_completed(futures), total=len(futures), desc="units",
                       enabled=progress)
        try:
            for future in bar:
                names = future.result()  # a worker's error is raised here
                done.update(names)
                bar.set_postfix_str(f"{len(done)} cell(s) done")
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return done


def _run_slurm(cfg: ExperimentConfig, specs, finetune, jobs, *, progress: bool) -> set[Path]:
    """Runs every unfinished unit as one job of a Slurm job array (submitit); the unfinished cells
    of failed jobs are submitted again up to `slurm.retries` times. Returns the finished cells' paths.
    Each job claims its cells as the pool's workers do, so a cell never runs twice."""
    try:
        import submitit
    except ImportError as err:
        raise ConfigError("executor: slurm needs submitit: pip install 'metalm[slurm]' (or pip install submitit)") \
            from err
    settings = cfg.slurm
    folder = Path(settings.folder or Path(cfg.output_dir) / "slurm")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=None if settings.cluster == "auto" else settings.cluster)
    params = {"name": f"metalm-{Path(cfg.output_dir).name}", "timeout_min": settings.timeout_min,
              "cpus_per_task": settings.cpus_per_task, "slurm_array_parallelism": settings.array_parallelism}
    if settings.partition:
        params["slurm_partition"] = settings.partition
    if settings.gpus_per_node:
        params["gpus_per_node"] = settings.gpus_per_node
    if settings.mem_gb:
        params["mem_gb"] = settings.mem_gb
    if settings.additional:
        params["slurm_additional_parameters"] = dict(settings.additional)
    executor.update_parameters(**params)
    threads = cfg.threads or settings.cpus_per_task
    done: set[Path] = set()
    failures: list[str] = []
    for attempt in range(settings.retries + 1):
        units = _units(cfg, specs, finetune, jobs)
        if not units:
            break
        if progress:
            again = f" (attempt {attempt + 1} of {settings.retries + 1})" if attempt else ""
            note(f"submitting {sum(map(len, units))} cell(s) as {len(units)} job(s) to {executor.cluster}{again}; "
                 f"logs under {folder}")
        submitted = executor.map_array(run_unit, [cfg] * len(units), units, [threads] * len(units))
        failures = []
        bar = Progress(list(zip(submitted, units)), desc="jobs", enabled=progress)
        for job, unit in bar:  # in submission order: every job is waited for anyway
            try:
                done.update(job.result())
            except Exception as err:  # the job's own error, or its death (time limit, memory, node)
                cells = ", ".join(_cell(cfg, specs, finetune, jobs[i])[0] for i in unit)
                failures.append(f"job {job.job_id} ({cells}): {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}; "
                                f"logs: {job.paths.stdout.parent}")
                if progress:
                    note(f"warning: {failures[-1]}")
            bar.set_postfix_str(f"{len(done)} cell(s) done")
        if not failures:
            break
    if failures:
        raise SweepFailed(f"{len(failures)} job(s) of the sweep in {cfg.output_dir} failed on every one of "
                          f"{settings.retries + 1} attempt(s) (slurm.retries: {settings.retries}); the finished cells "
                          "are kept, so running the sweep again resumes it:\n  " + "\n  ".join(failures))
    return done


def run_unit(cfg: ExperimentConfig, indices: list[int], threads: int) -> list[Path]:
    """A pool worker: runs the cells ``indices`` of ``cfg``'s plan in order; returns their paths."""
    import torch

    quiet_libraries()
    torch.set_num_threads(threads)
    specs, finetune, jobs = _plan(cfg)
    loaded: dict[str, tuple] = {}
    paths = []
    for i in indices:
        _, path, stage, settings = _cell(cfg, specs, finetune, jobs[i])
        if not path.exists():
            _run_cell(cfg, jobs[i], finetune[jobs[i][3].name], stage, settings, loaded, path=path, progress=False)
        paths.append(path)
    return paths


def _fine_tune_cell(cfg: ExperimentConfig, method: MethodConfig, spec, finetune: FinetuneSettings, budget: Budget,
                    seed: int, stage: Stage | None, loaded: dict, *, path: Path, progress: bool) -> dict:
    """Runs one cell's stage (when it has one and it is not done yet) and its fine-tune."""
    init = method.init
    stage_rows = None
    if stage is not None:
        init = str(run_stage(cfg, method, stage, progress=progress))
        stage_rows = read_stage_rows(stage)
    key = init or ""
    if key not in loaded:
        loaded.clear()
        loaded[key] = build_model(cfg.encoder, seed=cfg.stage_seed, init=init)
    ft_cfg = FinetuneConfig(task=spec, encoder=cfg.encoder, data=cfg.data, finetune=finetune, init=init,
                            fraction=budget.fraction if budget.fraction is not None else 1.0,
                            per_class=budget.per_class, seed=seed, device=cfg.device, precision=cfg.precision,
                            output_dir=str(path.with_suffix("")), save_model=False)
    if method.score == "heads":  # the stage's own head, no fine-tune (Xue)
        res = score_heads(ft_cfg, initial=loaded[key], stage_rows=stage_rows)
    else:
        res = run_finetune(ft_cfg, progress=False, tensorboard=False, initial=loaded[key], stage_rows=stage_rows)
    return {"scored": "stage heads" if method.score == "heads" else "fine-tuned", "scores": res.scores,
            "curve": res.curve, "train_size": res.train_size, "degenerate": res.degenerate,
            "rows_read": res.rows_read, "selected_epoch": res.selected_epoch,
            "stage": None if stage is None else {"folder": str(stage.folder), "seed": stage.seed,
                                                 "rows_read": {t: stage_rows[t] for t in stage.subsample}}}


def _report(cfg: ExperimentConfig, specs, finetune, rows: list[dict], curves: list[dict]) -> dict[str, Path]:
    out = Path(cfg.output_dir)
    names = [m.name for m in cfg.methods]
    headline = {s.name: ((finetune[s.name].eval_splits or s.eval_splits)[0], s.metrics[0]) for s in specs}
    references = experiment_references(cfg, specs, finetune) if cfg.references else []
    baseline = cfg.baseline or names[0]
    note = _note(cfg)
    paths = write_reports(rows, out, headline=headline, methods=names, title=cfg.title, note=note, curves=curves,
                          baseline=baseline, references=references,
                          metrics={s.name: list(s.metrics) for s in specs})
    for warning in study_warnings(aggregate(rows), baseline=baseline, headline=headline, references=references):
        print(f"metalm: warning: {warning}", file=sys.stderr)
    # Adaptive samplers' weights and rewards (Wu et al. Figs. 2-3); uniform = MOMETAS with β = 0.
    uniform = next((_slug(m.name) for m in cfg.methods if m.train and m.train.sampler.kind == "mometas"
                    and m.train.sampler.meta_lr == 0), None)
    paths.update(plot_sampler_histories(out, uniform=uniform))
    return paths


def experiment_references(cfg: ExperimentConfig, specs, finetune) -> list[dict]:
    """Majority-class / constant / zero-shot references of every target (cached in references.json)."""
    path = Path(cfg.output_dir) / "references.json"
    key = json.loads(json.dumps({"encoder": to_dict(cfg.encoder), "source": cfg.data.source,
                                 "targets": [to_dict(s) for s in specs],
                                 "splits": {s.name: list(finetune[s.name].eval_splits or s.eval_splits)
                                            for s in specs}}))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["references"]
    model = tokenizer = None
    if any(s.kind == "regression" and "text_b" in s.columns for s in specs):
        model, tokenizer = build_model(cfg.encoder, seed=cfg.stage_seed)
    refs = []
    for spec in specs:
        refs += task_references(spec, finetune[spec.name].eval_splits or spec.eval_splits, data=cfg.data,
                                model=model, tokenizer=tokenizer, max_length=cfg.encoder.max_length)
    write_text_atomic(path, json.dumps({"key": key, "references": refs}, indent=1))
    return refs


def _note(cfg: ExperimentConfig) -> str:
    note = f"encoder: {cfg.encoder.name}; fine-tuning: {cfg.finetune.epochs} epochs, lr {cfg.finetune.optim.lr:g}"
    if cfg.finetune.min_steps:
        note += f", at least {cfg.finetune.min_steps} steps"
    if cfg.finetune.max_steps:
        note += f", at most {cfg.finetune.max_steps} steps"
    if cfg.finetune.select == "best":
        note += f", epoch chosen on {cfg.finetune.validation_fraction:.0%} of each cell's training rows"
    for name, changes in cfg.target_finetune.items():
        note += f"; {name}: " + ", ".join(f"{k} {v}" for k, v in _flat(changes))
    if any(m.train is not None and m.init is None for m in cfg.methods):
        note += ("; stages: one per seed (stage_seeds: per_seed)" if cfg.stage_seeds == "per_seed"
                 else f"; stages: one per method, seed {cfg.stage_seed} (stage_seeds: shared)")
    heads = [m.name for m in cfg.methods if m.score == "heads"]
    if heads:
        note += ("; scored by their stage's own heads, without fine-tuning (score: heads): " + ", ".join(heads))
    if cfg.notes:
        note += "\n\n" + cfg.notes.strip()
    return note


def _flat(changes: dict, prefix: str = ""):
    for key, value in changes.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-").lower()
