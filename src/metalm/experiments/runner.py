"""The sweep: for each method, its training stage (once), then fine-tuning on every target,
data fraction and seed. Each finished fine-tune is a JSON file, so a killed sweep resumes
where it stopped and later issues only add methods.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from metalm.builders import build_model
from metalm.config import ConfigError, check_same_settings, parse, to_dict
from metalm.experiments.report import write_reports
from metalm.experiments.sampler_plots import plot_sampler_histories
from metalm.recipes import check_step_bounds, run_finetune, run_train
from metalm.schema import ExperimentConfig, FinetuneConfig, FinetuneSettings, MethodConfig, TrainConfig
from metalm.tasks.registry import get_task_spec
from metalm.train.checkpoint import write_text_atomic
from metalm.train.precision import check_precision


def method_init(cfg: ExperimentConfig, method: MethodConfig, *, progress: bool) -> str | None:
    """The model folder a method fine-tunes from (training it first, resumably, when needed)."""
    if method.init is not None:
        return method.init
    if method.train is None:
        return None
    train_cfg = TrainConfig(train=method.train, encoder=cfg.encoder, data=cfg.data, seed=cfg.stage_seed,
                            device=cfg.device, precision=cfg.precision,
                            output_dir=str(Path(cfg.output_dir) / "methods" / _slug(method.name)))
    return str(run_train(train_cfg, resume=True, progress=progress))


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


def run_settings(cfg: ExperimentConfig, method: MethodConfig, spec, finetune: FinetuneSettings) -> dict:
    """What a fine-tune result depends on besides target, fraction and seed (checked on resume)."""
    precision = {} if cfg.precision == "fp32" else {"precision": cfg.precision}  # older results have no key
    return json.loads(json.dumps({"method": to_dict(method), "encoder": to_dict(cfg.encoder),
                                  "finetune": to_dict(finetune), "stage_seed": cfg.stage_seed,
                                  "source": cfg.data.source, "target": to_dict(spec), **precision}))


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True) -> tuple[list[dict], dict[str, Path]]:
    """Runs (or resumes) the sweep; returns the result rows and the report paths."""
    check_precision(cfg.precision)
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    specs = [get_task_spec(t) for t in cfg.targets]
    finetune = target_finetune(cfg, specs)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=1))
    jobs = [(m, s, f, seed) for m in cfg.methods for s in specs for f in cfg.fractions for seed in cfg.seeds]
    rows: list[dict] = []
    curves: list[dict] = []
    inits: dict[str, str | None] = {}
    models: dict[str, tuple] = {}  # method -> (model, tokenizer) as loaded, copied for each run
    bar = tqdm(jobs, desc="fine-tune runs", disable=not progress or None, dynamic_ncols=True)
    for method, spec, fraction, seed in bar:
        bar.set_postfix_str(f"{method.name} / {spec.name} @{fraction:g} seed {seed}")
        path = out / "results" / _slug(method.name) / spec.name / f"fraction-{fraction:g}" / f"seed-{seed}.json"
        settings = run_settings(cfg, method, spec, finetune[spec.name])
        if path.exists():
            result = json.loads(path.read_text())
            check_same_settings(result.get("settings", {}), settings, where=f"result {path}")
        else:
            if method.name not in inits:
                inits[method.name] = method_init(cfg, method, progress=progress)
                models = {method.name: build_model(cfg.encoder, seed=cfg.stage_seed, init=inits[method.name])}
            ft_cfg = FinetuneConfig(task=spec, encoder=cfg.encoder, data=cfg.data, finetune=finetune[spec.name],
                                    init=inits[method.name], fraction=fraction, seed=seed, device=cfg.device,
                                    precision=cfg.precision,
                                    output_dir=str(path.with_suffix("")))
            res = run_finetune(ft_cfg, progress=False, tensorboard=False, initial=models[method.name])
            result = {"scores": res.scores, "curve": res.curve, "train_size": res.train_size, "settings": settings}
            write_text_atomic(path, json.dumps(result, indent=1))
        curves.append({"method": method.name, "target": spec.name, "fraction": fraction, "seed": seed,
                       "curve": result["curve"]})
        for split, metrics in result["scores"].items():
            for metric, value in metrics.items():
                rows.append({"method": method.name, "target": spec.name, "fraction": fraction, "seed": seed,
                             "split": split, "metric": metric, "value": value, "train_size": result["train_size"]})
    bar.close()
    headline = {s.name: ((finetune[s.name].eval_splits or s.eval_splits)[0], s.metrics[0]) for s in specs}
    note = f"encoder: {cfg.encoder.name}; fine-tuning: {cfg.finetune.epochs} epochs, lr {cfg.finetune.optim.lr:g}"
    if cfg.finetune.min_steps:
        note += f", at least {cfg.finetune.min_steps} steps"
    if cfg.finetune.max_steps:
        note += f", at most {cfg.finetune.max_steps} steps"
    for name, changes in cfg.target_finetune.items():
        note += f"; {name}: " + ", ".join(f"{k} {v}" for k, v in _flat(changes))
    if cfg.notes:
        note += "\n\n" + cfg.notes.strip()
    paths = write_reports(rows, out, headline=headline, methods=names, title=cfg.title, note=note, curves=curves)
    # Adaptive samplers' weights and rewards (Wu et al. Figs. 2-3); uniform = MOMETAS with β = 0.
    uniform = next((_slug(m.name) for m in cfg.methods if m.train and m.train.sampler.kind == "mometas"
                    and m.train.sampler.meta_lr == 0), None)
    paths.update(plot_sampler_histories(out, uniform=uniform))
    return rows, paths


def _flat(changes: dict, prefix: str = ""):
    for key, value in changes.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-").lower()
