"""Step time and peak memory of one meta-step: multitask vs FOMAML, MAML and Reptile at k inner steps.

    python benchmarks/meta_step.py [--quick] [--encoder minilm] [--batch 8] [--seq 64] [--ks 1,3,5]
                                   [--repeats 2] [--rounds 2] [--json out.json]

Every configuration (method, k) builds the same ``MultiTaskModel`` (one two-class classification
head, ``add_task("t", "classification", 2)``) from the same seed, runs one episode per step on the
same random token batches (B x T, attention mask all ones; the query is batch 0, the k support
batches are batches 1..k). Each configuration is timed in fresh processes and its memory is
measured in another, so no configuration sees another's allocator state, caches or attention
switch (second-order MAML switches the encoder to ``eager``); the processes are forked from a
server that has imported torch and transformers once, which keeps ``--quick`` fast.

A step is what the training loop does per meta-step: ``algorithm.step`` (writes ``.grad``), the
fused AdamW ``optimizer.step()`` of ``metalm.train.optim.build_optimizer`` and
``optimizer.zero_grad(set_to_none=True)`` (the loop's gradient clipping is left out).

* step time: the median over ``--rounds`` rounds of ``--repeats`` timed steps after one warm-up
  step; each round runs every configuration once, in a fresh process, in a rotating order, so a
  change in the load of a shared machine falls on all of them alike.
* peak memory, CPU: the memory process pins glibc's mmap threshold to 64 KiB before it builds the
  model (``mallopt``), so every tensor is mapped on allocation and unmapped on free and RSS follows
  live tensors (without this, freed chunks kept in the heap made the same measurement vary by
  +-30%; with it, repeated steps agree to within 1 MB). After one warm-up step it trims the heap,
  resets the kernel's RSS high-water mark (VmHWM, via ``/proc/self/clear_refs``) and reports VmHWM
  after one step minus RSS right before it. RSS is also sampled every 5 ms in a thread (psutil if
  installed, else ``/proc/self/statm``): the larger reading is kept, and it is the only one where
  VmHWM cannot be reset. Pinning slows large allocations (page faults), hence the separate process.
* peak memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` right before the step.

Derived ratios, all from this one run: step time / multitask step time; for FOMAML and Reptile,
step time / ((k+1) x multitask step time), the cost of a k-step first-order meta-step relative to
k+1 plain steps (the performance target for FOMAML is <= 1.10 at k=5); and peak memory at k / peak
memory at k=1 of the same method. Ratios are printed, never asserted: the machine may be shared.

``--quick`` (tiny random BERT, 2 x 16 tokens, k=1,2, 1 round of 2 steps) checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402  (sets OMP_WAIT_POLICY etc. before torch loads)

METHODS = ("multitask", "fomaml", "maml", "maml_recompute", "reptile")
FIRST_ORDER = ("fomaml", "reptile")  # rows that get the x (k+1) plain ratio
TASK = "t"


# ----------------------------------------------------------------------------------------------
# One configuration, in its own process
# ----------------------------------------------------------------------------------------------

def run_config(cfg: dict) -> dict:
    """One configuration, ``cfg["measure"]`` = ``time`` (``repeats`` timed steps after one warm-up)
    or ``memory`` (the peak memory added by one step after one warm-up)."""
    measure = cfg["measure"]
    if measure not in ("time", "memory"):
        raise ValueError(f"measure must be 'time' or 'memory', got {measure!r}")
    pinned = measure == "memory" and cfg["device"] == "cpu" and _measure.pin_malloc()

    import torch

    from metalm.learn.algorithms import Episode, build_algorithm
    from metalm.train.optim import build_optimizer
    from metalm.train.precision import autocast

    model, device = _measure.build_model(encoder=cfg["encoder"], device=cfg["device"], seed=cfg["seed"],
                                         threads=cfg.get("threads"), task=TASK)
    encoder = model.encoder

    method, k = cfg["method"], cfg["k"]
    if method == "multitask":
        algorithm = build_algorithm("multitask")
    elif method == "maml_recompute":  # second-order MAML recomputing its inner steps in backward
        algorithm = build_algorithm("maml", inner_steps=k, inner_lr=cfg["inner_lr"], recompute_inner_steps=True)
    else:
        algorithm = build_algorithm(method, inner_steps=k, inner_lr=cfg["inner_lr"])
    batches = _measure.random_batches(1 + cfg["max_k"], batch=cfg["batch"], seq=cfg["seq"],
                                      vocab=encoder.config.vocab_size, seed=cfg["seed"], device=device)
    # multitask: k=0, no support batches; the query is the same batch 0 for every method
    episode = Episode(task=TASK, support=tuple(batches[1:1 + k]), query=batches[0])
    optimizer = build_optimizer(model, lr=cfg["lr"])

    def step() -> None:
        with autocast(device, cfg.get("precision", "fp32")):
            algorithm.step(model, [episode])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, kernels, the attention switch of second-order MAML
    _measure.synchronize(device)
    result = {
        "method": method, "k": k if method != "multitask" else None,
        "attention": getattr(encoder.config, "_attn_implementation", None),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "torch_threads": torch.get_num_threads(), "precision": cfg.get("precision", "fp32"),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if measure == "time":
        return {**result, **_measure.time_steps(step, device, cfg["repeats"])}
    return {**result, **_measure.step_memory(step, device, pinned=pinned)}


def _measure_one(ctx, cfg: dict) -> dict:
    name = f"{cfg['method']} k={cfg['k']} ({cfg['measure']})"
    return _measure.run_fresh(ctx, run_config, cfg, name)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def label(row: dict) -> str:
    return row["method"] + ("" if row["method"] == "multitask" else f" k={row['k']}")


def add_ratios(rows: list[dict]) -> None:
    plain = next(r["step_time_s"] for r in rows if r["method"] == "multitask")
    k1_peak = {r["method"]: r["peak_mb"] for r in rows if r["k"] == 1}
    for r in rows:
        r["x_multitask"] = r["step_time_s"] / plain
        r["x_k_plus_1_plain"] = (r["step_time_s"] / ((r["k"] + 1) * plain)
                                 if r["method"] in FIRST_ORDER else None)
        base = k1_peak.get(r["method"]) if r["k"] is not None else None
        r["x_k1_peak"] = r["peak_mb"] / base if base and base > 0 else None


def table(rows: list[dict]) -> str:
    lines = ["| method | k | step time (s) | × multitask | × (k+1) plain | peak MB | × k=1 peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_measure.fmt(r['k'], 'd')} | {r['step_time_s']:.3f} | {r['x_multitask']:.2f} | "
                     f"{_measure.fmt(r['x_k_plus_1_plain'], '.2f')} | {r['peak_mb']:.1f} | {_measure.fmt(r['x_k1_peak'], '.2f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_common_args(p)
    _measure.add_meta_step_args(p, ks="default 1,3,5; quick: 1,2", rounds="default 2; quick: 1")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: algorithm.step under bfloat16 autocast (metalm.train.precision)")
    p.add_argument("--one", default=None, metavar="JSON",
                   help="measure one configuration in this process and print its result as JSON, for "
                        "debugging: a dict as run_config takes, e.g. {\"method\": \"fomaml\", \"k\": 5, "
                        "\"measure\": \"time\", \"encoder\": \"tiny\", \"batch\": 2, \"seq\": 16, \"repeats\": 2, "
                        "\"device\": \"cpu\", \"inner_lr\": 0.001, \"lr\": 5e-05, \"seed\": 0, \"max_k\": 5}")
    args = p.parse_args(argv)
    _measure.fill_defaults(args, quick=dict(encoder="tiny", batch=2, seq=16, ks="1,2", repeats=2, rounds=1),
                           full=dict(encoder="minilm", batch=8, seq=64, ks="1,3,5", repeats=2, rounds=2))
    _measure.check_meta_step_args(p, args)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in args.methods):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    if "multitask" not in args.methods:
        p.error("--methods must include multitask (every ratio is relative to it)")
    return args


def targets(rows: list[dict]) -> list[dict]:
    """The issue's meta-step targets that this run can check (printed, never asserted)."""
    by = {(r["method"], r["k"]): r for r in rows}
    out = []
    k = max((r["k"] for r in rows if r["method"] == "fomaml"), default=None)
    if k is not None:
        out.append(_measure.target(f"FOMAML k={k} step / ({k}+1) plain steps", by["fomaml", k]["x_k_plus_1_plain"],
                                   1.10))
    k = max((r["k"] for r in rows if r["method"] == "maml_recompute"), default=None)
    if k is not None and k > 1 and by.get(("maml_recompute", k), {}).get("x_k1_peak") is not None:
        out.append(_measure.target(f"second-order MAML, recompute: k={k} peak / k=1 peak",
                                   by["maml_recompute", k]["x_k1_peak"], 2.0))
    return out


def run(args: argparse.Namespace, command: str) -> dict:
    """Measures every configuration; returns the report (``text``) and every number."""
    device = _measure.resolve_device(args.device)
    base = dict(encoder=args.encoder, batch=args.batch, seq=args.seq, repeats=args.repeats, rounds=args.rounds,
                device=device, precision=args.precision,
                threads=args.threads, inner_lr=args.inner_lr, lr=args.lr, seed=args.seed, max_k=max(args.ks))
    configs = [dict(base, method=m, k=0 if m == "multitask" else k)
               for m in args.methods for k in ([0] if m == "multitask" else args.ks)]

    machine = _measure.machine(device, args.threads)
    started = time.perf_counter()
    ctx = _measure.context()
    names = [label(cfg) for cfg in configs]
    timed = _measure.time_in_rounds(ctx, run_config, configs, args.rounds, names)
    rows = []
    for cfg, name, time_row in zip(configs, names, timed):
        print(f"  {name}: memory ...", end=" ", file=sys.stderr, flush=True)
        memory = _measure_one(ctx, dict(cfg, measure="memory"))
        print(f"peak +{memory['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
        rows.append({**memory, **time_row})  # the same model facts; time and memory from separate processes
    add_ratios(rows)
    wall = time.perf_counter() - started

    memory_method = rows[0]["memory_method"]
    other_memory = {label(r): r["memory_method"] for r in rows if r["memory_method"] != memory_method}
    attention = {label(r): r["attention"] for r in rows}
    second_order_attn = sorted({r["attention"] for r in rows if r["method"].startswith("maml")})
    other_attn = sorted({str(r["attention"]) for r in rows if not r["method"].startswith("maml")})
    checks = targets(rows)

    lines = [f"## meta-step cost: {args.encoder}, batch {args.batch} x {args.seq} tokens, "
             f"one episode per step, step time: median of {args.rounds} rounds x {args.repeats} timed steps (each round "
             "a fresh process per configuration, after 1 warm-up)", "", table(rows), "",
             f"- command: `{command}` (cwd {os.getcwd()})",
             f"- machine: {_measure.machine_line(machine)} (load at start)",
             f"- model: {rows[0]['params']:,} trainable parameters; fused AdamW: {rows[0]['fused_adamw']}; "
             f"attention: {', '.join(other_attn)}" + (f" (second-order MAML: {', '.join(map(str, second_order_attn))})"
                                                     if second_order_attn else ""),
             "- step = algorithm.step + optimizer.step + zero_grad; each (method, k) timed in fresh processes (one a round) "
             "and its memory measured in another",
             f"- peak memory: increase during one step: {memory_method}"]
    lines += [f"  - except {name}: {how}" for name, how in other_memory.items()]
    lines += ["- × (k+1) plain: step time / ((k+1) × multitask step time), first-order rows only; "
              "× k=1 peak: peak / the same method's peak at k=1",
              "- timings are from a possibly shared machine: compare ratios within this run, not across runs"]
    lines += [_measure.target_line(t) for t in checks]
    lines.append(f"- wall time: {wall:.1f} s")
    return {"name": "meta_step", "text": "\n".join(lines), "targets": checks,
            "json": {"command": command, "cwd": os.getcwd(), "machine": machine,
                     "settings": {k: v for k, v in base.items() if k != "max_k"} | {"ks": args.ks,
                                                                                  "methods": args.methods},
                     "memory_method": memory_method, "attention": attention, "wall_time_s": wall,
                     "targets": checks, "rows": rows}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_config(json.loads(args.one))))
        return 0
    return _measure.report(args, run(args, _measure.command_line(argv)))


if __name__ == "__main__":
    sys.exit(main())
