"""The shared loop with optimiser groups and gradient accumulation: ``grad_accum`` micro-batches of
b rows make the step one batch of 2b rows makes, each group steps its own parameters with its own
learning rate and clipping, and a killed run with groups and accumulation resumes bit for bit."""

from __future__ import annotations

import pytest
import torch

from metalm.contracts import Episode
from metalm.learn.algorithms import build_algorithm
from metalm.learn.samplers import CategoricalSampler
from metalm.train.groups import OptimGroup
from metalm.train.loop import train_loop
from tests.test_meta_algorithms import VOCAB, tiny_model

ROWS, T = 32, 6


class RowTask:
    """Fixed rows of ids and labels; a batch is exactly the rows asked for (no padding)."""

    fingerprint = rows_read = None

    def __init__(self, num_labels: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (ROWS, T), generator=g)
        self.labels = torch.randint(0, num_labels, (ROWS,), generator=g)

    def size(self, split: str = "train") -> int:
        return ROWS

    def batch(self, split: str, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices))
        return {"input_ids": self.ids[idx], "attention_mask": torch.ones(len(idx), T, dtype=torch.long),
                "token_type_ids": torch.zeros(len(idx), T, dtype=torch.long), "labels": self.labels[idx]}

    def lengths(self, split: str = "train"):
        return None

    def held_out_split(self) -> str:
        return "train"


def _model():
    model = tiny_model(dtype=torch.float64)
    for module in model.modules():  # the loop trains in train mode: no dropout, so runs compare exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _tasks(both=False):
    return {"t": RowTask(2, seed=1), "u": RowTask(3, seed=2)} if both else {"t": RowTask(2, seed=1)}


def _constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _run(tmp_path, model, *, tasks, batch_size, steps=2, sampler=None, **kwargs):
    sampler = sampler or CategoricalSampler({n: 1.0 for n in tasks}, seed=0)
    return train_loop(model=model, tasks=tasks, algorithm=build_algorithm("multitask"), sampler=sampler, steps=steps,
                      batch_size=batch_size, seed=0, run_dir=tmp_path, log_every=1, progress=False,
                      tensorboard=False, **kwargs)


def test_two_micro_batches_of_b_rows_step_as_one_batch_of_2b_rows(tmp_path):
    # The stream's permutation depends on its seed and size only, so batches of 2b rows are the
    # concatenation of two consecutive batches of b rows; multitask's loss is a mean over rows.
    accumulated, whole = _model(), _model()
    for model, batch, accum, name in ((accumulated, 4, 2, "accum"), (whole, 8, 1, "whole")):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        _run(tmp_path / name, model, tasks=_tasks(), batch_size=batch, grad_accum=accum, optimizer=optimizer,
             scheduler=_constant(optimizer), clip_norm=None)
    moved = 0
    start = _model()
    for (name, a), b, s in zip(accumulated.named_parameters(), whole.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
        moved += not torch.equal(a, s)
    assert moved > 0


def test_each_group_steps_its_own_parameters_with_its_own_rate_and_clipping(tmp_path):
    model, reference = _model(), _model()
    encoder = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    opt_e, opt_h = torch.optim.SGD(encoder, lr=0.1), torch.optim.SGD(heads, lr=0.3)
    groups = [OptimGroup("encoder", tuple(encoder), opt_e, _constant(opt_e), None),
              OptimGroup("heads", tuple(heads), opt_h, _constant(opt_h), 1e-3)]
    _run(tmp_path, model, tasks=_tasks(), batch_size=4, steps=1, groups=groups)
    # By hand: the loop's first batch (stream seed 0 * 1000 + 0), the multitask gradient, then
    # θ − lr·g for the encoder and θ − lr·g·(1e-3 / (|g| + 1e-6)) for the heads (clipped).
    from metalm.data.batching import BatchStream

    rows = BatchStream(ROWS, 4, seed=0).next_indices()
    episode = Episode(task="t", support=(), query=_tasks()["t"].batch("train", rows))
    reference.train()
    build_algorithm("multitask").step(reference, [episode])
    named = dict(reference.named_parameters())
    head_grads = [p.grad for n, p in named.items() if n.startswith("heads.") and p.grad is not None]
    head_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in head_grads])))
    assert head_norm > 1e-3  # so the clipping is exercised
    for name, p in model.named_parameters():
        ref = named[name]
        if ref.grad is None:
            assert torch.equal(p, ref), name  # a head no episode used stays
            continue
        if name.startswith("heads."):
            expected = ref.detach() - 0.3 * ref.grad * (1e-3 / (head_norm + 1e-6))
        else:
            expected = ref.detach() - 0.1 * ref.grad
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14, msg=name)


class Killed(Exception):
    pass


def _grouped(model):
    encoder = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    groups = []
    for name, params, lr, clip in (("encoder", encoder, 1e-2, 1.0), ("heads", heads, 3e-2, 0.5)):
        opt = torch.optim.AdamW(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        groups.append(OptimGroup(name, tuple(params), opt, sched, clip))
    return groups


def test_a_killed_run_with_groups_and_accumulation_resumes_bit_for_bit(tmp_path):
    straight = _model()
    straight_groups = _grouped(straight)
    _run(tmp_path / "straight", straight, tasks=_tasks(both=True), batch_size=4, steps=6, grad_accum=2,
         groups=straight_groups, checkpoint_every=2)

    def kill_at_3(step):
        if step == 3:
            raise Killed

    killed = _model()
    with pytest.raises(Killed):
        _run(tmp_path / "killed", killed, tasks=_tasks(both=True), batch_size=4, steps=6, grad_accum=2,
             groups=_grouped(killed), checkpoint_every=2, on_step=kill_at_3)
    resumed = _model()
    resumed_groups = _grouped(resumed)
    result = _run(tmp_path / "killed", resumed, tasks=_tasks(both=True), batch_size=4, steps=6, grad_accum=2,
                  groups=resumed_groups, checkpoint_every=2, resume=True)
    assert result.step == 6
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    for g, h in zip(straight_groups, resumed_groups):
        assert g.scheduler.get_last_lr() == h.scheduler.get_last_lr()
        for p, q in zip(g.params, h.params):
            sa, sb = g.optimizer.state.get(p, {}), h.optimizer.state.get(q, {})
            assert sa.keys() == sb.keys()
            assert all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)
    from metalm.train.logging import read_log
    log_a = [r for r in read_log(tmp_path / "straight") if r["event"] == "train"]
    log_b = [r for r in read_log(tmp_path / "killed") if r["event"] == "train"]
    assert log_a == log_b and "lr/heads" in log_a[0] and "grad_norm/encoder" in log_a[0]


def test_groups_and_a_single_optimizer_are_not_both_taken(tmp_path):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="either optimizer"):
        _run(tmp_path, model, tasks=_tasks(), batch_size=4, optimizer=optimizer, scheduler=_constant(optimizer),
             groups=_grouped(model))


def test_a_group_over_another_models_parameters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="parameters of the model"):
        _run(tmp_path, _model(), tasks=_tasks(), batch_size=4, groups=_grouped(_model()))


def test_a_checkpoint_resumes_only_with_the_groups_it_was_written_with(tmp_path):
    from metalm.train.checkpoint import CheckpointError

    model = _model()
    _run(tmp_path, model, tasks=_tasks(), batch_size=4, groups=_grouped(model), checkpoint_every=1)
    one = _model()
    optimizer = torch.optim.SGD(one.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"optimiser groups \['heads'\] besides the first, this run has \[\]"):
        _run(tmp_path, one, tasks=_tasks(), batch_size=4, steps=3, optimizer=optimizer,
             scheduler=_constant(optimizer), resume=True)


class _Source:
    """Episodes of task t from fixed rows, counted."""

    seekable = False

    def __init__(self):
        self.calls = 0

    def next_episodes(self, step, index):
        rows = list(range(4 * self.calls, 4 * self.calls + 4))
        self.calls += 1
        return [Episode(task="t", support=(), query=RowTask(2, seed=1).batch("train", rows))]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_an_episode_source_feeds_every_micro_batch_and_is_checkpointed(tmp_path, monkeypatch):
    import json

    from_source, from_stream = _model(), _model()
    source = _Source()
    opt = torch.optim.SGD(from_source.parameters(), lr=0.5)
    _run(tmp_path / "source", from_source, tasks={}, batch_size=4, steps=2, grad_accum=2, optimizer=opt,
         scheduler=_constant(opt), clip_norm=None, source=source, checkpoint_every=2,
         sampler=CategoricalSampler({"t": 1.0}, seed=0))  # updated, never sampled
    assert source.calls == 4
    state = json.loads((tmp_path / "source" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["source"] == {"calls": 4}

    class InOrder:  # the same rows in the same order, through the loop's own streams
        def __init__(self):
            self.position = 0

        def next_indices(self):
            self.position += 4
            return list(range(self.position - 4, self.position))

    import metalm.train.loop as loop
    monkeypatch.setattr(loop, "make_streams", lambda tasks, **kw: {n: InOrder() for n in tasks})
    opt = torch.optim.SGD(from_stream.parameters(), lr=0.5)
    _run(tmp_path / "stream", from_stream, tasks=_tasks(), batch_size=4, steps=2, grad_accum=2, optimizer=opt,
         scheduler=_constant(opt), clip_norm=None)
    for (name, a), b in zip(from_source.named_parameters(), from_stream.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="episode source"):
        _run(tmp_path / "all", _model(), tasks=_tasks(), batch_size=4, optimizer=opt, scheduler=_constant(opt),
             source=_Source(), all_tasks=True)
