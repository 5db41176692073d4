"""Dou et al. (2019): the mixed task distribution at a ratio aux : target per epoch (§2.4, Table 2),
the shipped Dou configs, and a learned (MOMETAS-style) task sampler over meta-learning meta-batches."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from metalm import config as cfg
from metalm.builders import build_sampler
from metalm.cli import resolve_config
from metalm.config import ConfigError
from metalm.schema import ExperimentConfig, SamplerConfig


class Sized:
    def __init__(self, n):
        self.n = n

    def size(self, split):
        return self.n


@pytest.mark.parametrize("ratio", [(2, 1), (5, 1)])
def test_mixed_ratio_draws_aux_then_target_in_each_epoch(ratio):
    """Dou §2.4 "Mixed": each epoch first draws uniformly over the auxiliary tasks, then only the target,
    aux : target = ratio (Table 2: 2:1 and 5:1), exactly in every period and uniform within the aux part."""
    a, t = ratio
    period = 6 * (a + t)
    tasks = {"sst2": Sized(1000), "qnli": Sized(10), "stsb": Sized(5)}
    sampler = build_sampler(SamplerConfig(kind="mixed", target="stsb", period=period, ratio=ratio), tasks, seed=0)
    draws = [sampler.sample() for _ in range(period * 50)]
    for epoch in range(50):
        part = draws[epoch * period:(epoch + 1) * period]
        aux = period * a // (a + t)
        assert part[aux:] == ["stsb"] * (period - aux)  # the target only at the end of each epoch
        assert "stsb" not in part[:aux]
    counts = collections.Counter(draws)
    assert counts["stsb"] * a == (counts["sst2"] + counts["qnli"]) * t  # aux : target exactly
    # Uniform over the auxiliary tasks, whatever their sizes: 50 * aux draws, binomial spread.
    n = 50 * (period * a // (a + t))
    assert abs(counts["sst2"] - n / 2) < 4 * (n / 4) ** 0.5


def test_mixed_ratio_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="sampler.period"):
        SamplerConfig(kind="mixed", target="stsb", period=20, ratio=(2, 1))
    with pytest.raises(ConfigError, match="sampler.ratio"):
        SamplerConfig(kind="mixed", target="stsb", period=20, ratio=(0, 1))
    parsed = cfg.parse(SamplerConfig, {"kind": "mixed", "target": "stsb", "period": 24, "ratio": [5, 1]},
                       where="sampler")
    assert parsed.ratio == (5, 1)


def test_dou_configs_follow_the_paper():
    """Table 1: PPS for every stage, paper-scale auxiliaries MNLI/QQP/QNLI/SST-2 from the Hub;
    Tables 2-3 are Reptile studies; Table 3 has the paper's five cells; each has a no-stage baseline."""
    load = lambda name: cfg.load(ExperimentConfig, resolve_config(name))  # noqa: E731
    for name in ("dou", "dou_paper"):
        exp = load(name)
        stages = [m.train for m in exp.methods if m.train is not None]
        assert exp.methods[0].train is None
        fixed = [s for s in stages if s.sampler.kind != "mometas"]
        assert {s.algorithm for s in fixed} == {"multitask", "maml", "fomaml", "reptile"}
        assert all(s.sampler.kind == "proportional" for s in fixed)
    paper = load("dou_paper")
    assert paper.data.source == "hub" and all(m.train is None or m.train.tasks == ("mnli", "qqp", "qnli", "sst2")
                                              for m in paper.methods)
    assert paper.targets == ("cola", "mrpc", "stsb", "rte")
    dist = load("dou_distributions")
    assert dist.methods[0].train is None
    assert {m.train.algorithm for m in dist.methods[1:]} == {"reptile"}
    assert sorted(m.train.sampler.ratio for m in dist.methods[1:] if m.train.sampler.kind == "mixed") == [(2, 1), (5, 1)]
    hyper = load("dou_hyper")
    assert hyper.methods[0].train is None
    cells = {(m.train.inner_steps, m.train.inner_lr) for m in hyper.methods[1:]}
    assert {m.train.algorithm for m in hyper.methods[1:]} == {"reptile"}
    assert cells == {(3, 1e-3), (5, 1e-3), (7, 1e-3), (5, 1e-4), (5, 1e-2)}


# --- a learned task sampler over meta-learning meta-batches ----------------------------------------

def write_tasks(root: Path, seed: int = 0):
    """Two small tasks: ``cue`` (the label is the first word) and ``noise`` (random labels)."""
    import random

    from metalm.tasks.spec import TaskSpec

    rng = random.Random(seed)
    words = ["red", "green", "blue", "tree", "house", "river", "stone", "cloud", "paper", "glass"]
    for name in ("cue", "noise"):
        for split, n in (("train", 64), ("dev", 16)):
            lines = ["text\tlabel"]
            for _ in range(n):
                y = rng.randint(0, 1)
                first = ("good" if y else "bad") if name == "cue" else rng.choice(words)
                lines.append(f"{first} {' '.join(rng.sample(words, 3))}\t{y}")
            (root / f"{name}_{split}.tsv").write_text("\n".join(lines) + "\n")
    return tuple(TaskSpec(name=name, kind="classification", columns={"text_a": "text", "label": "label"},
                          files={"train": f"{{root}}/{name}_train.tsv", "dev": f"{{root}}/{name}_dev.tsv"},
                          labels=("0", "1"), metrics=("accuracy",)) for name in ("cue", "noise"))


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_learned_sampler_under_meta_learning_resumes_exactly(algorithm, tmp_path):
    """MOMETAS-style sampling of a meta-batch of tasks (MAML / Reptile), rewarded by one task's
    validation loss: killed after a checkpoint and resumed, it ends with the same weights and the
    same sampler history (probabilities, rewards) as an uninterrupted run, and its probabilities moved."""
    import torch
    from safetensors.torch import load_file

    from metalm.recipes import run_train
    from metalm.schema import DataConfig, EncoderConfig, OptimConfig, TrainConfig, TrainSettings

    specs = write_tasks(tmp_path)

    def config(out):
        settings = TrainSettings(tasks=specs, algorithm=algorithm, inner_steps=1, inner_lr=1e-2, steps=8,
                                 batch_size=4, tasks_per_step=2, checkpoint_every=4, evaluate=False,
                                 sampler=SamplerConfig(kind="mometas", update_every=2, meta_lr=5.0,
                                                       reward_tasks=("cue",)), optim=OptimConfig(lr=3e-3))
        return TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=16),
                           data=DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "cache")), seed=0,
                           output_dir=str(out))

    straight = run_train(config(tmp_path / "a"), progress=False, tensorboard=False)

    def kill(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(config(tmp_path / "b"), progress=False, tensorboard=False, on_step=kill)
    resumed = run_train(config(tmp_path / "b"), resume=True, progress=False, tensorboard=False)
    a = load_file(str(straight / "encoder" / "model.safetensors"))
    b = load_file(str(resumed / "encoder" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history_a = json.loads((tmp_path / "a" / "sampler.json").read_text())["history"]
    history_b = json.loads((tmp_path / "b" / "sampler.json").read_text())["history"]
    assert history_a == history_b and len(history_a) == 5  # the baseline and a meta-test every 2 of 8 steps
    assert sum(history_a[-1]["trajectory"]) == 4  # K = 2 steps of 2 episodes: every meta-batch task counted
    # The reward is the relative drop of the cue task's validation loss alone (reward_tasks).
    for before, after in zip(history_a, history_a[1:]):
        drop = (before["losses"]["cue"] - after["losses"]["cue"]) / before["losses"]["cue"]
        assert after["reward"] == pytest.approx(drop)
    assert history_a[-1]["new_probabilities"] != history_a[0]["new_probabilities"]


def test_learned_sampler_rewards_only_held_out_rows(tmp_path):
    """A target listed in a stage is scored on its cell's held-out rows (`selection`), never on the
    rows it trains on; without held-out rows a learned sampler is refused."""
    from metalm.recipes import build_stage_tasks, check_held_out
    from metalm.schema import DataConfig, EncoderConfig, SubsampleConfig, TrainConfig, TrainSettings
    from metalm.builders import build_model

    specs = write_tasks(tmp_path)
    _, tokenizer = build_model(EncoderConfig(name="tiny"), seed=0)

    def stage(validation_fraction):
        cfg = TrainConfig(train=TrainSettings(tasks=specs), encoder=EncoderConfig(name="tiny", max_length=16),
                          data=DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "cache")),
                          subsample={"cue": SubsampleConfig(fraction=0.5, seed=0,
                                                            validation_fraction=validation_fraction)})
        return build_stage_tasks(specs, tokenizer, cfg)

    held = stage(0.25)
    assert held["cue"].held_out_split() == "selection" and held["noise"].held_out_split() == "dev"
    # The cell (half of 64 rows) is split into training rows and held-out rows; stage.json counts only the former.
    assert held["cue"].size("selection") > 0 and held["cue"].size("train") + held["cue"].size("selection") == 32
    assert held["cue"].training_rows_read()["rows"] == held["cue"].size("train")
    check_held_out(held)
    with pytest.raises(ConfigError, match="finetune.select: best"):
        check_held_out(stage(0.0))


def test_reward_tasks_must_be_sampled_tasks():
    from metalm.learn.objective_samplers import MometasSampler

    with pytest.raises(ValueError, match="reward_tasks"):
        MometasSampler(("a", "b"), seed=0, reward_names=("c",))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_sampler_under_maml_comes_to_prefer_the_helpful_task(seed, tmp_path):
    """A constructed case: the reward is the relative drop of ``cue``'s validation loss; training on
    ``cue`` (label = first word) lowers it, training on ``noise`` (random labels, its own head) barely
    touches it. Under second-order MAML, one task per meta-step and a meta-test after every step, the
    learned probability of ``cue`` ends above uniform.

    What makes the premise hold (a step on ``cue`` lowers ``cue``'s held-out loss): the tiny random
    encoder pooled by mean, so the first word's embedding reaches the head directly (through CLS
    pooling a random 2-layer encoder must first learn to route it), no dropout, so the reward is not
    dominated by dropout noise, and outer SGD at lr 0.05 (at 0.5 one step overshoots and raised the
    held-out loss 0.67 -> 2.18 for seed 1). Plain SGD, not Adam: with momentum the cue head keeps
    moving on steps that drew ``noise`` and the credit goes to both. Over seeds 0-7 this setting ended
    at P(cue) 0.57-0.83 (mean 0.70) with cue's loss lower in every seed; at meta_lr 2 one seed of
    eight collapsed to 0.12, so the sampler's step stays at 1."""
    from metalm.recipes import run_train
    from metalm.schema import DataConfig, EncoderConfig, OptimConfig, TrainConfig, TrainSettings

    specs = write_tasks(tmp_path, seed=seed)
    settings = TrainSettings(tasks=specs, algorithm="maml", inner_steps=1, inner_lr=1e-2, steps=40, batch_size=8,
                             tasks_per_step=1, evaluate=False,
                             sampler=SamplerConfig(kind="mometas", update_every=1, meta_lr=1.0, entropy_weight=0.0,
                                                   reward_tasks=("cue",)),
                             optim=OptimConfig(name="sgd", lr=0.05, weight_decay=0.0, warmup_ratio=0.0))
    config = TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=16, pooling="mean", dropout=0.0),
                         data=DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "cache")), seed=seed,
                         output_dir=str(tmp_path / "run"))
    run_train(config, progress=False, tensorboard=False)
    sampler = json.loads((tmp_path / "run" / "sampler.json").read_text())
    cue = sampler["names"].index("cue")
    final = sampler["history"][-1]["new_probabilities"][cue]
    first_loss, last_loss = sampler["history"][0]["losses"]["cue"], sampler["history"][-1]["losses"]["cue"]
    assert last_loss < first_loss  # the helpful task was learned
    assert final > 0.5, final  # above uniform over the two tasks
