"""Xue's protocol pieces: joint steps over every task (Eq. 1), the inner-lr step decay."""

from __future__ import annotations

import copy

import numpy as np

import pytest
import torch

from metalm.config import ConfigError
from metalm.learn.algorithms import MultiTask
from metalm.schema import TrainSettings
from metalm.train.loop import train_loop
from tests.test_meta_algorithms import grads_of, make_batch, tiny_model

from metalm.learn.algorithms import Episode


@pytest.mark.parametrize("reduction,scale", [("sum", 1.0), ("mean", 0.5)])
def test_joint_step_over_all_tasks_is_the_sum_of_single_task_gradients(reduction, scale):
    model = tiny_model()
    batches = {"t": make_batch(1, num_labels=2), "u": make_batch(2, num_labels=3)}
    MultiTask(reduction=reduction).step(model, [Episode(task=n, support=(), query=b) for n, b in batches.items()])
    joint = grads_of(model)
    reference = {}
    for name, batch in batches.items():  # each task's gradient alone, on its own copy
        alone = copy.deepcopy(model)
        alone.zero_grad(set_to_none=True)
        alone.loss(name, batch).backward()
        for n, g in grads_of(alone).items():
            reference[n] = reference.get(n, 0) + g
    assert joint.keys() == reference.keys()
    assert any(n.startswith("heads.t") for n in joint) and any(n.startswith("heads.u") for n in joint)
    for n in joint:
        torch.testing.assert_close(joint[n], scale * reference[n])


class _Rows:
    fingerprint = rows_read = None

    def __init__(self, name):
        self.name = name

    def size(self, split):
        return 8

    def batch(self, split, indices):
        return {"rows": torch.as_tensor(list(indices))}


class _NoDraw:
    history = None

    def request(self, done):
        from metalm.contracts import NO_FEEDBACK
        return NO_FEEDBACK

    def sample(self):
        raise AssertionError("all_tasks must not draw tasks from the sampler")

    def update(self, feedback):
        self.seen = getattr(self, "seen", []) + [feedback["tasks"]]


class _Record:
    support_batches = 0
    cross_task_support = False
    reduction = "mean"

    def support_steps(self, task):
        return 0

    def at_step(self, step):
        pass

    def __init__(self):
        self.steps = []

    def step(self, model, episodes):
        self.steps.append([e.task for e in episodes])
        return {"loss": 0.0}


def test_loop_all_tasks_gives_one_episode_of_every_task_each_step(tmp_path):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    algorithm, sampler = _Record(), _NoDraw()
    train_loop(model=model, tasks={"a": _Rows("a"), "b": _Rows("b"), "c": _Rows("c")}, algorithm=algorithm,
               sampler=sampler, optimizer=optimizer, scheduler=scheduler, steps=3, batch_size=2, seed=0,
               run_dir=tmp_path, progress=False, tensorboard=False, all_tasks=True)
    assert algorithm.steps == [["a", "b", "c"]] * 3
    assert sampler.seen == [["a", "b", "c"]] * 3


def test_step_tasks_settings_are_validated():
    with pytest.raises(ConfigError, match="tasks_per_step"):
        TrainSettings(step_tasks="all", tasks_per_step=2)
    with pytest.raises(ConfigError, match="loss_reduction"):
        TrainSettings(algorithm="reptile", loss_reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        MultiTask(reduction="max")


def test_cosine_meta_schedule_is_torchs_cosine_annealing():
    from metalm.train.optim import warmup_cosine_decay

    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    a = warmup_cosine_decay(ours, total_steps=40, warmup_steps=0)
    b = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=40)
    for _ in range(40):
        assert a.get_last_lr()[0] == pytest.approx(b.get_last_lr()[0], abs=1e-12)
        ours.step(), theirs.step(), a.step(), b.step()


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_reptile_inner_lr_decays_by_0_8_every_30_meta_steps(inner_optimizer):
    from metalm.learn.reptile import Reptile, reptile_grads
    from tests.test_meta_algorithms import make_episode

    reptile = Reptile(inner_lr=0.1, inner_steps=2, inner_optimizer=inner_optimizer,
                      inner_lr_decay=0.8, inner_lr_decay_every=30)
    for step, expected in [(0, 0.1), (29, 0.1), (30, 0.08), (65, 0.1 * 0.8 ** 2)]:
        reptile.at_step(step)
        assert reptile.inner_lr == pytest.approx(expected)
    # The step at t=65 is the undecayed algorithm at inner_lr 0.1·0.8².
    model, episodes = tiny_model(), [make_episode(3, 2)]
    reptile.step(model, episodes)
    decayed = grads_of(model)
    plain = Reptile(inner_lr=0.1 * 0.8 ** 2, inner_steps=2, inner_optimizer=inner_optimizer)
    model.zero_grad(set_to_none=True)
    plain.step(model, episodes)
    reference = grads_of(model)
    undecayed, _ = reptile_grads(model, episodes, inner_lr=0.1, inner_steps=2,
                                 inner_optimizer=None if inner_optimizer == "sgd" else
                                 Reptile(inner_lr=0.1, inner_optimizer="adam").inner_optimizer)
    for n in reference:
        torch.testing.assert_close(decayed[n], reference[n])
    assert any(not torch.allclose(undecayed[n], reference[n]) for n in reference)


def test_loop_calls_before_step_with_the_steps_done(tmp_path):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    seen = []
    train_loop(model=model, tasks={"a": _Rows("a")}, algorithm=_Record(), sampler=_NoDraw(),
               optimizer=optimizer, scheduler=scheduler, steps=3, batch_size=2, seed=0, run_dir=tmp_path,
               progress=False, tensorboard=False, all_tasks=True, before_step=seen.append)
    assert seen == [0, 1, 2]


def test_inner_lr_decay_settings_are_validated():
    with pytest.raises(ConfigError, match="inner_lr_decay_every"):
        TrainSettings(algorithm="multitask", inner_lr_decay=0.8, inner_lr_decay_every=30)
    with pytest.raises(ConfigError, match="inner_lr_decay must"):
        TrainSettings(algorithm="reptile", inner_lr_decay=1.5, inner_lr_decay_every=30)


def _heads_experiment(tmp_path, **changes):
    from metalm.config import parse
    from metalm.schema import ExperimentConfig

    data = {"title": "heads", "output_dir": str(tmp_path / "out"), "encoder": {"name": "tiny", "max_length": 32},
            "data": {"cache_dir": str(tmp_path / "cache")}, "targets": ["polarity"], "fractions": [0.2],
            "seeds": [0], "references": False,
            "finetune": {"epochs": 1, "batch_size": 8, "eval_each_epoch": False},
            "methods": [{"name": "none"},
                        {"name": "joint", "score": "heads",
                         "train": {"tasks": ["polarity", "simlex"], "steps": 2, "batch_size": 4, "step_tasks": "all",
                                   "checkpoint_every": 0, "evaluate": False}}]}
    data.update(changes)
    return parse(ExperimentConfig, data)


def test_score_heads_scores_the_stages_own_head_without_fine_tuning(tmp_path):
    """End to end on the tiny encoder: the joint row is the stage model's polarity head evaluated
    independently (no fine-tune folder, the same numbers), on the cell's rows only."""
    import json

    from metalm.builders import build_model, build_tasks
    from metalm.experiments.runner import run_experiment
    from metalm.schema import DataConfig, EncoderConfig
    from metalm.train.evaluate import evaluate

    rows, paths = run_experiment(_heads_experiment(tmp_path), progress=False)
    out = tmp_path / "out"
    result = json.loads((out / "results" / "joint" / "polarity" / "fraction-0.2" / "seed-0.json").read_text())
    stage = json.loads((out / "methods" / "joint" / "fraction-0.2" / "seed-0" / "stage.json").read_text())
    assert result["scored"] == "stage heads" and result["train_size"] == stage["tasks"]["polarity"]["rows"] == 20
    assert not (out / "results" / "joint" / "polarity" / "fraction-0.2" / "seed-0").exists()  # no fine-tune run
    assert (out / "results" / "none" / "polarity" / "fraction-0.2" / "seed-0").exists()
    model, tokenizer = build_model(EncoderConfig(name="tiny", max_length=32), seed=0,
                                   init=str(out / "methods" / "joint" / "fraction-0.2" / "seed-0" / "final"))
    task = build_tasks(["polarity"], tokenizer, data=DataConfig(cache_dir=None), max_length=32)["polarity"]
    split = next(iter(result["scores"]))
    expected = evaluate(model.eval(), task, split)
    for metric, value in result["scores"][split].items():
        assert value == pytest.approx(expected[metric], rel=1e-5, abs=1e-6)
    assert {r["scored"] for r in rows if r["method"] == "joint"} == {"stage heads"}
    assert {r["scored"] for r in rows if r["method"] == "none"} == {"fine-tuned"}
    assert "score: heads" in paths["markdown"].read_text() and "joint" in paths["markdown"].read_text()


def test_score_heads_needs_a_stage_listing_every_target(tmp_path):
    from metalm.experiments.runner import run_experiment

    with pytest.raises(ConfigError, match="score: heads needs a train stage"):
        _heads_experiment(tmp_path, methods=[{"name": "none", "score": "heads"}])
    cfg = _heads_experiment(tmp_path, methods=[{"name": "j", "score": "heads", "train": {"tasks": ["simlex"],
                                                                                         "steps": 1}}])
    with pytest.raises(ConfigError, match="does not list the target"):
        run_experiment(cfg, progress=False)


def test_xue_protocol_end_to_end_with_bi_encoder_heads(tmp_path):
    """Tiny encoder, gensim data: a bi-encoded regression target with Xue's Reptile (AdamW inside,
    inner-lr decay, cosine meta schedule) scored by its own heads, and a fine-tuned single-task row."""
    import json

    from metalm.experiments.runner import run_experiment
    from metalm.tasks.registry import get_task_spec

    simlex = {f: getattr(get_task_spec("simlex"), f) for f in ("name", "kind", "header", "comment_prefix", "files",
                                                                "columns", "metrics", "split_ratios")}
    simlex = {**simlex, "pair_encoding": "bi", "cosine_scale": 10.0}
    reptile = {"tasks": [simlex, "polarity"], "algorithm": "reptile", "steps": 3, "batch_size": 4, "inner_steps": 1,
               "inner_optimizer": "adam", "inner_lr": 1e-3, "inner_lr_decay": 0.8, "inner_lr_decay_every": 2,
               "optim": {"name": "sgd", "lr": 1.0, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "cosine"},
               "checkpoint_every": 0, "evaluate": False}
    cfg = _heads_experiment(tmp_path, targets=[simlex], methods=[{"name": "single"},
                                                                 {"name": "reptile", "score": "heads", "train": reptile}])
    rows, _ = run_experiment(cfg, progress=False)
    out = tmp_path / "out"
    heads = json.loads((out / "methods" / "reptile" / "fraction-0.2" / "seed-0" / "final" / "heads.json").read_text())
    assert heads["tasks"]["simlex"]["pair"] == "bi" and heads["tasks"]["simlex"]["cosine_scale"] == 10.0
    assert {(r["method"], r["scored"]) for r in rows} == {("single", "fine-tuned"), ("reptile", "stage heads")}
    assert all(np.isfinite(r["value"]) for r in rows)
