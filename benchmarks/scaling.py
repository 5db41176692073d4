"""Training across processes: meta-step throughput at 1 and 2 ranks, side by side.

    python benchmarks/scaling.py [--quick] [--encoder minilm] [--algorithms multitask,fomaml,maml,reptile]
                                 [--episodes 2] [--k 1] [--steps 4] [--rounds 2] [--json out.json]

For each algorithm, the same training loop (``metalm.train.loop.train_loop``) runs in processes
joined by gloo (``metalm.train.distributed.TorchCommunicator``), one torch thread per rank, at 1
rank and at 2 ranks with the same work per rank (each round starts one set of processes per world
size, which runs every algorithm in turn on a freshly built model): ``--episodes`` episodes per rank and
step (so the meta-batch doubles at 2 ranks), ``--k`` inner steps, batches of 8 x 64 random token
ids. Each run times ``--steps`` steps after one warm-up step (rank 0's, which waits for the gradient
all-reduce); ``--rounds`` rounds each run 1 rank and 2 ranks, in alternating order, and a step
time is the median over every round, so a change in the machine's load falls on both alike. Throughput is episodes per second; the ratio of 2 ranks to 1
is the speed-up of the same meta-batch per rank spread over two processes (2.0 would be perfect).
Target (the scale-out issue): at least 1.8x for every algorithm. On a machine with fewer cores
than ranks the ranks share cores and the ratio says so. ``--quick`` (a tiny random BERT, multitask and
MAML, one round) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure  # noqa: E402

ALGORITHMS = ("multitask", "fomaml", "maml", "reptile")
BATCH, SEQ = 8, 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 2 timed steps")
    p.add_argument("--encoder", default=None, help="encoder (default minilm; quick: tiny)")
    p.add_argument("--algorithms", default=None,
                   help="comma-separated subset of " + ",".join(ALGORITHMS) + " (default all; quick: multitask,maml)")
    p.add_argument("--episodes", type=int, default=2, help="episodes per rank and step (default 2)")
    p.add_argument("--k", type=int, default=1, help="inner steps of the meta-learning algorithms (default 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 4; quick: 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of 1-rank and 2-rank runs (default 2; quick: 1)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    _measure.fill_defaults(args, quick=dict(encoder="tiny", steps=2, rounds=1, algorithms="multitask,maml"),
                           full=dict(encoder="minilm", steps=4, rounds=2, algorithms=",".join(ALGORITHMS)))
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if not args.algorithms or any(a not in ALGORITHMS for a in args.algorithms):
        p.error(f"--algorithms: choose from {', '.join(ALGORITHMS)}")
    if min(args.episodes, args.k, args.steps, args.rounds) < 1:
        p.error("--episodes, --k, --steps and --rounds must be >= 1")
    return args


class _RandomTask:
    """Random token ids, the same batch for the same rows on every rank (``metalm.contracts.Task``)."""

    fingerprint = rows_read = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def size(self, split: str = "train") -> int:
        return 100_000

    def lengths(self, split: str = "train"):
        return None

    def held_out_split(self) -> str:
        return "train"

    def batch(self, split: str, indices):
        import torch

        g = torch.Generator().manual_seed(int(sum(indices)))
        return {"input_ids": torch.randint(1000, self.vocab, (BATCH, SEQ), generator=g),
                "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
                "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long),
                "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def _rank(rank: int, world: int, init_file: str, cfgs: list[dict], out: str) -> None:
    """Runs every configuration of ``cfgs`` in turn in this rank's process (one spawn per world size and
    round, so process start-up is paid once); rank 0 writes each one's step times."""
    import json

    import torch
    import torch.distributed as dist

    from metalm.learn.algorithms import build_algorithm
    from metalm.learn.samplers import CategoricalSampler
    from metalm.train.distributed import TorchCommunicator
    from metalm.train.loop import train_loop

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for cfg in cfgs:
            model, _ = _measure.build_model(encoder=cfg["encoder"], device="cpu", seed=0, threads=1)
            settings = {} if cfg["algorithm"] == "multitask" else {"inner_lr": 1e-3, "inner_steps": cfg["k"]}
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            stamps: list[float] = []
            start = time.perf_counter()
            train_loop(model=model, tasks={"t": _RandomTask(model.encoder.config.vocab_size)},
                       algorithm=build_algorithm(cfg["algorithm"], **settings),
                       sampler=CategoricalSampler({"t": 1.0}, seed=0), optimizer=optimizer, scheduler=scheduler,
                       steps=cfg["steps"] + 1, batch_size=BATCH, seed=0, run_dir=Path(out) / f"run-{cfg['algorithm']}",
                       tasks_per_step=cfg["episodes"] * world, log_every=0, progress=False, tensorboard=False,
                       comm=TorchCommunicator(), on_step=lambda done: stamps.append(time.perf_counter()))
            if rank == 0:
                times = [b - a for a, b in zip([start, *stamps], stamps)][1:]  # the warm-up step left out
                Path(out, f"times-{cfg['algorithm']}.json").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def _times(cfgs: list[dict], world: int) -> dict[str, list[float]]:
    """Step times of each configuration at ``world`` ranks, keyed by algorithm."""
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="metalm-scaling-") as tmp:
        mp.spawn(_rank, args=(world, str(Path(tmp) / "init"), cfgs, tmp), nprocs=world, join=True)
        return {c["algorithm"]: json.loads(Path(tmp, f"times-{c['algorithm']}.json").read_text()) for c in cfgs}


def _summary(cfg: dict, world: int, times: list[float]) -> dict:
    step = statistics.median(times)
    return {"ranks": world, "step_time_s": step, "times_s": times,
            "episodes_per_s": cfg["episodes"] * world / step}


def run(args: argparse.Namespace, command: str) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    rows, checks = {}, []
    cfgs = [{"encoder": args.encoder, "algorithm": algorithm, "k": args.k, "episodes": args.episodes,
             "steps": args.steps} for algorithm in args.algorithms]
    times = {a: {1: [], 2: []} for a in args.algorithms}
    for r in range(args.rounds):
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            for algorithm, got in _times(cfgs, world).items():
                times[algorithm][world] += got
                print(f"  {algorithm}, round {r + 1}: {world} rank(s) {statistics.median(got):.3f} s/step",
                      file=sys.stderr, flush=True)
    for cfg in cfgs:
        algorithm = cfg["algorithm"]
        one, two = _summary(cfg, 1, times[algorithm][1]), _summary(cfg, 2, times[algorithm][2])
        ratio = two["episodes_per_s"] / one["episodes_per_s"]
        rows[algorithm] = {"one": one, "two": two, "ratio": ratio}
        checks.append(_measure.target(f"{algorithm}: episodes/s at 2 ranks / 1 rank", ratio, 1.8, at_least=True))
    machine = _measure.machine("cpu", 1)
    result = {"command": command, "encoder": args.encoder, "episodes_per_rank": args.episodes, "k": args.k,
              "rounds": args.rounds,
              "rows": rows, "machine": machine, "cpus": os.cpu_count(), "wall_time_s": time.perf_counter() - started,
              "targets": checks}
    lines = [f"## scaling: {args.encoder}, {args.episodes} episode(s) of {BATCH} x {SEQ} per rank and step, "
             f"k={args.k}, gloo, 1 thread per rank, {args.rounds} round(s) of {args.steps} timed steps", "",
             "| algorithm | 1 rank (s/step) | 2 ranks (s/step) | episodes/s, 1 rank | episodes/s, 2 ranks | ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['one']['step_time_s']:.3f} | {row['two']['step_time_s']:.3f} | "
                     f"{row['one']['episodes_per_s']:.2f} | {row['two']['episodes_per_s']:.2f} | {row['ratio']:.2f} |")
    lines += ["", f"- command: `{command}`", f"- machine: {_measure.machine_line(machine)} ({os.cpu_count()} CPUs)"]
    lines += [_measure.target_line(c) for c in checks] + [f"- wall time: {result['wall_time_s']:.1f} s"]
    return {"name": "scaling", "text": "\n".join(lines), "targets": checks, "json": result}


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
