"""Shen's pre-training across processes, checked by comparing parameters.

With ``streams: per_batch`` every micro-batch's draws (rows, tasks, masks, pseudo tokens, dropout)
are seeded from (seed, step, index), so two gloo processes can split each step's ``grad_accum``
micro-batches. The MLM baseline, hard labels and soft labels must then end with the teacher and
student one process reaches (float64), with the same h for every micro-batch and the same
held-out MLM curve; a 2-process run killed after a checkpoint and resumed must end bit for bit
where the uninterrupted 2-process run ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalm.config import ConfigError
from tests.gloo import run_on_processes
from tests.test_teacher import _pinned_run

METHODS = ("mlm", "hard", "soft")


class _Killed(RuntimeError):
    pass


def _state(teacher, student) -> dict[str, torch.Tensor]:
    return {**{f"teacher.{n}": p.detach().clone() for n, p in teacher.named_parameters()},
            **{f"student.{n}": p.detach().clone() for n, p in student.named_parameters()}}


def _run(method, comm, run_dir, **kwargs):
    teacher, student, out = _pinned_run(method, streams="per_batch", comm=comm, run_dir=run_dir, **kwargs)
    return {"params": _state(teacher, student), "h": out["h"], "curve": [c["mlm_loss"] for c in out["curve"]],
            "skipped": out["skipped"]}


def _work(rank: int, comm, root: Path) -> None:
    for method in METHODS:
        torch.save(_run(method, comm, root / method), root / f"{method}-rank{rank}.pt")
    torch.save(_run("hard", comm, root / "whole", samples=48, checkpoint_every=2), root / f"whole-rank{rank}.pt")

    def kill_at_3(done):
        if done == 3:
            raise _Killed

    try:
        _run("hard", comm, root / "killed", samples=48, checkpoint_every=2, on_step=kill_at_3)
    except _Killed:
        pass
    seen: list[int] = []
    torch.save(_run("hard", comm, root / "killed", samples=48, checkpoint_every=2, resume=True,
                    on_step=seen.append), root / f"resumed-rank{rank}.pt")
    torch.save(seen, root / f"resumed-steps-rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_on_processes(_work, tmp_path_factory.mktemp("teacher-dist"))


def _differ(a: dict, b: dict, rtol: float = 1e-10) -> list[str]:
    return [n for n in a if float((a[n] - b[n]).norm()) > rtol * max(float(b[n].norm()), 1e-12)]


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_end_where_one_process_ends(two_processes, method, tmp_path):
    from metalm.contracts import LocalCommunicator

    torch.set_num_threads(1)
    one = _run(method, LocalCommunicator(), tmp_path / method)
    ranks = [torch.load(two_processes / f"{method}-rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in one["params"])  # the processes agree
    assert _differ(ranks[0]["params"], one["params"]) == []
    assert ranks[0]["curve"] == pytest.approx(one["curve"], rel=1e-10) and len(one["curve"]) == 3
    assert ranks[0]["h"] == pytest.approx(one["h"], rel=1e-9, abs=1e-12)
    assert len(one["h"]) == (6 if method == "hard" else 0)  # one h per micro-batch: 3 steps x 2
    # the check can fail: the shared-stream run (other draws) ends elsewhere, and training moved things
    shared_teacher, shared_student, _ = _pinned_run(method)
    assert _differ(_state(shared_teacher, shared_student), one["params"]) != []


def test_a_killed_two_process_pretraining_resumes_bit_for_bit(two_processes):
    whole = torch.load(two_processes / "whole-rank0.pt", weights_only=True)
    for rank in range(2):
        assert torch.load(two_processes / f"resumed-steps-rank{rank}.pt", weights_only=True) == [3, 4, 5, 6]
        resumed = torch.load(two_processes / f"resumed-rank{rank}.pt", weights_only=True)
        assert all(torch.equal(resumed["params"][n], whole["params"][n]) for n in whole["params"]), rank
    resumed = torch.load(two_processes / "resumed-rank0.pt", weights_only=True)
    assert resumed["h"] == whole["h"] and len(whole["h"]) == 12 and resumed["curve"] == whole["curve"]


class _TwoProcesses:
    """A communicator that says there are two processes (the refusal happens before any exchange)."""

    rank, world_size = 0, 2


def test_shared_streams_are_refused_on_several_processes(tmp_path):
    with pytest.raises(ConfigError, match="needs streams: per_batch"):
        _pinned_run("hard", comm=_TwoProcesses(), run_dir=tmp_path)


def test_streams_must_be_known():
    from metalm.teacher.pretrain import PretrainSettings

    with pytest.raises(ConfigError, match="streams: expected one of"):
        PretrainSettings("hard", samples=8, streams="per_rank")
