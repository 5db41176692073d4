"""The configuration schema: frozen dataclasses that YAML files and ``key=value`` overrides fill.

Every field has a default where one makes sense and a one-line docstring. Builders
(``metalm.builders``) turn these into objects; nothing below them sees a config object.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from metalm.config import ConfigError, closest
from metalm.tasks.spec import TaskSpec

TaskRef = str | TaskSpec
"""A registered task name, a path to a task YAML file, or an inline task definition."""


def default_data_root() -> str:
    return os.environ.get("METALM_DATA", "data")


def default_cache_dir() -> str:
    return os.environ.get("METALM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "metalm"))


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "minilm"
    """'minilm' (offline all-MiniLM-L6-v2), a named random size (tiny, mini, small, medium, base), a Hub id or a folder."""
    tokenizer: str | None = None
    """Tokenizer for named random sizes (default: minilm's)."""
    pooling: Literal["auto", "cls", "mean"] = "auto"
    """Sentence vector: first token (cls) or mean over tokens; auto: the folder's 1_Pooling/config.json, else cls."""
    max_length: int = 128
    """Truncation length in tokens of single-text tasks and corpus objectives."""
    pair_max_length: int = 128
    """Truncation length for tasks with two texts (text_b): pairs need more room than single sentences."""
    dropout: float | None = None
    """Override the encoder's dropout."""
    attn_implementation: str | None = None
    """'eager' or 'sdpa'; default: the library's choice."""

    def __post_init__(self):
        check_encoder_name(self.name)


@dataclass(frozen=True)
class DataConfig:
    root: str = field(default_factory=default_data_root)
    """Data root for {root} in task paths (env METALM_DATA, default ./data)."""
    glue: str | None = None
    """GLUE folder in the standard layout for {glue} (default {root}/glue)."""
    source: Literal["files", "hub"] = "files"
    """Read built-in tasks from local files or from the Hugging Face Hub."""
    cache_dir: str | None = field(default_factory=default_cache_dir)
    """Tokenised-data cache (env METALM_CACHE); null disables it."""


@dataclass(frozen=True)
class SamplerConfig:
    kind: Literal["uniform", "proportional", "temperature", "weights", "mixed", "gradient", "loss", "mometas"] = "proportional"
    """Task distribution: uniform, proportional to size (PPS), size^(1/T), given weights, or
    mixed (Dou §2.4: each period uniform over the other tasks, then only `target`); adaptive
    (Wu et al. 2022): gradient (Gb), loss (Lb) or the learned mometas."""
    temperature: float = 1.0
    """T for kind=temperature."""
    weights: dict[str, float] | None = None
    """Task -> weight for kind=weights."""
    target: str | None = None
    """kind=mixed: the target task."""
    period: int = 100
    """kind=mixed: task draws per period."""
    uniform_fraction: float = 0.5
    """kind=mixed: fraction of each period drawn uniformly from the other tasks."""
    ratio: tuple[int, int] | None = None
    """kind=mixed: auxiliary : target draws in each period, e.g. [2, 1] (Dou Table 2: 2:1 and 5:1 per
    epoch); replaces uniform_fraction, and `period` must be a multiple of their sum."""
    update_every: int = 100
    """gradient / loss / mometas: K, steps between distribution updates (MOMETAS's meta length)."""
    scaling: Literal["proportional", "sigmoid"] = "sigmoid"
    """gradient / loss: weights proportional to the signal or to a sigmoid of the standardised signal."""
    meta_lr: float = 0.1
    """mometas: β, the meta step size (0: uniform sampling that still records rewards)."""
    entropy_weight: float = 0.0
    """mometas: λ, the entropy regularisation weight (Eq. 4)."""
    reward: Literal["relative", "overall", "hard"] = "relative"
    """mometas: relative loss drops (Eq. 3), the overall loss, or ±1 per objective (their Table 3)."""
    validation_batch_size: int | None = None
    """mometas: examples per task in each meta-test (default: train.batch_size)."""
    reward_tasks: tuple[str, ...] | None = None
    """mometas: the tasks whose relative validation-loss drops make the reward (default: every task);
    a target listed in the stage is scored on its cell's held-out rows (needs finetune.select: best)."""
    reward_baseline: float | None = None
    """mometas: null for Wu et al.'s update; a decay d in [0, 1) credits each trajectory with its reward
    minus the moving average of the earlier rewards (the REINFORCE baseline; not in the paper)."""

    def __post_init__(self):
        check_sampler_settings(self)
        if self.reward_baseline is not None and not 0.0 <= self.reward_baseline < 1.0:
            raise ConfigError(f"sampler.reward_baseline: expected a decay in [0, 1) (or null), got {self.reward_baseline}")
        if self.ratio is not None:
            if len(self.ratio) != 2 or min(self.ratio) < 1:
                raise ConfigError(f"sampler.ratio: expected two positive integers [auxiliary, target], got {self.ratio}")
            if self.period % sum(self.ratio):
                raise ConfigError(f"sampler.ratio {self.ratio[0]}:{self.ratio[1]}: sampler.period ({self.period}) must "
                                  f"be a multiple of {sum(self.ratio)} so that every period keeps the ratio exactly")


# Sampler settings that only some kinds read -> those kinds; a value other than the default given to
# another kind is refused (it would be dropped without a word).
_SAMPLER_ONLY = {"temperature": ("temperature",), "weights": ("weights",), "target": ("mixed",),
                 "period": ("mixed",), "uniform_fraction": ("mixed",), "ratio": ("mixed",),
                 "update_every": ("gradient", "loss", "mometas"), "scaling": ("gradient", "loss"),
                 "meta_lr": ("mometas",), "entropy_weight": ("mometas",), "reward": ("mometas",),
                 "validation_batch_size": ("mometas",), "reward_tasks": ("mometas",), "reward_baseline": ("mometas",)}


def check_sampler_settings(sampler: "SamplerConfig") -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(sampler)}
    for key, kinds in _SAMPLER_ONLY.items():
        value = getattr(sampler, key)
        if sampler.kind not in kinds and value != defaults[key]:
            raise ConfigError(f"sampler.{key}: kind {sampler.kind!r} does not take it (it would be ignored); it "
                              f"applies to kind {', '.join(kinds)}, got {key}={value!r}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    head_lr: float | None = None
    """Peak learning rate of the task heads; default: lr."""
    weight_decay: float | None = None
    """Weight decay on weight matrices (not biases / LayerNorm); default 0.01 for AdamW (decoupled),
    0 for SGD, where it multiplies the weights by (1 − lr·weight_decay) every step: at Reptile's
    meta learning rate 1, 0.01 alone would shrink them by ~18% in 40 steps."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warmup, followed by the decay of `schedule` to 0."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Decay after warmup: linear, or a half cosine (torch's CosineAnnealingLR; Xue's meta scheduler)."""
    clip_norm: float = 1.0
    """Global gradient-norm clipping (0 disables)."""
    name: Literal["adamw", "sgd"] = "adamw"
    """The (outer) optimiser: AdamW, or plain SGD (e.g. Reptile's θ + β·mean(θ_i − θ) exactly)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    def __post_init__(self):
        check_bounds(self, {"lr": POSITIVE, "head_lr": POSITIVE, "weight_decay": NON_NEGATIVE,
                            "warmup_ratio": UNIT_OPEN, "clip_norm": NON_NEGATIVE, "betas": UNIT_OPEN})
        # Resolved here, so that a run's stored config.json records the decay it used.
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", {"adamw": 0.01, "sgd": 0.0}.get(self.name, 0.01))


@dataclass(frozen=True)
class CorpusConfig:
    """Unlabelled text for pre-training objectives (metalm.data.corpus)."""

    paths: tuple[str, ...]
    """Files or folders ({root} expands to data.root): plain text, one document per line, Wikipedia .xml.bz2."""
    format: Literal["auto", "text", "lines", "wikipedia"] = "auto"
    """How to read them; auto: .bz2/.xml -> wikipedia, .cor/.lines -> lines, else one document per file."""
    max_documents: int | None = None
    """Read at most this many documents."""
    max_sentences: int | None = 20000
    """Stop reading after this many training sentences (null: the whole corpus)."""
    validation_fraction: float = 0.05
    """Documents held out for validation (a seeded hash of each document)."""
    min_chars: int = 20
    """Drop sentences shorter than this."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """A pre-training objective on a corpus, trained like a task (its own head on the shared encoder)."""

    objective: Literal["mlm", "emlm", "nsp", "sop", "cse", "atd", "dtd", "mlm_nsp", "bilm"]
    """mlm, emlm (entity masking), nsp, sop, cse (SimCSE), atd (added-token) or dtd (deleted-token detection)."""
    corpus: CorpusConfig
    name: str | None = None
    """Task/head name (default: the objective)."""
    mask_prob: float = 0.15
    """mlm: masking rate; atd: insertion rate; dtd: deletion rate."""
    whole_word: bool = False
    """mlm: mask whole words."""
    all_mask: bool = False
    """mlm: every chosen token becomes [MASK] (Wu et al. §4.1) instead of BERT's 80/10/10 [MASK]/random/kept."""
    entity_prob: float = 0.5
    """emlm: fraction of entities masked."""


@dataclass(frozen=True)
class TrainSettings:
    tasks: tuple[TaskRef, ...] = ()
    """Tasks trained jointly."""
    algorithm: str = "multitask"
    """multitask, maml, fomaml, reptile or metapretrain (Lv et al.): what produces each step's gradients."""
    inner_steps: int = 5
    """Meta-learning algorithms: k inner SGD steps (support batches) per episode."""
    inner_lr: float = 1e-3
    """Meta-learning algorithms: the inner learning rate α."""
    first_order: bool = False
    """maml / metapretrain: drop second derivatives (FOMAML; Lv et al. Eq. 5)."""
    recompute_inner_steps: bool = False
    """maml / metapretrain, second order: recompute inner steps in backward to save memory."""
    inner_optimizer: str = "sgd"
    """Meta-learning algorithms: `sgd` (Dou et al. Eq. 1) or `adam`, a differentiable Adam (AdamW with
    `inner_weight_decay`; Xue's Reptile uses AdamW inside), at `inner_lr`."""
    inner_betas: tuple[float, float] = (0.9, 0.999)
    inner_eps: float = 1e-8
    inner_weight_decay: float = 0.0
    inner_lr_decay: float = 1.0
    """reptile: multiply the inner learning rate by this every `inner_lr_decay_every` meta steps
    (Xue, Table 1: 0.8 every 30)."""
    inner_lr_decay_every: int = 0
    """reptile: meta steps between inner-lr decays (0: a constant inner learning rate)."""
    objectives: tuple[ObjectiveConfig, ...] = ()
    """Pre-training objectives on corpora, trained as further tasks beside `tasks`."""
    task_inner_steps: dict[str, int] | None = None
    """reptile: task -> its own number of inner steps (Xue, Table 1)."""
    task_batch_sizes: dict[str, int] | None = None
    """Task -> its own batch size (default: batch_size)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 32
    """Examples per batch."""
    tasks_per_step: int = 1
    """Episodes per step: the meta-batch of tasks (Dou et al.: 8), gradients averaged."""
    grad_accum: int = 1
    """Gradient accumulation: each optimiser step runs this many algorithm steps on freshly drawn
    episodes and averages their gradients, so a meta-batch too large for memory fits (with the mean
    reduction, ``tasks_per_step: 1, grad_accum: 8`` steps as ``tasks_per_step: 8`` does)."""
    step_tasks: Literal["sampled", "all"] = "sampled"
    """sampled: `tasks_per_step` episodes whose tasks the sampler draws; all: one episode (one
    batch) of every task at every step, in task order, the sampler unused (Xue Eq. 1: every
    task's loss at each step)."""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """multitask: average (Xue Eq. 1's 1/N) or sum the episodes' losses of a step."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10
    """Log training statistics every this many steps."""
    checkpoint_every: int = 200
    """Checkpoint every this many steps (0: only at the end)."""
    skip_nonfinite: int = 0
    """Steps whose loss or gradient norm is not finite that may be skipped (nothing updated, each
    logged as a ``skipped`` event and counted); the next one stops the run. 0: the first one stops it."""
    eval_every: int = 0
    """Evaluate every task's dev split every this many steps (0: at the end only)."""
    evaluate: bool = True
    """Score the tasks' dev splits at all (false: skip it, e.g. in an experiment's training stage,
    whose model is scored on the targets after fine-tuning)."""
    group_by_length: bool = False
    """Batch rows of similar length together (pools of 50 batches sorted by length, batches shuffled):
    less padding, so more tokens/s on corpora of mixed sentence lengths."""

    def __post_init__(self):
        check_bounds(self, {"steps": POSITIVE, "batch_size": POSITIVE, "tasks_per_step": POSITIVE, "grad_accum": POSITIVE,
                            "inner_steps": NON_NEGATIVE, "inner_lr": NON_NEGATIVE, "inner_weight_decay": NON_NEGATIVE,
                            "inner_betas": UNIT_OPEN, "inner_eps": POSITIVE, "task_inner_steps": NON_NEGATIVE,
                            "task_batch_sizes": POSITIVE, "log_every": NON_NEGATIVE, "checkpoint_every": NON_NEGATIVE,
                            "skip_nonfinite": NON_NEGATIVE, "eval_every": NON_NEGATIVE})
        check_algorithm_settings(self)
        if self.step_tasks == "all" and self.tasks_per_step != 1:
            raise ConfigError(f"train.tasks_per_step must be 1 with train.step_tasks: all (one episode of "
                              f"every task per step), got {self.tasks_per_step}")
        if not 0 < self.inner_lr_decay <= 1:
            raise ConfigError(f"train.inner_lr_decay must be in (0, 1], got {self.inner_lr_decay}")
        if self.inner_lr_decay_every < 0:
            raise ConfigError(f"train.inner_lr_decay_every must be >= 0, got {self.inner_lr_decay_every}")
        if self.inner_lr_decay_every and self.algorithm != "reptile":
            raise ConfigError(f"train.inner_lr_decay_every applies to algorithm: reptile only, got "
                              f"algorithm {self.algorithm!r}")
        if self.loss_reduction != "mean" and self.algorithm != "multitask":
            raise ConfigError(f"train.loss_reduction applies to algorithm: multitask only, got "
                              f"algorithm {self.algorithm!r}")


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 3
    """Passes over the (subsampled) training split."""
    min_steps: int = 0
    """At least this many optimiser steps (more epochs for tiny low-resource subsets)."""
    max_steps: int = 0
    """At most this many optimiser steps (0: no cap); a large training set is then seen only in part."""
    eval_each_epoch: bool = True
    """Score the eval splits after every epoch (the per-epoch curves); false: only at the end."""
    batch_size: int = 16
    """Examples per batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5))
    eval_splits: tuple[str, ...] | None = None
    """Splits to score (default: the task's eval splits)."""
    reuse_head: bool = False
    """Start from the task's head when the initial model has one."""
    select: Literal["last", "best"] = "last"
    """Report the scores after the last epoch, or after the epoch that scores best on a validation
    part carved from the run's own training rows (`validation_fraction`), never on a reported split."""
    validation_fraction: float = 0.2
    """select=best: fraction of the (subsampled) training rows held out for choosing the epoch."""
    patience: int = 0
    """select=best: stop after this many epochs without improvement on the validation part (0: never)."""

    def __post_init__(self):
        check_bounds(self, {"epochs": POSITIVE, "batch_size": POSITIVE, "min_steps": NON_NEGATIVE,
                            "max_steps": NON_NEGATIVE})
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"finetune.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.patience < 0:
            raise ConfigError(f"finetune.patience must be >= 0, got {self.patience}")


@dataclass(frozen=True)
class SubsampleConfig:
    """A stratified, seeded part of a task's training split (what a low-resource cell trains on)."""

    fraction: float | None = None
    """Keep this fraction of each class (regression: of each score quintile)."""
    per_class: int | None = None
    """Instead of a fraction: k examples of each class."""
    seed: int = 0
    """Seed of the draw (an experiment uses the cell's fine-tuning seed)."""
    validation_fraction: float = 0.0
    """Part of the subsample held out for model selection; training reads only the rest."""

    def __post_init__(self):
        check_budget(self.fraction, self.per_class, where="subsample")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"subsample.validation_fraction must be in [0, 1), got {self.validation_fraction}")


# Settings of TrainSettings that only some algorithms take, with the value that means "not used".
# (The inner-loop fields shared by every meta-learning algorithm, inner_steps, inner_lr and the inner
# optimiser's, are not listed: shipped studies give them to a whole table through one YAML anchor.)
# Settings that only some algorithms take -> their default; a value other than the default given to
# an algorithm that does not take the setting is refused (it would be dropped without a word).
_ALGORITHM_ONLY = {"inner_steps": 5, "inner_lr": 1e-3, "inner_optimizer": "sgd", "inner_betas": (0.9, 0.999),
                   "inner_eps": 1e-8, "inner_weight_decay": 0.0, "first_order": False, "recompute_inner_steps": False,
                   "task_inner_steps": None}


def check_algorithm_settings(settings: "TrainSettings") -> None:
    """At parse time: the algorithm and inner optimiser are registered names, and no setting that
    only some algorithms take is given to one that does not (it would be dropped without a word)."""
    from metalm.learn.algorithms import ALGORITHMS, takes_setting
    from metalm.learn.inner_optim import INNER_OPTIMIZERS

    if settings.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {settings.algorithm!r}"
                          f"{_did_you_mean(settings.algorithm, ALGORITHMS)}")
    if settings.inner_optimizer not in INNER_OPTIMIZERS:
        raise ConfigError(f"inner_optimizer: expected one of {', '.join(INNER_OPTIMIZERS)}, got "
                          f"{settings.inner_optimizer!r}{_did_you_mean(settings.inner_optimizer, INNER_OPTIMIZERS)}")
    for key, unused in _ALGORITHM_ONLY.items():
        value = getattr(settings, key)
        if value != unused and not takes_setting(settings.algorithm, key):
            users = [name for name in ALGORITHMS if takes_setting(name, key)]
            raise ConfigError(f"{key}: algorithm {settings.algorithm!r} does not take it (it would be ignored); "
                              f"it applies to {', '.join(users)}, got {key}={value!r}")


# Bounds of numeric settings, checked when a config is parsed: name -> (test, what is expected).
POSITIVE = (lambda v: v > 0, "a positive number")
NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
UNIT_OPEN = (lambda v: 0 <= v < 1, "a number in [0, 1)")


def check_bounds(settings, bounds: dict) -> None:
    """Refuses the first field of ``settings`` outside its bound (None values are not checked)."""
    for name, (test, expected) in bounds.items():
        value = getattr(settings, name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if v is not None and not test(v)]
        if bad:
            raise ConfigError(f"{name}: expected {expected}, got {value if isinstance(value, (dict, tuple)) else bad[0]}")


def check_encoder_name(name: str) -> None:
    """A name one letter away from a built-in encoder (``minlm``) is a typo, not a Hub id: refused
    with the built-in name. Other names are Hub ids or folders, checked when the model loads."""
    from metalm.models.bilstm import SIZES as BILSTM_SIZES
    from metalm.models.encoder import MINILM, NAMED_SIZES

    known = [MINILM, *NAMED_SIZES, *BILSTM_SIZES]
    if name in known or os.path.exists(name):
        return
    close = closest(name, known, cutoff=0.8)
    if close:
        raise ConfigError(f"encoder {name!r} is neither a built-in encoder nor a folder here; did you mean "
                          f"{close!r}? (built-in: {', '.join(known)}; anything else is read as a Hub id)")


def check_precision_name(precision: str) -> None:
    from metalm.train.precision import check_precision

    try:
        check_precision(precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _did_you_mean(value: str, known) -> str:
    close = closest(value, known)
    return f" (did you mean {close!r}?)" if close else ""


def check_budget(fraction: float | None, per_class: int | None, *, where: str) -> None:
    """Exactly one of a fraction in (0, 1] or a positive per-class count (``where`` names their keys)."""
    if (fraction is None) == (per_class is None):
        raise ConfigError(f"{where}: give exactly one of fraction or per_class")
    check_fraction(fraction, where=f"{where}.fraction")
    check_per_class(per_class, where=f"{where}.per_class")


def check_fraction(fraction: float | None, *, where: str) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"{where}: a fraction of the training data must be in (0, 1], got {fraction:g}")


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"threads: expected a positive number of CPU threads (or null for the default), got {threads}")


def check_per_class(per_class: int | None, *, where: str) -> None:
    if per_class is not None and per_class < 1:
        raise ConfigError(f"{where}: examples per class must be at least 1, got {per_class}")


@dataclass(frozen=True)
class TrainConfig:
    """`metalm train`: joint training of one encoder on several tasks."""

    train: TrainSettings
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    init: str | None = None
    """Start from a metalm model folder (a previous run's `final`)."""
    seed: int = 0
    """Seeds initialisation, batches, sampling and dropout."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ..."""
    precision: str = "fp32"
    """'fp32', or 'bf16': forward and backward under bfloat16 autocast, float32 parameters and optimiser."""
    output_dir: str = "runs/train"
    """Run folder: checkpoints, metrics.jsonl, tb/, final/."""
    subsample: dict[str, SubsampleConfig] = field(default_factory=dict)
    """Task -> train on a stratified part of its training split only (an experiment sets it for the
    targets a stage lists, so the stage reads exactly the rows of the cell's fine-tune)."""
    threads: int | None = None
    """torch's CPU thread count; None: one thread for the random `tiny`/`mini` encoders (faster than
    two for models that small), torch's default otherwise."""

    def __post_init__(self):
        check_threads(self.threads)
        check_precision_name(self.precision)


@dataclass(frozen=True)
class FinetuneConfig:
    """`metalm finetune`: fine-tune on one target task, optionally on a fraction of its data."""

    task: TaskRef
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    init: str | None = None
    """A metalm model folder to start from (default: the encoder as loaded)."""
    fraction: float = 1.0
    """Fraction of the training split, stratified and seeded."""
    per_class: int | None = None
    """Instead of a fraction: k examples per class."""
    seed: int = 0
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', ..."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (bfloat16 autocast)."""
    output_dir: str = "runs/finetune"
    threads: int | None = None
    """torch's CPU thread count; None: one thread for the random `tiny`/`mini` encoders (faster than
    two for models that small), torch's default otherwise."""
    save_model: bool = True
    """Save the reported model (with ``select: best``, the selected epoch's) to ``output_dir/final``,
    a folder that ``metalm evaluate --model`` and ``init`` read. Experiments turn it off per cell."""

    def __post_init__(self):
        check_threads(self.threads)
        check_precision_name(self.precision)
        check_fraction(self.fraction, where="fraction")
        check_per_class(self.per_class, where="per_class")


@dataclass(frozen=True)
class SlurmSettings:
    """`executor: slurm`: each unit of the sweep (a stage and its fine-tunes, or one cell) is one
    job of a Slurm job array, submitted through submitit (``pip install 'metalm[slurm]'``)."""

    partition: str | None = None
    """Slurm partition (default: the cluster's)."""
    timeout_min: int = 240
    """Time limit of each job, in minutes."""
    cpus_per_task: int = 2
    """CPUs of each job; its torch thread count unless `threads` is set."""
    gpus_per_node: int = 0
    mem_gb: float | None = None
    """Memory of each job in GB (default: the partition's)."""
    array_parallelism: int = 64
    """At most this many jobs of the array run at once."""
    retries: int = 1
    """Times the unfinished cells of failed jobs are submitted again before the sweep gives up."""
    folder: str | None = None
    """Where submitit keeps jobs, results and logs (default `output_dir/slurm`); on a cluster it must
    be on a file system the compute nodes share."""
    cluster: Literal["auto", "slurm", "local", "debug"] = "auto"
    """auto: Slurm when its commands are available, else jobs run as processes on this machine
    (submitit's local backend); local and debug (in this process, the debugger opening on a
    failure) are for trying a sweep out."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options, e.g. `{account: my-lab, qos: normal}`."""

    def __post_init__(self):
        check_bounds(self, {"timeout_min": POSITIVE, "cpus_per_task": POSITIVE, "gpus_per_node": NON_NEGATIVE,
                            "mem_gb": POSITIVE, "array_parallelism": POSITIVE, "retries": NON_NEGATIVE})


@dataclass(frozen=True)
class MethodConfig:
    name: str
    """Row name in the results table."""
    train: TrainSettings | None = None
    """The training stage before fine-tuning; null: fine-tune the encoder as loaded."""
    init: str | None = None
    """Use an existing metalm model folder instead of training."""
    score: Literal["finetune", "heads"] = "finetune"
    """finetune: fine-tune on each target (a fresh head) and score that; heads: score the stage's
    own head of each target on its scored splits directly, no fine-tune (Xue scores her joint and
    Reptile models this way). heads needs a `train` stage that lists every target."""

    def __post_init__(self):
        if self.score == "heads" and (self.train is None or self.init is not None):
            raise ConfigError(f"method {self.name!r}: score: heads needs a train stage (and no init) whose "
                              "heads it scores")


@dataclass(frozen=True)
class ExperimentConfig:
    """`metalm experiment`: every method x target x fraction x seed, fine-tuned and scored."""

    methods: tuple[MethodConfig, ...]
    targets: tuple[TaskRef, ...]
    fractions: tuple[float, ...] = (1.0,)
    """Low-resource budgets as fractions of each target's training split (stratified, seeded)."""
    per_class: tuple[int, ...] = ()
    """Further budgets of k training examples per class (stratified, seeded), in the same table."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Fine-tuning seeds (the subsample, head and batches); with stage_seeds=per_seed, stages too."""
    stage_seeds: Literal["per_seed", "shared"] = "per_seed"
    """per_seed: each seed trains its own stage with that seed, so the spread covers the stage;
    shared: one stage per method (seed `stage_seed`) for cheap exploration."""
    baseline: str | None = None
    """The method every other row is compared with (paired by seed); default: the first method."""
    references: bool = True
    """Add reference rows computed from the data: majority class, constant mean, zero-shot cosine."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    target_finetune: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Target -> changes to `finetune` for that target only, e.g. `{cola: {min_steps: 300}}`."""
    stage_seed: int = 0
    """Seed of the methods' training stages (fine-tuning uses `seeds`)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda', ..."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (bfloat16 autocast), for the training stages and the fine-tunes."""
    output_dir: str = "runs/experiment"
    title: str = "metalm experiment"
    """Heading of the results table."""
    notes: str = ""
    """Printed under the table (e.g. which datasets stand in for unavailable ones)."""
    threads: int | None = None
    """torch's CPU thread count (of each worker under `executor: processes`); None: one thread for
    the random `tiny`/`mini` encoders (faster than two for models that small), torch's default
    otherwise, and under `executor: processes` the CPU count divided by `workers`."""
    executor: Literal["local", "processes", "slurm"] = "local"
    """local: every stage and fine-tune in this process, one after another; processes: a pool of
    `workers` processes on this machine, each running a stage and the fine-tunes that start from
    it (or one cell without a stage) at a time; slurm: the same units as jobs of a Slurm job array
    (`slurm` settings)."""
    workers: int = 2
    """Processes of `executor: processes`."""
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    """Job settings of `executor: slurm`."""
    stage_processes: int = 1
    """Processes each training stage runs on (``torchrun --standalone`` on the machine that runs the
    stage; one GPU each on CUDA). The fine-tunes stay in one process each."""

    def __post_init__(self):
        check_threads(self.threads)
        if self.workers < 1:
            raise ConfigError(f"workers: expected a positive number of processes, got {self.workers}")
        if self.stage_processes < 1:
            raise ConfigError(f"stage_processes: expected a positive number of processes, got {self.stage_processes}")
        check_precision_name(self.precision)
        for i, fraction in enumerate(self.fractions):
            check_fraction(fraction, where=f"fractions[{i}]")
        for i, k in enumerate(self.per_class):
            check_per_class(k, where=f"per_class[{i}]")
        if not self.fractions and not self.per_class:
            raise ConfigError("fractions and per_class are both empty: give at least one budget")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        names = [m.name for m in self.methods]
        if self.baseline is not None and self.baseline not in names:
            raise ConfigError(f"baseline: {self.baseline!r} is not one of the methods {names}")
