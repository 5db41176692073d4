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
