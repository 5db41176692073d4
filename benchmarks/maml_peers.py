"""Second-order MAML in metalm against `higher` and `torchopt`: the same meta-step, side by side.

    python benchmarks/maml_peers.py [--quick] [--encoder minilm] [--batch 8] [--seq 64] [--ks 1]
                                    [--repeats 2] [--rounds 3] [--json out.json]

Every implementation builds the same ``MultiTaskModel`` (MiniLM + one two-class head) from the same
seed, switches it to eager attention (fused SDPA has no double backward, for any of them) and runs
the same meta-step on the same random batches: k SGD steps of learning rate α on the support
batches 1..k, the cross-entropy at the adapted parameters on the query batch 0, backpropagated
through the inner steps to θ (``.grad``), then the fused AdamW step and ``zero_grad`` of
``metalm.train.optim``. The implementations:

* ``metalm``: ``build_algorithm("maml", inner_steps=k, inner_lr=α).step(model, [episode])``
  (``torch.func.functional_call`` on parameter dicts);
* ``metalm_recompute``: the same with ``recompute_inner_steps=True`` (the inner steps are
  recomputed in backward instead of keeping their activations);
* ``higher``: ``higher.innerloop_ctx(model, SGD(lr=α), copy_initial_weights=False)``, ``diffopt.step``
  per support batch, ``query_loss.backward()`` (the library's documented MAML recipe);
* ``torchopt``: ``torchopt.MetaSGD(model, lr=α)``, ``inner_opt.step`` per support batch,
  ``query_loss.backward()``, then ``torchopt.recover_state_dict`` of the model and the inner
  optimiser (the library's documented MAML recipe).

Before anything is timed, one process computes the meta-gradient of each implementation at the
same θ with dropout off (``model.eval()``) and checks it equals metalm's (``torch.allclose``,
rtol 1e-4, atol 1e-5 × the largest entry); a mismatch stops the run. Step time and peak memory are
then measured as in ``meta_step.py`` (``_measure``: fresh processes for the time, another for the
memory, with dropout on as in training). The step time is the median over ``--rounds`` rounds of
``--repeats`` timed steps, each round running every implementation once in a fresh process in a
rotating order, so a change in the load of a shared machine falls on all of them alike. A peer that is not installed is reported as
"not installed" in the table, never left out silently (CI installs ``.[test]`` only; the peers are
in the ``bench`` extra: ``pip install -e ".[bench]"``).

``--quick`` (tiny random BERT, 2 x 16 tokens, k=1, 1 round of 2 steps) checks that the script runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402  (sets OMP_WAIT_POLICY etc. before torch loads)

IMPLS = ("metalm", "metalm_recompute", "higher", "torchopt")
PEERS = ("higher", "torchopt")
TASK = "t"
RTOL, ATOL_FRACTION = 1e-4, 1e-5


def installed(impl: str) -> bool:
    """metalm always; a peer when its package imports."""
    return impl not in PEERS or importlib.util.find_spec(impl) is not None


# ----------------------------------------------------------------------------------------------
# The meta-step of each implementation
# ----------------------------------------------------------------------------------------------

def _build(cfg: dict):
    """The model (eager attention), the episode's batches and the loss, identical for every implementation."""
    from metalm.learn.maml import ensure_double_backward_attention

    model, device = _measure.build_model(encoder=cfg["encoder"], device=cfg["device"], seed=cfg["seed"],
                                         threads=cfg.get("threads"), task=TASK)
    ensure_double_backward_attention(model)
    batches = _measure.random_batches(1 + cfg["k"], batch=cfg["batch"], seq=cfg["seq"],
                                      vocab=model.encoder.config.vocab_size, seed=cfg["seed"], device=device)
    return model, batches[1:], batches[0], device


def meta_grad_fn(impl: str, model, support, query, *, inner_lr: float):
    """A function that adds ``impl``'s second-order MAML meta-gradient into ``model``'s ``.grad``."""
    import torch.nn.functional as F

    def loss(logits, batch):
        return F.cross_entropy(logits, batch["labels"])  # the task_loss of a classification head

    if impl in ("metalm", "metalm_recompute"):
        from metalm.learn.algorithms import Episode, build_algorithm

        algorithm = build_algorithm("maml", inner_steps=len(support), inner_lr=inner_lr,
                                    recompute_inner_steps=impl == "metalm_recompute")
        episode = Episode(task=TASK, support=tuple(support), query=query)
        return lambda: algorithm.step(model, [episode])

    if impl == "higher":
        import higher
        import torch

        inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

        def step() -> None:
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                for batch in support:
                    diffopt.step(loss(fmodel(TASK, batch), batch))
                loss(fmodel(TASK, query), query).backward()

        return step

    if impl == "torchopt":
        import torchopt

        inner_opt = torchopt.MetaSGD(model, lr=inner_lr)
        model_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner_opt, by="reference")

        def step() -> None:
            for batch in support:
                inner_opt.step(loss(model(TASK, batch), batch))
            loss(model(TASK, query), query).backward()
            torchopt.recover_state_dict(model, model_state)
            torchopt.recover_state_dict(inner_opt, opt_state)

        return step

    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def check_config(cfg: dict) -> dict:
    """Meta-gradients of every implementation in ``cfg["impls"]`` at the same θ, dropout off, against metalm's."""
    import torch

    model, support, query, _ = _build(cfg)
    model.eval()  # no dropout: the implementations would draw different masks
    grads = {}
    for impl in cfg["impls"]:
        model.zero_grad(set_to_none=True)
        meta_grad_fn(impl, model, support, query, inner_lr=cfg["inner_lr"])()
        grads[impl] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    ref = grads["metalm"]
    scale = max(g.abs().max().item() for g in ref.values())
    out = {}
    for impl, g in grads.items():
        same_names = set(g) == set(ref)
        diff = max((g[n] - ref[n]).abs().max().item() for n in ref if n in g) if g else float("inf")
        close = same_names and all(torch.allclose(g[n], ref[n], rtol=RTOL, atol=ATOL_FRACTION * scale) for n in ref)
        out[impl] = {"equal": bool(close), "max_abs_diff": diff, "max_abs_grad": scale, "tensors": len(g)}
    return out


def run_config(cfg: dict) -> dict:
    """One implementation: ``measure`` = ``time`` or ``memory`` of a full step, after one warm-up."""
    pinned = cfg["measure"] == "memory" and cfg["device"] == "cpu" and _measure.pin_malloc()
    import torch

    from metalm.train.optim import build_optimizer

    model, support, query, device = _build(cfg)
    meta_grad = meta_grad_fn(cfg["impl"], model, support, query, inner_lr=cfg["inner_lr"])
    optimizer = build_optimizer(model, lr=cfg["lr"])

    def step() -> None:
        meta_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    _measure.synchronize(device)
    result = {"impl": cfg["impl"], "k": cfg["k"], "attention": model.encoder.config._attn_implementation,
              "torch_threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if cfg["measure"] == "time":
        return {**result, **_measure.time_steps(step, device, cfg["repeats"])}
    return {**result, **_measure.step_memory(step, device, pinned=pinned)}


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    lines = ["| implementation | k | meta-gradient = metalm | step time (s) | × faster peer | peak MB | × smaller peer peak |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status"):
            lines.append(f"| {r['impl']} | {r['k']} | {r['status']} | – | – | – | – |")
            continue
        check = r["check"]
        equal = f"{'yes' if check['equal'] else 'NO'} (max |Δ| {check['max_abs_diff']:.1e})"
        lines.append(f"| {r['impl']} | {r['k']} | {equal} | {r['step_time_s']:.3f} | {_measure.fmt(r['x_faster_peer'], '.2f')} | "
                     f"{r['peak_mb']:.1f} | {_measure.fmt(r['x_smaller_peer_peak'], '.2f')} |")
    return "\n".join(lines)


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        peers = [p for p in rows if p["k"] == r["k"] and p["impl"] in PEERS and not p.get("status")]
        measured = not r.get("status") and peers
        r["x_faster_peer"] = r["step_time_s"] / min(p["step_time_s"] for p in peers) if measured else None
        r["x_smaller_peer_peak"] = r["peak_mb"] / min(p["peak_mb"] for p in peers) if measured else None


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets for metalm's default second-order MAML (``metalm_recompute`` trades time for
    memory that grows less with k: its rows are information, its target is k=5 peak <= 2 x k=1 peak
    in meta_step.py)."""
    out = []
    for r in rows:
        if r["impl"] == "metalm" and r.get("x_faster_peer") is not None:
            out.append(_measure.target(f"{r['impl']} k={r['k']} step time / faster peer", r["x_faster_peer"], 1.0))
            out.append(_measure.target(f"{r['impl']} k={r['k']} peak / smaller peer peak", r["x_smaller_peer_peak"], 0.8))
    return out


def run(args: argparse.Namespace, command: str) -> dict:
    device = _measure.resolve_device(args.device)
    base = dict(encoder=args.encoder, batch=args.batch, seq=args.seq, repeats=args.repeats, rounds=args.rounds, device=device,
                threads=args.threads, inner_lr=args.inner_lr, lr=args.lr, seed=args.seed)
    machine = _measure.machine(device, args.threads)
    present = [i for i in args.impls if installed(i)]
    started = time.perf_counter()
    ctx = _measure.context(_measure.PRELOAD + [p for p in PEERS if p in present])
    rows = []
    for k in args.ks:
        print(f"k={k}: checking meta-gradients ...", end=" ", file=sys.stderr, flush=True)
        checks = _measure.run_fresh(ctx, check_config, dict(base, k=k, impls=present), f"meta-gradient check k={k}")
        print(", ".join(f"{i} {'ok' if c['equal'] else 'DIFFERENT'}" for i, c in checks.items()), file=sys.stderr)
        wrong = [i for i, c in checks.items() if not c["equal"]]
        if wrong:
            raise RuntimeError(f"k={k}: meta-gradients of {', '.join(wrong)} differ from metalm's: {checks}")
        missing = [{"impl": i, "k": k, "status": f"not installed (pip install {i}; or pip install -e '.[bench]')"}
                   for i in args.impls if i not in present]
        cfgs = [dict(base, k=k, impl=impl) for impl in present]
        names = [f"{impl} k={k}" for impl in present]
        timed = _measure.time_in_rounds(ctx, run_config, cfgs, args.rounds, names)
        for cfg, name, time_row in zip(cfgs, names, timed):
            print(f"  {name}: memory ...", end=" ", file=sys.stderr, flush=True)
            memory = _measure.run_fresh(ctx, run_config, dict(cfg, measure="memory"), f"{name} (memory)")
            print(f"peak +{memory['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
            rows.append({**memory, **time_row, "check": checks[cfg["impl"]]})
        rows += missing
    add_ratios(rows)
    wall = time.perf_counter() - started
    checks = targets(rows)
    measured = [r for r in rows if not r.get("status")]
    versions = {p: _version(p) for p in PEERS}
    lines = [f"## second-order MAML vs peers: {args.encoder}, batch {args.batch} x {args.seq} tokens, "
             f"α={args.inner_lr}, step time: median of {args.rounds} rounds x {args.repeats} timed steps (each round a "
             "fresh process per implementation, after 1 warm-up)", "", table(rows), "",
             f"- command: `{command}` (cwd {os.getcwd()})",
             f"- machine: {_measure.machine_line(machine)} (load at start)",
             f"- peers: " + ", ".join(f"{p} {v or 'not installed'}" for p, v in versions.items()),
             (f"- model: {measured[0]['params']:,} trainable parameters, attention {measured[0]['attention']} "
              "for every implementation" if measured else "- model: nothing measured"),
             "- step = meta-gradient into .grad + fused AdamW step + zero_grad; meta-gradients checked equal "
             f"(dropout off, rtol {RTOL:g}, atol {ATOL_FRACTION:g} × max |grad|) before timing",
             f"- peak memory: increase during one step: {measured[0]['memory_method'] if measured else '–'}",
             "- × faster peer: step time / the faster peer's at the same k; × smaller peer peak: peak / the "
             "smaller peer peak at the same k"]
    lines += [_measure.target_line(t) for t in checks]
    lines.append(f"- wall time: {wall:.1f} s")
    return {"name": "maml_peers", "text": "\n".join(lines), "targets": checks,
            "json": {"command": command, "cwd": os.getcwd(), "machine": machine, "settings": base | {"ks": args.ks},
                     "peers": versions, "wall_time_s": wall, "targets": checks, "rows": rows}}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _measure.add_common_args(p)
    _measure.add_meta_step_args(p, ks="default 1; quick: 1", rounds="default 3; quick: 1")
    p.add_argument("--impls", default=",".join(IMPLS), help="subset of " + ",".join(IMPLS))
    args = p.parse_args(argv)
    _measure.fill_defaults(args, quick=dict(encoder="tiny", batch=2, seq=16, ks="1", repeats=2, rounds=1),
                           full=dict(encoder="minilm", batch=8, seq=64, ks="1", repeats=2, rounds=3))
    _measure.check_meta_step_args(p, args)
    args.impls = [m.strip() for m in args.impls.split(",") if m.strip()]
    if any(m not in IMPLS for m in args.impls) or "metalm" not in args.impls:
        p.error(f"--impls: choose from {', '.join(IMPLS)}, including metalm (the reference)")
    return args


def main(argv=None) -> int:
    return _measure.script_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
