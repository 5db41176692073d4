"""Meta-learning algorithms inside the training loop, on real GLUE tasks with a tiny encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metalm import cli
from metalm.learn.algorithms import ALGORITHMS, algorithm_settings, build_algorithm
from metalm.recipes import run_train
from metalm.schema import DataConfig, EncoderConfig, OptimConfig, TrainConfig, TrainSettings
from metalm.train.logging import read_log


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(out: Path, data_root: Path, cache: Path, **train) -> TrainConfig:
    settings = TrainSettings(tasks=("rte", "mrpc", "stsb"), steps=6, batch_size=4, checkpoint_every=0, log_every=1,
                             optim=OptimConfig(lr=1e-3, warmup_ratio=0.0), **train)
    return TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=32, pair_max_length=32),
                       data=DataConfig(root=str(data_root), cache_dir=str(cache)), seed=5, output_dir=str(out))


def _final_weights(final: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(final / "encoder" / "model.safetensors"))
    weights.update({f"heads.{k}": v for k, v in load_file(str(final / "heads.safetensors")).items()})
    return weights


@pytest.mark.parametrize("first_order", [False, True])
def test_metapretrain_with_k0_is_joint_multitask_step_for_step(tmp_path, data_root, shared_cache, first_order):
    joint = run_train(_config(tmp_path / "joint", data_root, shared_cache, tasks_per_step=2),
                      progress=False, tensorboard=False)
    meta = run_train(_config(tmp_path / "meta", data_root, shared_cache, tasks_per_step=2, algorithm="metapretrain",
                             inner_steps=0, first_order=first_order), progress=False, tensorboard=False)
    a, b = _final_weights(joint), _final_weights(meta)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    log_a = [r for r in read_log(joint.parent) if r["event"] == "train"]
    log_b = [r for r in read_log(meta.parent) if r["event"] == "train"]
    assert [r["task"] for r in log_a] == [r["task"] for r in log_b]
    assert [r["loss"] for r in log_b] == pytest.approx([r["loss"] for r in log_a], abs=1e-6)
    # ... and a k > 0 run differs (the comparison above can fail).
    other = run_train(_config(tmp_path / "k2", data_root, shared_cache, tasks_per_step=2, algorithm="metapretrain",
                              inner_steps=2, inner_lr=0.1, first_order=first_order), progress=False, tensorboard=False)
    c = _final_weights(other)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_from_the_cli(tmp_path, data_root, shared_cache, algorithm):
    code = cli.main(["train", "train_glue", "encoder.name=tiny", "encoder.max_length=32", "encoder.pair_max_length=32",
                     "train.tasks=[rte,mrpc,stsb]",
                     f"train.algorithm={algorithm}", "train.steps=3", "train.batch_size=4",
                     *([] if algorithm == "multitask" else ["train.inner_steps=2"]), "train.tasks_per_step=2", "train.eval_every=0", "train.checkpoint_every=0",
                     f"output_dir={tmp_path / 'run'}", f"data.root={data_root}", f"data.cache_dir={shared_cache}"])
    assert code == 0
    records = [r for r in read_log(tmp_path / "run") if r["event"] == "train"]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if algorithm != "multitask":
        assert "support_loss" in records[-1]


def test_cross_task_support_draws_tasks_from_the_distribution():
    from metalm.data.batching import BatchStream
    from metalm.learn.samplers import CategoricalSampler
    from metalm.train.loop import _draw, _episode

    class Fake:
        def __init__(self, name):
            self.name = name

        def batch(self, split, indices):
            return {"task": self.name, "indices": indices}

    tasks = {n: Fake(n) for n in ("a", "b", "c")}
    streams = {n: BatchStream(10, 2, seed=i) for i, n in enumerate(tasks)}
    sampler = CategoricalSampler({"a": 1, "b": 1, "c": 1}, seed=0)
    algorithm = build_algorithm("metapretrain", inner_steps=4)
    cpu = torch.device("cpu")
    episodes = [_episode(_draw(sampler, algorithm), tasks, streams, cpu, True) for _ in range(20)]
    mixed = [e for e in episodes if len(set(e.support_tasks)) > 1]
    assert mixed, "support batches should come from several tasks"
    for e in episodes:
        assert [b["task"] for b in e.support] == list(e.support_tasks)
        assert e.query["task"] == e.task
    # Within-task algorithms keep one task per episode, and support and query batches differ.
    maml = build_algorithm("maml", inner_steps=2)
    e = _episode(_draw(sampler, maml), tasks, streams, cpu, False)
    assert {b["task"] for b in e.support} == {e.task} and e.support_tasks == ()
    assert e.support[0]["indices"] != e.query["indices"]


def test_alias_settings_are_not_overridden():
    assert "first_order" not in algorithm_settings("fomaml", {"first_order": False, "inner_lr": 0.1})
    assert build_algorithm("fomaml", **algorithm_settings("fomaml", {"first_order": False})).first_order is True
    assert algorithm_settings("multitask", {"inner_lr": 0.1, "inner_steps": 3}) == {}
