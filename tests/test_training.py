"""The training loop: kill-and-resume gives identical numbers; samplers and streams restore exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metalm.data.batching import BatchStream
from metalm.learn.samplers import CategoricalSampler, size_probabilities
from metalm.recipes import run_train
from metalm.schema import DataConfig, EncoderConfig, OptimConfig, TrainConfig, TrainSettings
from metalm.train.logging import read_log


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(out: Path, data_root: Path, cache: Path, group_by_length: bool = False) -> TrainConfig:
    # Four kinds of task: pair classification, regression, single-sentence, token classification.
    settings = TrainSettings(tasks=("rte", "stsb", "cola", "wnut16"), steps=12, batch_size=4, checkpoint_every=4,
                             log_every=1,
                             optim=OptimConfig(lr=1e-3, warmup_ratio=0.25), group_by_length=group_by_length)
    return TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=32, pair_max_length=32),
                       data=DataConfig(root=str(data_root), cache_dir=str(cache)), seed=3, output_dir=str(out))


def _weights(final: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(final / "encoder" / "model.safetensors"))
    weights.update({f"heads.{k}": v for k, v in load_file(str(final / "heads.safetensors")).items()})
    return weights


@pytest.mark.parametrize("group_by_length", [False, True])
def test_kill_and_resume_ends_with_identical_numbers(tmp_path, data_root, shared_cache, group_by_length, capsys):
    straight = run_train(_config(tmp_path / "straight", data_root, shared_cache, group_by_length), progress=False,
                         tensorboard=False)

    def kill_at_6(step):
        if step == 6:  # after the step-4 checkpoint: steps 5 and 6 are lost and redone
            raise Killed

    cfg = _config(tmp_path / "killed", data_root, shared_cache, group_by_length)
    with pytest.raises(Killed):
        run_train(cfg, progress=False, on_step=kill_at_6, tensorboard=False)
    assert not (tmp_path / "killed" / "final").exists()
    capsys.readouterr()
    resumed = run_train(cfg, resume=True, progress=False, tensorboard=False)
    assert f"resumed {tmp_path / 'killed'} from step 4 (" in capsys.readouterr().err

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_a, log_b = read_log(straight.parent), read_log(resumed.parent)
    assert [r["step"] for r in log_b if r["event"] == "train"] == list(range(1, 13))
    assert log_a == log_b  # losses, learning rates, grad norms, tasks and final evaluations
    # Training did something: the loss trajectory is not constant and weights moved from init.
    losses = [r["loss"] for r in log_a if r["event"] == "train"]
    assert len(set(losses)) > 1
    tasks_seen = {r["task"] for r in log_a if r["event"] == "train"}
    assert len(tasks_seen) >= 3


def test_resume_of_finished_run_returns_final(tmp_path, data_root, shared_cache):
    cfg = _config(tmp_path / "run", data_root, shared_cache)
    final = run_train(cfg, progress=False, tensorboard=False)
    stamp = (final / "heads.safetensors").stat().st_mtime_ns
    assert run_train(cfg, resume=True, progress=False, tensorboard=False) == final
    assert (final / "heads.safetensors").stat().st_mtime_ns == stamp
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000012" / "state.json").read_text())
    assert set(state) >= {"step", "optimizer", "scheduler", "rng", "sampler", "streams"}
    # Only the newest two checkpoints are kept.
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == ["step-0000008", "step-0000012"]


def test_size_probabilities():
    sizes = {"a": 100, "b": 400}
    assert size_probabilities(sizes, kind="uniform") == {"a": 0.5, "b": 0.5}
    assert size_probabilities(sizes, kind="proportional") == pytest.approx({"a": 0.2, "b": 0.8})
    # p ∝ n^(1/T): T=2 gives sqrt sizes 10 : 20.
    assert size_probabilities(sizes, kind="temperature", temperature=2.0) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    assert size_probabilities(sizes, kind="weights", weights={"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="name every task"):
        size_probabilities(sizes, kind="weights", weights={"a": 1})


def test_sampler_frequencies_and_state_round_trip():
    sampler = CategoricalSampler({"a": 0.2, "b": 0.8}, seed=0)
    draws = [sampler.sample() for _ in range(5000)]
    assert draws.count("a") / 5000 == pytest.approx(0.2, abs=0.02)
    state = json.loads(json.dumps(sampler.state_dict()))  # must survive JSON
    expected = [sampler.sample() for _ in range(50)]
    restored = CategoricalSampler({"a": 0.2, "b": 0.8}, seed=99)
    restored.load_state_dict(state)
    assert [restored.sample() for _ in range(50)] == expected


def test_batch_stream_covers_each_epoch_and_restores():
    stream = BatchStream(10, 4, seed=1)
    epoch = stream.next_indices() + stream.next_indices() + stream.next_indices()
    assert sorted(epoch) == list(range(10))  # batches of 4, 4, 2 cover the epoch once
    state = stream.state_dict()
    expected = [stream.next_indices() for _ in range(5)]
    other = BatchStream(10, 4, seed=1)
    other.load_state_dict(state)
    assert [other.next_indices() for _ in range(5)] == expected


def test_mixed_sampler_follows_the_schedule_and_restores():
    from metalm.learn.samplers import MixedSampler

    def build(seed):
        return MixedSampler(CategoricalSampler({"a": 1, "b": 1}, seed=seed), CategoricalSampler({"t": 1}, seed=seed),
                            period=10, first_draws=6)

    sampler = build(0)
    draws = [sampler.sample() for _ in range(30)]
    for period in range(3):
        part = draws[10 * period:10 * period + 10]
        assert set(part[:6]) <= {"a", "b"} and part[6:] == ["t"] * 4
    assert {"a", "b"} <= set(draws)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.sample() for _ in range(25)]
    other = build(7)
    other.load_state_dict(state)
    assert [other.sample() for _ in range(25)] == expected


def test_mixed_sampler_from_config(tmp_path):
    from metalm.builders import build_sampler
    from metalm.schema import SamplerConfig

    class Sized:
        def __init__(self, n):
            self.n = n

        def size(self, split):
            return self.n

    tasks = {"sst2": Sized(100), "mrpc": Sized(10), "rte": Sized(5)}
    sampler = build_sampler(SamplerConfig(kind="mixed", target="rte", period=4, uniform_fraction=0.5), tasks, seed=0)
    draws = [sampler.sample() for _ in range(8)]
    assert draws[2:4] == ["rte", "rte"] and draws[6:8] == ["rte", "rte"]
    assert "rte" not in draws[0:2] + draws[4:6]
    with pytest.raises(ValueError, match="sampler.target"):
        build_sampler(SamplerConfig(kind="mixed", target="cola"), tasks, seed=0)


# --- optimiser: a separate learning rate for the task heads ------------------------------------------

def _model_with_heads():
    from metalm.builders import add_heads, build_model

    class FakeTask:  # add_heads reads only the kind and the number of labels
        def __init__(self, kind, labels):
            self.kind, self.spec = kind, type("Spec", (), {"num_labels": labels})()

    model, _ = build_model(EncoderConfig(name="tiny", dropout=0.0), seed=0)
    add_heads(model, {"a": FakeTask("classification", 3), "b": FakeTask("regression", 1)}, seed=0)
    return model


def test_head_seeds_depend_on_the_name_not_its_letters_or_the_task_order():
    from metalm.builders import add_heads, build_model, head_seed

    class FakeTask:
        def __init__(self, kind, labels):
            self.kind, self.spec = kind, type("Spec", (), {"num_labels": labels})()

    def heads(names):
        model, _ = build_model(EncoderConfig(name="tiny", dropout=0.0), seed=0)
        add_heads(model, {n: FakeTask("classification", 3) for n in names}, seed=0)
        return {n: torch.cat([p.detach().flatten() for p in model.heads[n].parameters()]) for n in names}

    forward, backward = heads(["ab", "ba"]), heads(["ba", "ab"])
    assert not torch.equal(forward["ab"], forward["ba"])  # sum(map(ord, name)) gave anagrams one head
    for name in ("ab", "ba"):
        assert torch.equal(forward[name], backward[name])
    assert head_seed(0, "ab") != head_seed(0, "ba") and head_seed(1, "ab") != head_seed(0, "ab")
    assert 0 <= head_seed(-3, "ab") < 2**64


def _old_groups(model) -> list[list[torch.nn.Parameter]]:
    """The grouping before head_lr existed: weight matrices (decay), then biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
    return [decay, [p for p in model.parameters() if all(p is not q for q in decay)]]


def test_head_lr_puts_the_heads_in_their_own_groups_on_the_same_schedule():
    from metalm.builders import build_optimization

    model = _model_with_heads()
    optimizer, scheduler = build_optimization(model, OptimConfig(lr=1e-4, head_lr=3e-3, warmup_ratio=0.5),
                                              steps=10)
    heads = {id(p) for n, p in model.named_parameters() if n.startswith("heads.")}
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4 / 5, 1e-4 / 5, 3e-3 / 5, 3e-3 / 5])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0, 0.01, 0.0]  # the split is kept
    encoder_groups, head_groups = optimizer.param_groups[:2], optimizer.param_groups[2:]
    assert all(id(p) not in heads for g in encoder_groups for p in g["params"])
    assert {id(p) for g in head_groups for p in g["params"]} == heads
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.defaults.get("fused") is True  # still the fused AdamW on CPU
    for _ in range(3):  # warmup 1/5 -> 4/5 of the peak: every group by the same factor
        before = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
        factors = [g["lr"] / b for g, b in zip(optimizer.param_groups, before)]
        assert factors == pytest.approx([factors[0]] * 4) and factors[0] > 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 4 / 5)
    assert optimizer.param_groups[2]["lr"] == pytest.approx(3e-3 * 4 / 5)


def test_head_lr_sets_the_size_of_the_first_adam_step():
    """Adam's first update is lr·g/(|g|+eps) ≈ ±lr: the heads move by head_lr, the encoder by lr."""
    from metalm.builders import build_optimization

    model = _model_with_heads().train()
    optimizer, _ = build_optimization(model, OptimConfig(lr=1e-4, head_lr=2e-2, weight_decay=0.0,
                                                         warmup_ratio=0.0), steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102], [101, 2178, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": torch.tensor([0, 2])}
    model.loss("a", batch).backward()
    optimizer.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["heads.a.1.weight"] == pytest.approx(2e-2, rel=1e-3)
    assert moved["encoder.embeddings.word_embeddings.weight"] == pytest.approx(1e-4, rel=1e-3)
    assert moved["heads.b.1.weight"] == 0.0  # no gradient, no step


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_without_head_lr_the_optimizer_is_as_before(name):
    from metalm.builders import build_optimization

    model = _model_with_heads()
    optimizer, _ = build_optimization(model, OptimConfig(name=name, lr=1e-3, weight_decay=0.01), steps=10)
    assert len(optimizer.param_groups) == 2
    for group, expected in zip(optimizer.param_groups, _old_groups(model)):
        assert [id(p) for p in group["params"]] == [id(p) for p in expected]
        assert group["initial_lr"] == 1e-3
    with_heads, _ = build_optimization(model, OptimConfig(name=name, lr=1e-3, head_lr=0.5), steps=10)
    assert [g["initial_lr"] for g in with_heads.param_groups] == [1e-3, 1e-3, 0.5, 0.5]
