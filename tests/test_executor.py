"""The `processes` executor: a pool of worker processes gives every cell exactly the result that
one process gives, a cell is claimed before it runs, and a finished sweep resumes from its files.

Runs use the random tiny encoder on the data that ships inside gensim (no data folder needed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalm.config import ConfigError, parse
from metalm.experiments.runner import run_experiment, worker_threads
from metalm.schema import ExperimentConfig
from metalm.train.lock import LOCK, RunFolderBusy


def _experiment(out: Path, cache: Path, **changes) -> ExperimentConfig:
    data = {"title": "executor test", "output_dir": str(out), "encoder": {"name": "tiny", "max_length": 32},
            "data": {"cache_dir": str(cache)}, "threads": 1,
            "targets": ["polarity"], "fractions": [0.2], "seeds": [0, 1],
            "finetune": {"epochs": 1, "batch_size": 8, "eval_each_epoch": False},
            "methods": [{"name": "none"},
                        {"name": "joint", "train": {"tasks": ["polarity", "simlex"], "steps": 3, "batch_size": 4,
                                                    "checkpoint_every": 0, "evaluate": False}},
                        {"name": "reptile", "train": {"tasks": ["simlex", "wordsim"], "algorithm": "reptile",
                                                      "steps": 2, "batch_size": 4, "inner_steps": 2,
                                                      "checkpoint_every": 0, "evaluate": False}}]}
    data.update(changes)
    return parse(ExperimentConfig, data)


def _results(out: Path) -> dict:
    return {str(p.relative_to(out)): {k: json.loads(p.read_text())[k] for k in ("scores", "curve", "train_size")}
            for p in sorted((out / "results").rglob("seed-*.json"))}


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_pool_of_processes_gives_each_cell_the_result_of_one_process(tmp_path, one_thread):
    local, pooled = tmp_path / "local", tmp_path / "pooled"
    rows_local, _ = run_experiment(_experiment(local, tmp_path / "cache"), progress=False)
    rows_pooled, _ = run_experiment(_experiment(pooled, tmp_path / "cache", executor="processes", workers=2),
                                    progress=False)
    expected = _results(local)
    assert len(expected) == 6  # 3 methods x 2 seeds
    assert _results(pooled) == expected  # bit for bit: same seeds, same thread count
    assert rows_pooled == rows_local
    for seed in (0, 1):  # each stage ran once, in the worker that fine-tuned from it
        assert (pooled / "methods" / "reptile" / f"seed-{seed}" / "final").is_dir()
    assert not list(pooled.rglob(LOCK))  # every claim released


def test_a_finished_pooled_sweep_resumes_from_its_files(tmp_path, one_thread, capsys):
    cfg = _experiment(tmp_path / "out", tmp_path / "cache", executor="processes", workers=2)
    rows, _ = run_experiment(cfg, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "results").rglob("seed-*.json")}
    again, _ = run_experiment(cfg, progress=True)
    assert again == rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing ran again
    assert capsys.readouterr().err.count("skipped finished cell") == 6


def test_a_cell_claimed_by_a_live_process_is_refused_and_a_dead_claim_taken_over(tmp_path, one_thread):
    cfg = _experiment(tmp_path / "out", tmp_path / "cache", methods=[{"name": "none"}], seeds=[0])
    cell = tmp_path / "out" / "results" / "none" / "polarity" / "fraction-0.2" / "seed-0"
    cell.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (cell / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(RunFolderBusy, match=f"in use by process {holder.pid}"):
            run_experiment(cfg, progress=False)
        assert not cell.with_suffix(".json").exists()
    finally:
        holder.kill()
        holder.wait()
    run_experiment(cfg, progress=False)  # the holder is gone: its claim is taken over
    assert cell.with_suffix(".json").exists()


@pytest.mark.parametrize("changes, message", [
    ({"workers": 0}, "workers: expected a positive number of processes, got 0"),
    ({"executor": "proceses"}, "executor")])
def test_executor_settings_are_checked_at_parse_time(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _experiment(tmp_path / "out", tmp_path / "cache", **changes)


def test_worker_threads_share_out_the_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for workers, threads in ((2, 4), (3, 2), (16, 1)):
        cfg = _experiment(tmp_path / "out", tmp_path / "cache", executor="processes", workers=workers, threads=None)
        assert worker_threads(cfg) == threads
    assert worker_threads(_experiment(tmp_path / "out", tmp_path / "cache", threads=3)) == 3  # given: kept


def test_units_with_a_stage_go_first_and_hold_that_stages_cells(tmp_path):
    from metalm.experiments.runner import _plan, _units

    cfg = _experiment(tmp_path / "out", tmp_path / "cache")
    specs, finetune, jobs = _plan(cfg)
    units = _units(cfg, specs, finetune, jobs)
    methods = [[jobs[i][0].name for i in unit] for unit in units]
    assert methods == [["joint"], ["joint"], ["reptile"], ["reptile"], ["none"], ["none"]]
    assert sorted(i for unit in units for i in unit) == list(range(len(jobs)))


def test_slurm_jobs_on_submitits_local_backend_give_each_cell_the_result_of_one_process(tmp_path, one_thread):
    """`executor: slurm` with `cluster: local`: each unit is a job that submitit runs as a process of
    this machine (no Slurm here); the cells are those of one process, bit for bit."""
    pytest.importorskip("submitit")
    methods = [{"name": "none"}, {"name": "joint", "train": {"tasks": ["polarity", "simlex"], "steps": 3,
                                                             "batch_size": 4, "checkpoint_every": 0,
                                                             "evaluate": False}}]
    local, jobs = tmp_path / "local", tmp_path / "jobs"
    rows_local, _ = run_experiment(_experiment(local, tmp_path / "cache", methods=methods), progress=False)
    rows_jobs, _ = run_experiment(_experiment(jobs, tmp_path / "cache", methods=methods, executor="slurm",
                                              slurm={"cluster": "local", "cpus_per_task": 1, "timeout_min": 10}),
                                  progress=False)
    assert _results(jobs) == _results(local) and len(_results(local)) == 4
    assert rows_jobs == rows_local
    logs = [p for p in (jobs / "slurm").iterdir() if p.is_dir() and p.name != "%j"]  # %j: submitit's own files
    assert len(logs) == 4  # one job per unit, its logs kept
    assert not list(jobs.rglob(LOCK))


def test_slurm_resubmits_the_cells_of_failed_jobs_and_gives_up_with_their_logs(tmp_path, one_thread, monkeypatch):
    """A stand-in for submitit's executor runs each job in this process and fails the first
    attempt of every unit: the failed units are submitted again and succeed; with no retries the
    sweep stops naming the failed cells, and the job settings reach the executor as sbatch options."""
    submitit = pytest.importorskip("submitit")
    from types import SimpleNamespace

    from metalm.experiments import SweepFailed

    attempts: dict[tuple, int] = {}
    made: list = []

    class Job:
        def __init__(self, fn, args, number):
            self.fn, self.args, self.job_id = fn, args, f"fake_{number}"
            self.paths = SimpleNamespace(stdout=tmp_path / "logs" / self.job_id / "out")

        def result(self):
            unit = tuple(self.args[1])
            attempts[unit] = attempts.get(unit, 0) + 1
            if attempts[unit] == 1:
                raise submitit.core.utils.FailedJobError("node lost")
            return self.fn(*self.args)

    class Executor:
        cluster = "fake"

        def __init__(self, folder, cluster=None):
            made.append(self)

        def update_parameters(self, **params):
            self.params = params

        def map_array(self, fn, *columns):
            return [Job(fn, args, i) for i, args in enumerate(zip(*columns))]

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    slurm = {"partition": "cpu", "cpus_per_task": 1, "timeout_min": 30, "additional": {"account": "lab"}}
    cfg = _experiment(tmp_path / "out", tmp_path / "cache", methods=[{"name": "none"}], executor="slurm",
                      slurm={**slurm, "retries": 1})
    run_experiment(cfg, progress=False)
    assert len(_results(tmp_path / "out")) == 2 and sorted(attempts.values()) == [2, 2]
    assert made[0].params == {"name": "metalm-out", "timeout_min": 30, "cpus_per_task": 1,
                              "slurm_array_parallelism": 64, "slurm_partition": "cpu",
                              "slurm_additional_parameters": {"account": "lab"}}
    attempts.clear()
    cfg = _experiment(tmp_path / "again", tmp_path / "cache", methods=[{"name": "none"}], executor="slurm",
                      slurm={**slurm, "retries": 0})
    with pytest.raises(SweepFailed, match=r"2 job\(s\) of the sweep .* failed(.|\n)*none / polarity .* seed 1"):
        run_experiment(cfg, progress=False)
    assert not list((tmp_path / "again").rglob("seed-*.json"))  # nothing half-written


def test_slurm_settings_are_checked_at_parse_time(tmp_path):
    with pytest.raises(ConfigError, match="timeout_min: expected a positive number"):
        _experiment(tmp_path / "out", tmp_path / "cache", executor="slurm", slurm={"timeout_min": 0})
    with pytest.raises(ConfigError, match="slurm"):
        _experiment(tmp_path / "out", tmp_path / "cache", executor="slurm", slurm={"partitoin": "gpu"})
