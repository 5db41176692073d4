"""The data pipeline: first tokenisation of a GLUE task against a cached re-load of it.

    python benchmarks/data_pipeline.py [--quick] [--task sst2] [--split train] [--repeats 3] [--json out.json]

``metalm.tasks.task.load_task`` reads a task's files, tokenises them (MiniLM's fast tokenizer,
``--max-length`` 128) and stores the columns in a content-addressed Arrow cache; a later load
with the same files, spec, tokenizer and length reads the cache instead. Each load runs in a
fresh process (forked from a server that imported transformers and datasets once, so imports are
not timed) and times ``load_task`` alone, the tokenizer being loaded beforehand:

* first tokenisation: ``load_task`` with an empty temporary cache folder (read + tokenise + write
  the Arrow entry), once per repeat, each with a new empty folder;
* cached re-load: ``load_task`` again on the filled folder, ``--repeats`` times (median).

The cached load must return the same columns as the first one (checked by a digest of every
column; a mismatch stops the run). The data root is ``--data``, else ``$METALM_DATA``, else
``../shared/data`` beside the project. ``--quick`` loads SST-2's dev split (872 sentences).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ["transformers", "datasets", "metalm.tasks.task", "metalm.tasks.registry", "metalm.models.encoder"]


def load_once(cfg: dict) -> dict:
    """One ``load_task`` of ``cfg["task"]``'s split into ``cfg["cache_dir"]``, timed; a digest of the columns."""
    from metalm.models.encoder import load_tokenizer
    from metalm.tasks.registry import get_task_spec
    from metalm.tasks.task import load_task

    _measure.quiet_transformers()
    # Imports are not timed, whatever the fork server preloaded (run_all.py starts it for the first
    # benchmark, without `datasets`; the first cached load would otherwise include its import, ~0.5 s).
    import datasets  # noqa: F401
    import pyarrow  # noqa: F401

    tokenizer = load_tokenizer(cfg["tokenizer"])
    spec = get_task_spec(cfg["task"])
    start = time.perf_counter()
    task = load_task(spec, tokenizer, root=cfg["root"], cache_dir=cfg["cache_dir"], max_length=cfg["max_length"],
                     splits=[cfg["split"]])
    seconds = time.perf_counter() - start
    columns = task.splits[cfg["split"]]
    # One epoch of padded batches of 32, as training reads them (after the timed load).
    n = len(columns["input_ids"])
    start = time.perf_counter()
    for lo in range(0, n, 32):
        task.batch(cfg["split"], range(lo, min(n, lo + 32)))
    epoch = time.perf_counter() - start
    # Every row of every column as plain lists (a cached load holds ragged columns as RaggedColumn,
    # whose rows are made lists on access; the digest reads them all, after the timing).
    start = time.perf_counter()
    plain = {name: list(column) for name, column in columns.items()}
    access = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
    tokens = sum(len(ids) for ids in plain["input_ids"])
    return {"seconds": seconds, "examples": len(columns["input_ids"]), "tokens": tokens, "digest": digest,
            "all_rows_s": access, "epoch_s": epoch}


def data_root(arg: str | None) -> Path:
    root = Path(arg or os.environ.get("METALM_DATA") or PROJECT_ROOT.parent / "shared" / "data")
    if not root.is_dir():
        raise SystemExit(f"data_pipeline.py: data root {root} is not a folder (use --data or METALM_DATA)")
    return root


def run(args: argparse.Namespace, command: str) -> dict:
    root = data_root(args.data)
    machine = _measure.machine("cpu")
    ctx = _measure.context(PRELOAD)
    base = dict(task=args.task, split=args.split, root=str(root), tokenizer=args.tokenizer, max_length=args.max_length)
    started = time.perf_counter()
    first, cached = [], []
    with tempfile.TemporaryDirectory(prefix="metalm-bench-cache-") as tmp:
        for i in range(args.repeats):
            cache_dir = Path(tmp) / f"cache{i}"  # a new, empty cache each time
            print(f"[{i + 1}/{args.repeats}] first tokenisation ...", end=" ", file=sys.stderr, flush=True)
            first.append(_measure.run_fresh(ctx, load_once, dict(base, cache_dir=str(cache_dir)), "first tokenisation"))
            print(f"{first[-1]['seconds']:.2f} s; cached re-load ...", end=" ", file=sys.stderr, flush=True)
            cached.append(_measure.run_fresh(ctx, load_once, dict(base, cache_dir=str(cache_dir)), "cached re-load"))
            print(f"{cached[-1]['seconds']:.3f} s", file=sys.stderr, flush=True)
    if {r["digest"] for r in first + cached} != {first[0]["digest"]}:
        raise RuntimeError("the cached load returned other columns than the first tokenisation")
    wall = time.perf_counter() - started
    t_first = statistics.median(r["seconds"] for r in first)
    t_cached = statistics.median(r["seconds"] for r in cached)
    speedup = t_first / t_cached
    n, tokens = first[0]["examples"], first[0]["tokens"]
    checks = [_measure.target(f"{args.task}/{args.split}: first tokenisation / cached re-load", speedup, 10.0,
                              at_least=True)]
    lines = [f"## data pipeline: {args.task}/{args.split} ({n:,} examples, {tokens:,} tokens), "
             f"max length {args.max_length}, {args.repeats} runs (median)", "",
             "| load | time (s) | examples/s | × faster |", "|---|---:|---:|---:|",
             f"| first tokenisation (empty cache) | {t_first:.3f} | {n / t_first:,.0f} | 1.00 |",
             f"| cached re-load | {t_cached:.3f} | {n / t_cached:,.0f} | {speedup:.1f} |", "",
             f"- command: `{command}` (cwd {os.getcwd()})",
             f"- machine: {_measure.machine_line(machine)} (load at start)",
             "- each load is `load_task` alone in a fresh process (imports and tokenizer loading not timed); "
             "cached columns checked identical to the first tokenisation's",
             f"- afterwards, one epoch of padded batches of 32 (`task.batch`, not timed above): "
             f"{statistics.median(r['epoch_s'] for r in cached):.3f} s after the cached load, "
             f"{statistics.median(r['epoch_s'] for r in first):.3f} s after the first (cached ragged columns "
             "are padded straight from Arrow-backed NumPy arrays)",
             f"- afterwards, every row of every column read as Python lists (not timed above; a cached load "
             f"keeps ragged columns in Arrow and makes a row a list when it is read): "
             f"{statistics.median(r['all_rows_s'] for r in cached):.3f} s after the cached load, "
             f"{statistics.median(r['all_rows_s'] for r in first):.3f} s after the first",
             _measure.target_line(checks[0]),
             f"- wall time: {wall:.1f} s"]
    return {"name": "data_pipeline", "text": "\n".join(lines), "targets": checks,
            "json": {"command": command, "cwd": os.getcwd(), "machine": machine, "settings": base | {"repeats": args.repeats},
                     "first_s": [r["seconds"] for r in first], "cached_s": [r["seconds"] for r in cached],
                     "all_rows_s": {"first": [r["all_rows_s"] for r in first], "cached": [r["all_rows_s"] for r in cached]},
                     "epoch_s": {"first": [r["epoch_s"] for r in first], "cached": [r["epoch_s"] for r in cached]},
                     "examples": n, "tokens": tokens, "speedup": speedup, "wall_time_s": wall, "targets": checks}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_common_args(p, model=False)
    p.add_argument("--task", default="sst2", help="a built-in task (default sst2)")
    p.add_argument("--split", default=None, help="split to load (default train; quick: dev)")
    p.add_argument("--repeats", type=int, default=None, help="first/cached load pairs (default 3; quick: 1)")
    p.add_argument("--tokenizer", default="minilm")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--data", default=None, help="data root (default $METALM_DATA, else ../shared/data)")
    args = p.parse_args(argv)
    _measure.fill_defaults(args, quick=dict(split="dev", repeats=1), full=dict(split="train", repeats=3))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
