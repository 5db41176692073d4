"""Fine-tuning sweep throughput: one process against a pool of worker processes, side by side.

    python benchmarks/finetune.py [--quick] [--encoder minilm] [--task stsb_bi] [--cells 4] [--steps 60] [--json out.json]

A study's wall time is mostly fine-tunes of one encoder on one target over seeds. This script
runs the same sweep (``--cells`` seeds of one target at 10%, ``--steps`` fine-tuning steps each,
no stage) twice, each as ``metalm experiment`` in a fresh process on a warm tokenisation cache:
``executor: local`` with every core as torch threads, and ``executor: processes`` with one worker
per core at one thread each. It prints the fine-tuning steps per second of wall time of each (start-up, model loading and dev
scoring included, as in a study), their ratio and
the largest difference of a cell's score between the two (the thread count changes float
summation order, so scores agree to rounding, not bit for bit), against the standard deviation
of the scores over seeds. Target (the performance issue): the faster way is at least 1.5x the
one-process steps per second, with every score difference below the seed spread. ``--quick`` (tiny
random BERT on the offline polarity task, no warm-up sweep) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure  # noqa: E402
import data_pipeline  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder on polarity, 2 cells of 5 steps")
    p.add_argument("--encoder", default=None, help="encoder (default minilm; quick: tiny)")
    p.add_argument("--task", default=None, help="target task (default stsb_bi; quick: polarity)")
    p.add_argument("--cells", type=int, default=None, help="seeds, one fine-tune each (default 4; quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per cell (default 60; quick: 5)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="pool size (default: the CPUs)")
    p.add_argument("--data", default=None, help="data root (default: ../shared/data or $METALM_DATA)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    _measure.fill_defaults(args, quick=dict(encoder="tiny", task="polarity", cells=2, steps=5),
                           full=dict(encoder="minilm", task="stsb_bi", cells=4, steps=60))
    return args


def _sweep(args, root: Path, name: str, cache: Path, seeds: list[int], **settings) -> dict:
    """Runs one sweep as `metalm experiment` in a fresh process; its wall time and per-seed scores."""
    out = root / name
    config = {"title": f"finetune benchmark ({name})", "output_dir": str(out),
              "encoder": {"name": args.encoder, "max_length": 64},
              "data": {"cache_dir": str(cache), **({"root": args.data_root} if args.data_root else {})},
              "targets": [args.task], "fractions": [0.1], "seeds": seeds, "references": False,
              "finetune": {"epochs": 1, "min_steps": args.steps, "max_steps": args.steps, "batch_size": 16,
                           "eval_each_epoch": False},
              "methods": [{"name": "fine-tune"}], **settings}
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "METALM_PROGRESS_SECONDS": "3600"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "metalm", "experiment", str(path)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    scores = {}
    for seed in seeds:
        result = json.loads((out / "results" / "fine-tune" / args.task / "fraction-0.1" / f"seed-{seed}.json")
                            .read_text())
        split = next(iter(result["scores"]))
        metric = next(iter(result["scores"][split]))
        scores[seed] = result["scores"][split][metric]
    return {"wall_s": wall, "steps_per_s": len(seeds) * args.steps / wall, "scores": scores}


def run(args: argparse.Namespace, command: str) -> dict:
    started = time.perf_counter()
    args.data_root = None if args.quick else str(data_pipeline.data_root(args.data))
    cpus = os.cpu_count() or 1
    seeds = list(range(args.cells))
    with tempfile.TemporaryDirectory(prefix="metalm-finetune-bench-") as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        if not args.quick:  # tokenises into the shared cache, so neither timed sweep pays for it
            _sweep(args, root, "warm-up", cache, [0], threads=cpus)
        local = _sweep(args, root, "local", cache, seeds, threads=cpus)
        pooled = _sweep(args, root, "processes", cache, seeds, executor="processes", workers=args.workers,
                        threads=max(1, cpus // args.workers))
    ratio = pooled["steps_per_s"] / local["steps_per_s"]
    diff = max(abs(local["scores"][s] - pooled["scores"][s]) for s in seeds)
    spread = statistics.stdev(local["scores"].values()) if len(seeds) > 1 else float("nan")
    checks = [_measure.target("fine-tuning steps/s, pool of one-thread workers / one process", ratio, 1.5,
                              at_least=True),
              _measure.target("largest score difference / seed std (scores unchanged)",
                              diff / spread if spread > 0 else None, 1.0)]
    machine = _measure.machine("cpu", cpus)
    result = {"command": command, "encoder": args.encoder, "task": args.task, "cells": args.cells,
              "steps": args.steps, "workers": args.workers, "local": local, "processes": pooled, "ratio": ratio,
              "max_score_diff": diff, "seed_std": spread, "machine": machine,
              "wall_time_s": time.perf_counter() - started, "targets": checks}
    lines = [f"## fine-tuning sweep: {args.encoder} on {args.task} at 10%, {args.cells} cells x {args.steps} steps "
             "of 16", "",
             "| executor | wall (s) | fine-tuning steps/s | ratio |", "|---|---:|---:|---:|",
             f"| local, {cpus} threads | {local['wall_s']:.1f} | {local['steps_per_s']:.2f} | 1.00 |",
             f"| processes, {args.workers} workers x {max(1, cpus // args.workers)} thread(s) | "
             f"{pooled['wall_s']:.1f} | {pooled['steps_per_s']:.2f} | {ratio:.2f} |", "",
             f"- largest score difference between the two: {diff:.2e} (seed std {spread:.2e})",
             f"- command: `{command}`", f"- machine: {_measure.machine_line(machine)}"]
    if args.quick:
        lines.append("- quick: no warm-up sweep, so the local sweep's time includes tokenising (a smoke run, not a "
                     "measurement)")
    lines += [_measure.target_line(c) for c in checks] + [f"- wall time: {result['wall_time_s']:.1f} s"]
    return {"name": "finetune", "text": "\n".join(lines), "targets": checks, "json": result}


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
