"""Training across processes (``metalm.train.distributed``), checked by comparing parameters.

Two gloo processes started with ``torch.multiprocessing`` split each step's meta-batch; every
algorithm (multitask, FOMAML, second-order MAML, Reptile, meta-pretraining) and a MOMETAS-sampled
run must end with the parameters of the one-process run with the same meta-batch and seeds
(float64, dropout off in encoder and heads, so only the order of floating-point sums differs). A 2-process run with
dropout on, killed after a checkpoint and resumed, must end bit for bit where the uninterrupted
2-process run ends (each process's RNG state is in the checkpoint). The word embeddings go through
the row-sparse reduction of embedding tables, every other parameter through the dense one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalm.learn.algorithms import build_algorithm
from tests.gloo import run_on_processes
from tests.test_meta_algorithms import B, StubTask, tiny_model

# name -> (algorithm, its settings, sampler); every case runs 3 steps of a meta-batch of 4 episodes.
CASES = {
    "multitask": ("multitask", {}, "categorical"),
    "fomaml": ("fomaml", {"inner_lr": 0.1, "inner_steps": 2}, "categorical"),
    "maml": ("maml", {"inner_lr": 0.1, "inner_steps": 2}, "categorical"),
    "reptile": ("reptile", {"inner_lr": 0.1, "inner_steps": 2}, "categorical"),
    "metapretrain": ("metapretrain", {"inner_lr": 0.1, "inner_steps": 2}, "categorical"),
    "mometas": ("multitask", {}, "mometas"),
}
STEPS, META_BATCH = 3, 4
OPT = lambda params: torch.optim.AdamW(params, lr=1e-2)


class _Killed(RuntimeError):
    pass


def _sampler(kind: str):
    from metalm.learn.objective_samplers import MometasSampler
    from metalm.learn.samplers import CategoricalSampler

    if kind == "mometas":
        return MometasSampler(["t", "u"], seed=0, update_every=1, meta_lr=1.0, validation_batch_size=B)
    return CategoricalSampler({"t": 0.5, "u": 0.5}, seed=0)


def _dropout_model() -> torch.nn.Module:
    """The tiny model with dropout 0.3 in its encoder (and its heads' 0.1), in float64."""
    return tiny_model(dtype=torch.float64, dropout=0.3)


def _without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The tiny encoder has no dropout, but its task heads do (0.1): turned off, so that which
    process runs an episode cannot change its loss."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _train(run_dir: Path, case: str, comm, *, model=None, steps: int = STEPS, resume: bool = False,
           kill_at: int | None = None, checkpoint_every: int = 0, seen: list | None = None) -> dict[str, torch.Tensor]:
    from metalm.train.loop import train_loop

    algorithm, settings, sampler = CASES[case]
    torch.manual_seed(0)  # what the recipe's seed_everything does
    model = model if model is not None else _without_dropout(tiny_model(dtype=torch.float64))
    optimizer = OPT(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def on_step(done):
        if seen is not None:
            seen.append(done)
        if done == kill_at:
            raise _Killed(done)

    train_loop(model=model, tasks={"t": StubTask(2), "u": StubTask(3)}, algorithm=build_algorithm(algorithm, **settings),
               sampler=_sampler(sampler), optimizer=optimizer, scheduler=scheduler, steps=steps, batch_size=B, seed=0,
               run_dir=run_dir, tasks_per_step=META_BATCH, log_every=1, progress=False, tensorboard=False,
               checkpoint_every=checkpoint_every, resume=resume, on_step=on_step, comm=comm)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _work(rank: int, comm, root: Path) -> None:
    import metalm.train.distributed as distributed

    distributed.SPARSE_ROWS_FROM = 50  # the tiny word embeddings (100 rows) take the row-sparse path
    for case in CASES:
        torch.save(_train(root / case, case, comm), root / f"{case}-rank{rank}.pt")
    # dropout on: uninterrupted, then killed after the step-2 checkpoint and resumed
    torch.save(_train(root / "whole", "maml", comm, model=_dropout_model(), steps=4,
                      checkpoint_every=2), root / f"whole-rank{rank}.pt")
    try:
        _train(root / "killed", "maml", comm, model=_dropout_model(), steps=4, checkpoint_every=2,
               kill_at=2)
    except _Killed:
        pass
    seen: list[int] = []
    torch.save(_train(root / "killed", "maml", comm, model=_dropout_model(), steps=4,
                      checkpoint_every=2, resume=True, seen=seen), root / f"resumed-rank{rank}.pt")
    torch.save(seen, root / f"resumed-steps-rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_on_processes(_work, tmp_path_factory.mktemp("dist"))


# The attention's key bias has a zero gradient in exact arithmetic (a softmax does not change when
# the same number is added to every score), so its float64 gradient is rounding noise, which AdamW
# normalises into steps of the full learning rate: it is compared as noise, not as a parameter.
NOISE_ONLY = "attention.self.key.bias"


def _close(a: dict, b: dict, rtol: float = 1e-6) -> list[str]:
    """Names of the parameters that differ by more than ``rtol`` relative to their size."""
    return [n for n in a if NOISE_ONLY not in n and float((a[n] - b[n]).norm()) > rtol * max(float(b[n].norm()), 1e-12)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_end_where_one_process_ends(two_processes, case, tmp_path):
    from metalm.contracts import LocalCommunicator

    torch.set_num_threads(1)
    one = _train(tmp_path / case, case, LocalCommunicator())
    ranks = [torch.load(two_processes / f"{case}-rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in one)  # the processes agree exactly
    assert _close(ranks[0], one) == []
    start = tiny_model(dtype=torch.float64)
    moved = [n for n, p in start.named_parameters() if not torch.equal(p, one[n])]
    assert "encoder.embeddings.word_embeddings.weight" in moved  # the runs trained, so the check can fail
    # rank 0 alone logs; the log lists every step
    assert (two_processes / case / "metrics.jsonl").read_text().count('"event": "train"') == STEPS


def test_a_killed_two_process_run_resumes_bit_for_bit(two_processes):
    whole = torch.load(two_processes / "whole-rank0.pt", weights_only=True)
    for rank in range(2):
        assert torch.load(two_processes / f"resumed-steps-rank{rank}.pt", weights_only=True) == [3, 4]  # it resumed at step 2
        resumed = torch.load(two_processes / f"resumed-rank{rank}.pt", weights_only=True)
        assert all(torch.equal(resumed[n], whole[n]) for n in whole), rank


def test_dropout_differs_between_processes_so_resuming_needs_each_ones_rng(two_processes, tmp_path):
    """With dropout on, the 2-process run is not the 1-process run (each process draws its own
    masks), so the bit-for-bit resume above rests on every process's saved RNG state."""
    from metalm.contracts import LocalCommunicator

    torch.set_num_threads(1)
    one = _train(tmp_path / "one", "maml", LocalCommunicator(), model=_dropout_model(), steps=4)
    whole = torch.load(two_processes / "whole-rank0.pt", weights_only=True)
    assert _close(whole, one, rtol=1e-9) != []


def test_a_meta_batch_smaller_than_the_processes_is_refused(tmp_path):
    class _Three:
        rank, world_size = 0, 3

    with pytest.raises(ValueError, match="cannot be shared by 3 processes"):
        from metalm.train.loop import train_loop

        model = tiny_model(dtype=torch.float64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_loop(model=model, tasks={"t": StubTask(2)}, algorithm=build_algorithm("multitask"),
                   sampler=_sampler("categorical"), optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), steps=1, batch_size=B,
                   seed=0, run_dir=tmp_path, tasks_per_step=2, progress=False, tensorboard=False, comm=_Three())


def test_shares_cover_the_meta_batch_once():
    from metalm.train.distributed import share

    for count in range(1, 9):
        for world in range(1, count + 1):
            blocks = [list(share(count, r, world)) for r in range(world)]
            assert sum(blocks, []) == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_outside_torchrun_the_communicator_is_local(monkeypatch):
    from metalm.contracts import LocalCommunicator
    from metalm.train.distributed import communicator_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(communicator_from_env("cpu"), LocalCommunicator)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert isinstance(communicator_from_env("cpu"), LocalCommunicator)


def test_an_experiment_stage_runs_on_two_processes(tmp_path):
    """`stage_processes: 2`: the stage is `metalm train` under torchrun; its checkpoint records both
    processes' RNG states, and the sweep fine-tunes from the stage's final model."""
    import json

    from metalm.config import parse
    from metalm.experiments.runner import run_experiment
    from metalm.schema import ExperimentConfig

    cfg = parse(ExperimentConfig, {
        "title": "two-process stage", "output_dir": str(tmp_path / "out"), "threads": 1,
        "encoder": {"name": "tiny", "max_length": 32}, "data": {"cache_dir": str(tmp_path / "cache")},
        "targets": ["polarity"], "fractions": [0.2], "seeds": [0], "references": False, "stage_processes": 2,
        "finetune": {"epochs": 1, "batch_size": 8, "eval_each_epoch": False},
        "methods": [{"name": "joint", "train": {"tasks": ["polarity", "simlex"], "steps": 2, "batch_size": 4,
                                                "tasks_per_step": 2, "evaluate": False}}]})
    run_experiment(cfg, progress=False)
    stage = next((tmp_path / "out" / "methods" / "joint").rglob("final")).parent
    state = json.loads((stage / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["machine"]["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert state["rng_ranks"][0] != state["rng_ranks"][1]  # each process drew its own dropout
    assert (tmp_path / "out" / "results" / "joint" / "polarity" / "fraction-0.2" / "seed-0.json").exists()
    assert not list(stage.parent.glob(".*-stage.json"))  # the stage's launch file is removed
