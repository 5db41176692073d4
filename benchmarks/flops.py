"""Achieved FLOP/s of a training step against the dense matrix-multiply rate of the same machine.

    python benchmarks/flops.py [--quick] [--encoder minilm] [--batch 8] [--seq 64] [--methods multitask]
                               [--repeats 3] [--json out.json]

For each method (``multitask`` = one plain step; ``fomaml``/``maml`` at ``--k``) the script builds
the model of ``meta_step.py`` (encoder + one two-class head, random token batches of B x T) and
counts the floating-point operations of one step with ``torch.utils.flop_counter.FlopCounterMode``
(matrix multiplies, attention and convolutions: 2 per multiply-add; element-wise work is not
counted, so the figure is a lower bound on the work done). The step (``algorithm.step`` + fused
AdamW + ``zero_grad``) is then timed, uninstrumented: the median of ``--repeats`` steps after one
warm-up. Achieved FLOP/s = counted FLOPs / step time.

The reference is the rate this machine reaches on a dense ``torch.mm`` of two N x N matrices in
the step's dtype, measured in the same run right after the steps (the best of N = 512, 1024, 2048,
each the median of 5 products after one warm-up). Utilisation = achieved / dense-matmul rate. On
CUDA the step runs under bf16 autocast and the reference matmul is bf16 (``--dtype``).
``--quick``: tiny random BERT, 2 x 16 tokens, N = 256 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

TASK = "t"
METHODS = ("multitask", "fomaml", "maml", "reptile")


def step_fn(method: str, *, encoder: str, batch: int, seq: int, k: int, device, autocast_dtype, seed: int = 0):
    """(a full training step, trainable parameter count) for ``method`` on random batches."""
    import torch

    from metalm.learn.algorithms import Episode, build_algorithm
    from metalm.train.optim import build_optimizer

    model, device = _measure.build_model(encoder=encoder, device=device, seed=seed, task=TASK)
    enc = model.encoder
    k = 0 if method == "multitask" else k
    algorithm = build_algorithm(method) if method == "multitask" else build_algorithm(method, inner_steps=k, inner_lr=1e-3)
    batches = _measure.random_batches(1 + k, batch=batch, seq=seq, vocab=enc.config.vocab_size, seed=seed, device=device)
    episode = Episode(task=TASK, support=tuple(batches[1:]), query=batches[0])
    optimizer = build_optimizer(model, lr=5e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            algorithm.step(model, [episode])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(step) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``step`` (total, and per operator)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def matmul_rate(sizes: list[int], device, dtype, repeats: int = 5) -> dict:
    """The best FLOP/s of ``torch.mm`` over N x N matrices, N in ``sizes``."""
    import torch

    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            _measure.synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _measure.synchronize(device)
            times.append(time.perf_counter() - start)
        rates[n] = 2 * n**3 / statistics.median(times)
    best = max(rates, key=rates.get)
    return {"flops_per_s": rates[best], "best_n": best, "by_n": rates}


def run(args: argparse.Namespace, command: str) -> dict:
    import torch

    _measure.quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(_measure.resolve_device(args.device))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    autocast_dtype = None if dtype == torch.float32 else dtype
    machine = _measure.machine(device.type, args.threads)
    started = time.perf_counter()
    rows = []
    for method in args.methods:
        print(f"{method} ...", end=" ", file=sys.stderr, flush=True)
        step, params = step_fn(method, encoder=args.encoder, batch=args.batch, seq=args.seq, k=args.k, device=device,
                               autocast_dtype=autocast_dtype)
        step()  # warm-up (optimizer state, the attention switch of second-order MAML)
        flops, per_op = count_flops(step)
        timed = _measure.time_steps(step, device, args.repeats)
        rows.append({"method": method, "k": None if method == "multitask" else args.k, "flops": flops,
                     "flops_by_op": per_op, "params": params, **timed,
                     "achieved_flops_per_s": flops / timed["step_time_s"]})
        print(f"{flops / 1e9:.1f} GFLOP in {timed['step_time_s']:.3f} s", file=sys.stderr, flush=True)
        del step
    reference = matmul_rate(args.sizes, device, dtype)
    for r in rows:
        r["utilisation"] = r["achieved_flops_per_s"] / reference["flops_per_s"]
    wall = time.perf_counter() - started
    lines = [f"## achieved FLOP/s: {args.encoder}, batch {args.batch} x {args.seq} tokens, {dtype_name}, "
             f"{args.repeats} timed steps (median)", "",
             "| step | GFLOP / step | step time (s) | achieved GFLOP/s | dense matmul GFLOP/s | utilisation |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["method"] + ("" if r["k"] is None else f" k={r['k']}")
        lines.append(f"| {name} | {r['flops'] / 1e9:.3g} | {r['step_time_s']:.3f} | {r['achieved_flops_per_s'] / 1e9:.3g} | "
                     f"{reference['flops_per_s'] / 1e9:.3g} | {r['utilisation']:.1%} |")
    lines += ["", f"- command: `{command}` (cwd {os.getcwd()})",
              f"- machine: {_measure.machine_line(machine)} (load at start)",
              "- FLOPs: torch.utils.flop_counter.FlopCounterMode over one step (matmuls, attention; element-wise "
              "ops not counted); step = algorithm.step + fused AdamW + zero_grad, timed uninstrumented",
              f"- dense matmul: best torch.mm N x N {dtype_name} over N = {', '.join(map(str, args.sizes))} "
              f"(best N = {reference['best_n']}), measured in this run after the steps",
              f"- wall time: {wall:.1f} s"]
    return {"name": "flops", "text": "\n".join(lines), "targets": [],
            "json": {"command": command, "cwd": os.getcwd(), "machine": machine, "dtype": dtype_name,
                     "settings": {"encoder": args.encoder, "batch": args.batch, "seq": args.seq, "k": args.k,
                                  "repeats": args.repeats, "methods": args.methods},
                     "matmul": reference, "wall_time_s": wall, "rows": rows}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_common_args(p)
    p.add_argument("--methods", default="multitask", help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--k", type=int, default=1, help="inner steps for the meta-learning methods")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 3; quick: 2)")
    p.add_argument("--sizes", default=None, help="matmul sizes N (default 512,1024,2048; quick: 256)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    args = p.parse_args(argv)
    _measure.fill_defaults(args, quick=dict(encoder="tiny", batch=2, seq=16, repeats=2, sizes="256"),
                           full=dict(encoder="minilm", batch=8, seq=64, repeats=3, sizes="512,1024,2048"))
    args.sizes = [int(n) for n in str(args.sizes).split(",") if n.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or any(m not in METHODS for m in args.methods):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    if args.repeats < 1 or args.k < 1:
        p.error("--repeats and --k must be >= 1")
    return args


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
