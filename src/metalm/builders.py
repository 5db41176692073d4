"""Builders: configuration values in, objects out (flat keyword arguments from here on)."""

from __future__ import annotations

import json
import logging
import math
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import torch

from metalm.learn.samplers import CategoricalSampler, MixedSampler, size_probabilities
from metalm.models.encoder import load_encoder, resolve_pooling
from metalm.models.multitask import HEADS_META, MultiTaskModel, is_metalm_folder, load_heads
from metalm.schema import DataConfig, EncoderConfig, ObjectiveConfig, OptimConfig, SamplerConfig, TaskRef
from metalm.tasks.registry import get_task_spec
from metalm.tasks.spec import TaskSpec
from metalm.tasks.spec import has_two_texts
from metalm.tasks.task import Task, load_task
from metalm.train.optim import build_optimizer, linear_warmup_decay, warmup_cosine_decay

log = logging.getLogger(__name__)


def build_model(encoder: EncoderConfig, *, seed: int, init: str | None = None):
    """(MultiTaskModel, tokenizer). ``init`` (a metalm model folder) replaces the encoder and adds its heads.

    Pooling: a model folder keeps the pooling it was trained with; otherwise ``encoder.pooling``,
    with ``auto`` resolved from the encoder's folder (``resolve_pooling``).
    """
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
    return MultiTaskModel(backbone, pooling=resolve_pooling(encoder.name, encoder.pooling)), tokenizer


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_tasks(refs: Sequence[TaskRef], tokenizer, *, data: DataConfig, max_length: int,
                pair_max_length: int | None = None, splits: Sequence[str] | None = None) -> dict[str, Task]:
    """Loaded, tokenised tasks keyed by name, in the order given.

    Args:
        refs: task names, YAML files or specs.
        tokenizer: a Hugging Face tokenizer.
        data: where the files are and the cache.
        max_length: truncation length of single-text tasks.
        pair_max_length: truncation length of tasks with two texts (``has_two_texts``);
            None: ``max_length`` for every task.
        splits: which splits to load (default: each task's own).
    """
    tasks = {}
    for ref in refs:
        spec = get_task_spec(ref)
        if spec.name in tasks:
            raise ValueError(f"task {spec.name} is listed twice")
        length = pair_max_length if pair_max_length is not None and has_two_texts(spec) else max_length
        tasks[spec.name] = load_task(spec, tokenizer, root=data.root, glue=data.glue, source=data.source,
                                     cache_dir=data.cache_dir, max_length=length, splits=splits)
    return tasks


def head_seed(seed: int, name: str) -> int:
    """The torch seed of task ``name``'s head: the run's seed and a CRC-32 of the name, so the seed does
    not depend on the task order or the process, and anagrams (``ab``, ``ba``) get different heads."""
    return (seed * 2**32 + zlib.crc32(name.encode("utf-8"))) % 2**64  # torch takes seeds below 2**64


def add_heads(model: MultiTaskModel, tasks: Mapping[str, Task], *, seed: int) -> None:
    """Adds a head per task, in task order, with initialisation seeded per task name (``head_seed``)."""
    for name, task in tasks.items():
        if name not in model.heads:
            torch.manual_seed(head_seed(seed, name))
            spec = task.spec
            options = {"head": spec.head, "pair": spec.pair_encoding,
                       "cosine_scale": spec.cosine_scale} if isinstance(spec, TaskSpec) else {}  # objectives: none
            model.add_task(name, task.kind, spec.num_labels, **options)


def build_sampler(cfg: SamplerConfig, tasks: Mapping[str, Task], *, seed: int, batch_size: int = 32):
    if cfg.kind in ("gradient", "loss", "mometas"):
        return build_adaptive_sampler(cfg, list(tasks), seed=seed, batch_size=batch_size)
    sizes = {name: task.size("train") for name, task in tasks.items()}
    if cfg.kind == "mixed":
        if cfg.target not in tasks or len(tasks) < 2:
            raise ValueError(f"sampler.kind=mixed needs sampler.target set to one of the tasks {sorted(tasks)} "
                             f"and at least one other task, got target={cfg.target!r}")
        others = {n: 1.0 for n in tasks if n != cfg.target}
        first_draws = (cfg.period * cfg.ratio[0] // sum(cfg.ratio) if cfg.ratio is not None
                       else int(round(cfg.uniform_fraction * cfg.period)))
        return MixedSampler(CategoricalSampler(others, seed=seed), CategoricalSampler({cfg.target: 1.0}, seed=seed),
                            period=cfg.period, first_draws=first_draws)
    probabilities = size_probabilities(sizes, kind=cfg.kind, temperature=cfg.temperature, weights=cfg.weights)
    log.info("task probabilities: %s", {k: round(v, 3) for k, v in probabilities.items()})
    return CategoricalSampler(probabilities, seed=seed)


def build_optimization(model: torch.nn.Module, cfg: OptimConfig, *, steps: int):
    """(optimizer, scheduler): ``cfg``'s optimiser (heads at ``cfg.head_lr`` when set) and linear
    warmup + decay over ``steps``, which scales every param group alike."""
    decay = cfg.weight_decay
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=decay, betas=tuple(cfg.betas), kind=cfg.name,
                                head_lr=cfg.head_lr)
    schedule = {"linear": linear_warmup_decay, "cosine": warmup_cosine_decay}[cfg.schedule]
    scheduler = schedule(optimizer, total_steps=steps, warmup_steps=int(math.ceil(cfg.warmup_ratio * steps)))
    if cfg.name == "sgd" and decay > 0:
        lr = max(cfg.lr, cfg.head_lr or cfg.lr)  # the faster groups shrink the most
        kept = weight_decay_shrink(scheduler.lr_lambdas[0], lr=lr, weight_decay=decay, steps=steps)
        if kept < 0.95:
            log.warning("optim: SGD at lr %g with weight_decay %g multiplies the weight matrices by %.3f over %d "
                        "steps from the decay alone (torch's SGD decay is scaled by the learning rate); "
                        "set optim.weight_decay: 0 unless that is intended", lr, decay, kept, steps)
    return optimizer, scheduler


def weight_decay_shrink(factor, *, lr: float, weight_decay: float, steps: int) -> float:
    """∏_t (1 − lr·factor(t)·weight_decay): what the decay alone leaves of a weight over ``steps``."""
    kept = 1.0
    for step in range(steps):
        kept *= 1.0 - lr * factor(step) * weight_decay
    return kept


def build_adaptive_sampler(cfg: SamplerConfig, names: Sequence[str], *, seed: int, batch_size: int):
    """Gradient-based, loss-based (Wu §3.3) or MOMETAS (Wu §3.4) sampling over ``names``."""
    from metalm.learn.objective_samplers import MometasSampler, SignalSampler

    if cfg.kind == "mometas":
        return MometasSampler(names, seed=seed, update_every=cfg.update_every, meta_lr=cfg.meta_lr,
                              entropy_weight=cfg.entropy_weight, reward_kind=cfg.reward,
                              validation_batch_size=cfg.validation_batch_size or batch_size,
                              reward_names=cfg.reward_tasks, reward_baseline=cfg.reward_baseline)
    return SignalSampler(names, seed=seed, signal=cfg.kind, update_every=cfg.update_every, scaling=cfg.scaling)


def build_objectives(objectives: Sequence[ObjectiveConfig], tokenizer, *, data: DataConfig, max_length: int,
                     seed: int) -> dict:
    """Corpus objectives (``metalm.objectives``) as tasks, keyed by name."""
    from metalm.objectives.task import load_objective
    from metalm.tasks.spec import resolve_path
    from metalm.tasks.task import tokenizer_fingerprint

    out = {}
    tok_id = tokenizer_fingerprint(tokenizer)
    for cfg in objectives:
        name = cfg.name or cfg.objective
        if name in out:
            raise ValueError(f"objective {name} is listed twice (give one of them a `name`)")
        corpus = cfg.corpus
        out[name] = load_objective(cfg.objective, tokenizer, name=name,
                                   paths=[str(resolve_path(p, root=data.root, glue=data.glue)) for p in corpus.paths],
                                   format=corpus.format, seed=seed, validation_fraction=corpus.validation_fraction,
                                   max_documents=corpus.max_documents, max_sentences=corpus.max_sentences,
                                   min_chars=corpus.min_chars, max_length=max_length, cache_dir=data.cache_dir,
                                   tokenizer_id=tok_id, mask_prob=cfg.mask_prob, whole_word=cfg.whole_word,
                                   entity_prob=cfg.entity_prob, all_mask=cfg.all_mask)
    return out
