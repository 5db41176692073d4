"""Evaluation in length-sorted batches against file order: time and the scores.

    python benchmarks/eval_order.py [--quick] [--encoder minilm] [--tasks cola,stsb,quora,mrpc] [--json out.json]

``metalm.train.evaluate.predict_split`` scores a split's rows shortest first, so that little of
each batch of 64 is padding, and puts the predictions back in file order. This script scores each
task's dev split both ways with the same model (an untrained head on the encoder), alternating
the two orders ``--repeats`` times, and prints the median time of each, the ratio, and the largest
difference between the two orders' metrics (zero up to float rounding of the loss). Target: the
sorted order is at least 1.3x faster over all tasks together. ``--quick`` (tiny random BERT, RTE
and STS-B) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure  # noqa: E402  (before torch: it sets OMP_WAIT_POLICY)
import data_pipeline  # noqa: E402
import torch  # noqa: E402

import metalm.train.evaluate as evaluation  # noqa: E402
from metalm.builders import add_heads, build_model, build_tasks  # noqa: E402
from metalm.schema import DataConfig, EncoderConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, RTE and STS-B, 1 repeat")
    p.add_argument("--encoder", default=None, help="encoder (default minilm; quick: tiny)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default cola,stsb,quora,mrpc)")
    p.add_argument("--seq", type=int, default=64, help="max_length")
    p.add_argument("--repeats", type=int, default=None, help="timings per order, alternating (default 2)")
    p.add_argument("--data", default=None, help="data root (default: ../shared/data or $METALM_DATA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    args.encoder = args.encoder or ("tiny" if args.quick else "minilm")
    args.tasks = [t for t in (args.tasks or ("rte,stsb" if args.quick else "cola,stsb,quora,mrpc")).split(",") if t]
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


def _file_order(task, split: str, n: int) -> list[int]:
    return list(range(n))


def run(args: argparse.Namespace, command: str) -> dict:
    """Both orders on every task; the report (``text``, ``targets``, ``json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = str(data_pipeline.data_root(args.data))
    model, tokenizer = build_model(EncoderConfig(name=args.encoder), seed=0)
    tasks = build_tasks(args.tasks, tokenizer, data=DataConfig(root=root), max_length=args.seq)
    add_heads(model, tasks, seed=0)
    sorted_order = evaluation._length_order
    rows, totals = [], {"file": 0.0, "sorted": 0.0}
    try:
        for name, task in tasks.items():
            times, scores = {"file": [], "sorted": []}, {}
            for _ in range(args.repeats):
                for order, fn in (("file", _file_order), ("sorted", sorted_order)):
                    evaluation._length_order = fn
                    start = time.perf_counter()
                    scores[order] = evaluation.evaluate(model, task, "dev")
                    times[order].append(time.perf_counter() - start)
            file_s, sorted_s = statistics.median(times["file"]), statistics.median(times["sorted"])
            totals["file"] += file_s
            totals["sorted"] += sorted_s
            diff = max(abs(scores["file"][k] - scores["sorted"][k]) for k in scores["file"])
            rows.append({"task": name, "rows": task.size("dev"), "file_s": file_s, "sorted_s": sorted_s,
                         "ratio": file_s / sorted_s, "max_metric_diff": diff, "scores": scores["sorted"]})
    finally:
        evaluation._length_order = sorted_order
    ratio = totals["file"] / totals["sorted"]
    checks = [_measure.target("dev scoring, file order / length-sorted, all tasks", ratio, 1.3, at_least=True)]
    machine = _measure.machine("cpu", args.threads)
    result = {"command": command, "encoder": args.encoder, "seq": args.seq, "repeats": args.repeats, "tasks": rows,
              "ratio": ratio, "machine": machine, "wall_time_s": time.perf_counter() - started, "targets": checks}
    lines = [f"## evaluation order: {args.encoder}, max_length {args.seq}, batches of 64, "
             f"{args.repeats} repeats (median)", "",
             "| task | dev rows | file order (s) | length-sorted (s) | ratio | largest metric difference |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['rows']} | {r['file_s']:.2f} | {r['sorted_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['max_metric_diff']:.1e} |" for r in rows]
    lines += [f"| all | | {totals['file']:.2f} | {totals['sorted']:.2f} | {ratio:.2f} | |", "",
              f"- command: `{command}`", f"- machine: {_measure.machine_line(machine)}",
              _measure.target_line(checks[0]), f"- wall time: {result['wall_time_s']:.1f} s"]
    return {"name": "eval_order", "text": "\n".join(lines), "targets": checks, "json": result}


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
