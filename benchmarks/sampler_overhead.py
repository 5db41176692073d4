"""Wall-time overhead of MOMETAS sampling over uniform sampling (Wu et al. 2022 §3.4: "the overhead
brought by MOMETAS is minimal"; target: under 3% at K = 100).

    python benchmarks/sampler_overhead.py [--quick] [--encoder minilm] [--steps 200] [--k 100] [--json out.json]

Builds one model with the five objectives (MLM, CSE, ATD, DTD, EMLM) on a corpus, then runs the
training loop (``metalm.train.loop.train_loop``) for the same number of steps from the same initial
weights with a uniform sampler and with MOMETAS (K = ``--k``), alternating the two ``--repeats``
times in one process, and prints the median wall times, the overhead, and the time spent in
meta-tests (every objective's validation loss, once before training and after every K steps).
``--quick`` (tiny random BERT, 20 steps, K = 10) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure  # noqa: E402  (before torch: it sets OMP_WAIT_POLICY)
import torch  # noqa: E402

from metalm.builders import add_heads, build_model, build_objectives, build_optimization  # noqa: E402
from metalm.learn.algorithms import build_algorithm  # noqa: E402
from metalm.learn.objective_samplers import MometasSampler  # noqa: E402
from metalm.learn.samplers import CategoricalSampler  # noqa: E402
from metalm.schema import CorpusConfig, DataConfig, EncoderConfig, ObjectiveConfig, OptimConfig  # noqa: E402
from metalm.train import feedback  # noqa: E402
from metalm.train.loop import train_loop  # noqa: E402

OBJECTIVES = ("mlm", "cse", "atd", "dtd", "emlm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 20 steps, K = 10, 1 repeat")
    p.add_argument("--encoder", default=None, help="encoder (default minilm; quick: tiny)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 200; quick: 20)")
    p.add_argument("--k", type=int, default=None, help="MOMETAS meta length K (default 100; quick: 10)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64, help="max_length")
    p.add_argument("--repeats", type=int, default=None, help="runs per sampler, alternating (default 2; quick: 1)")
    p.add_argument("--corpus", default=None, help="corpus path (default: ../shared/data/corpus/sotu)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    quick = args.quick
    args.encoder = args.encoder or ("tiny" if quick else "minilm")
    args.steps = args.steps or (20 if quick else 200)
    args.k = args.k or (10 if quick else 100)
    args.repeats = args.repeats or (1 if quick else 2)
    root = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    args.corpus = args.corpus or str(root / "corpus" / ("lee_background.cor" if quick else "sotu"))
    return args


def run(args: argparse.Namespace, command: str) -> dict:
    """Uniform and MOMETAS training runs, alternating; the report (``text``, ``targets``, ``json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = build_model(EncoderConfig(name=args.encoder), seed=0)
    corpus = CorpusConfig(paths=(args.corpus,), max_sentences=60 if args.quick else 4000)
    tasks = build_objectives([ObjectiveConfig(objective=o, corpus=corpus) for o in OBJECTIVES], tokenizer,
                             data=DataConfig(), max_length=args.seq, seed=0)  # tokens and entity tags cached
    add_heads(model, tasks, seed=0)
    initial = copy.deepcopy(model.state_dict())
    meta_test_time = [0.0]
    timed = feedback.validation_losses

    def counting(*a, **kw):
        start = time.perf_counter()
        try:
            return timed(*a, **kw)
        finally:
            meta_test_time[0] += time.perf_counter() - start

    import metalm.train.loop as loop_module
    loop_module.validation_losses = counting
    names = list(tasks)
    times = {"uniform": [], "mometas": []}
    meta = []
    try:
        for repeat in range(args.repeats):
            for kind in ("uniform", "mometas"):
                model.load_state_dict(initial)
                sampler = (CategoricalSampler({n: 1.0 for n in names}, seed=repeat) if kind == "uniform" else
                           MometasSampler(names, seed=repeat, update_every=args.k, meta_lr=0.1, entropy_weight=2.0,
                                          validation_batch_size=args.batch))
                optimizer, scheduler = build_optimization(model, OptimConfig(lr=5e-5), steps=args.steps)
                torch.manual_seed(repeat)
                meta_test_time[0] = 0.0
                with tempfile.TemporaryDirectory() as run_dir:
                    start = time.perf_counter()
                    train_loop(model=model, tasks=tasks, algorithm=build_algorithm("multitask"), sampler=sampler,
                               optimizer=optimizer, scheduler=scheduler, steps=args.steps, batch_size=args.batch,
                               seed=repeat, run_dir=run_dir, log_every=0, progress=False, tensorboard=False)
                    times[kind].append(time.perf_counter() - start)
                if kind == "mometas":
                    meta.append(meta_test_time[0])
    finally:
        loop_module.validation_losses = timed
    uniform, mometas = statistics.median(times["uniform"]), statistics.median(times["mometas"])
    overhead = 100 * (mometas - uniform) / uniform
    checks = [_measure.target(f"MOMETAS wall-time overhead over uniform, % (K = {args.k})", overhead, 3.0)]
    machine = _measure.machine("cpu", args.threads)
    result = {"command": command, "encoder": args.encoder, "steps": args.steps, "k": args.k, "batch": args.batch,
              "seq": args.seq, "repeats": args.repeats, "uniform_s": uniform, "mometas_s": mometas,
              "overhead_pct": overhead,
              "meta_test_s": statistics.median(meta), "meta_test_pct": 100 * statistics.median(meta) / uniform,
              "runs": times, "machine": machine, "wall_time_s": time.perf_counter() - started, "targets": checks}
    lines = [f"## sampler overhead: {args.encoder}, {args.steps} steps, batch {args.batch} x {args.seq}, "
             f"K = {args.k}, {args.repeats} repeats (median)", "",
             "| sampler | wall time (s, median) | overhead |", "|---|---|---|",
             f"| uniform | {uniform:.2f} | |",
             f"| MOMETAS | {mometas:.2f} | {overhead:+.1f}% (meta-tests: "
             f"{result['meta_test_s']:.2f} s = {result['meta_test_pct']:.1f}%) |", "",
             f"- command: `{command}`", f"- machine: {_measure.machine_line(machine)}",
             _measure.target_line(checks[0]), f"- wall time: {result['wall_time_s']:.1f} s"]
    return {"name": "sampler_overhead", "text": "\n".join(lines), "targets": checks, "json": result}


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
