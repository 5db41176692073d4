"""Builders: configuration values in, objects out (flat keyword arguments from here on)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from metalm.learn.samplers import CategoricalSampler, MixedSampler, size_probabilities
from metalm.models.encoder import load_encoder
from metalm.models.multitask import HEADS_META, MultiTaskModel, is_metalm_folder, load_heads
from metalm.schema import DataConfig, EncoderConfig, OptimConfig, SamplerConfig, TaskRef
from metalm.tasks.registry import get_task_spec
from metalm.tasks.task import Task, load_task
from metalm.train.optim import build_optimizer, linear_warmup_decay

log = logging.getLogger(__name__)


def build_model(encoder: EncoderConfig, *, seed: int, init: str | None = None):
    """(MultiTaskModel, tokenizer). ``init`` (a metalm model folder) replaces the encoder and adds its heads."""
    torch.manual_seed(seed)
    if init is not None:
        if not is_metalm_folder(init):
            raise ValueError(f"init {init!r}: not a metalm model folder (no heads.json); "
                             "to start from a Hugging Face encoder, set encoder.name instead")
        backbone, tokenizer = load_encoder(f"{init}/encoder", attn_implementation=encoder.attn_implementation,
                                           dropout=encoder.dropout)
        pooling = json.loads((Path(init) / HEADS_META).read_text())["pooling"]
        model = MultiTaskModel(backbone, pooling=pooling)
        load_heads(model, init)
        return model, tokenizer
    backbone, tokenizer = load_encoder(encoder.name, tokenizer=encoder.tokenizer,
                                       attn_implementation=encoder.attn_implementation, dropout=encoder.dropout)
    return MultiTaskModel(backbone, pooling=encoder.pooling), tokenizer


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_tasks(refs: Sequence[TaskRef], tokenizer, *, data: DataConfig, max_length: int,
                splits: Sequence[str] | None = None) -> dict[str, Task]:
    tasks = {}
    for ref in refs:
        spec = get_task_spec(ref)
        if spec.name in tasks:
            raise ValueError(f"task {spec.name} is listed twice")
        tasks[spec.name] = load_task(spec, tokenizer, root=data.root, glue=data.glue, source=data.source,
                                     cache_dir=data.cache_dir, max_length=max_length, splits=splits)
    return tasks


def add_heads(model: MultiTaskModel, tasks: Mapping[str, Task], *, seed: int) -> None:
    """Adds a head per task, in task order, with initialisation seeded per task name."""
    for name, task in tasks.items():
        if name not in model.heads:
            torch.manual_seed(seed + sum(map(ord, name)))
            model.add_task(name, task.kind, task.spec.num_labels)


def build_sampler(cfg: SamplerConfig, tasks: Mapping[str, Task], *, seed: int):
    sizes = {name: task.size("train") for name, task in tasks.items()}
    if cfg.kind == "mixed":
        if cfg.target not in tasks or len(tasks) < 2:
            raise ValueError(f"sampler.kind=mixed needs sampler.target set to one of the tasks {sorted(tasks)} "
                             f"and at least one other task, got target={cfg.target!r}")
        others = {n: 1.0 for n in tasks if n != cfg.target}
        return MixedSampler(CategoricalSampler(others, seed=seed), CategoricalSampler({cfg.target: 1.0}, seed=seed),
                            period=cfg.period, first_draws=int(round(cfg.uniform_fraction * cfg.period)))
    probabilities = size_probabilities(sizes, kind=cfg.kind, temperature=cfg.temperature, weights=cfg.weights)
    log.info("task probabilities: %s", {k: round(v, 3) for k, v in probabilities.items()})
    return CategoricalSampler(probabilities, seed=seed)


def build_optimization(model: torch.nn.Module, cfg: OptimConfig, *, steps: int):
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                kind=cfg.name)
    scheduler = linear_warmup_decay(optimizer, total_steps=steps, warmup_steps=int(math.ceil(cfg.warmup_ratio * steps)))
    return optimizer, scheduler
