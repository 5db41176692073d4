"""Step time and peak memory of one meta-step: multitask vs FOMAML, MAML and Reptile at k inner steps.

    python benchmarks/meta_step.py [--quick] [--encoder minilm] [--batch 8] [--seq 64] [--ks 1,3,5]
                                   [--repeats 3] [--json out.json]

Every configuration (method, k) builds the same ``MultiTaskModel`` (one two-class classification
head, ``add_task("t", "classification", 2)``) from the same seed, runs one episode per step on the
same random token batches (B x T, attention mask all ones; the query is batch 0, the k support
batches are batches 1..k). Each configuration is timed in one fresh process and its memory is
measured in another, so no configuration sees another's allocator state, caches or attention
switch (second-order MAML switches the encoder to ``eager``); the processes are forked from a
server that has imported torch and transformers once, which keeps ``--quick`` fast.

A step is what the training loop does per meta-step: ``algorithm.step`` (writes ``.grad``), the
fused AdamW ``optimizer.step()`` of ``metalm.train.optim.build_optimizer`` and
``optimizer.zero_grad(set_to_none=True)`` (the loop's gradient clipping is left out).

* step time: the median of ``--repeats`` timed steps after one warm-up step.
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

``--quick`` (tiny random BERT, 2 x 16 tokens, k=1,2, 2 repeats) checks that the script runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libgomp's default busy-wait makes torch's 2 OpenMP threads 5-7x slower when another process holds
# one of 2 cores (measured: MiniLM 8x64 forward+backward 0.6 s passive vs 3-4 s active). Set before
# torch loads libgomp; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

METHODS = ("multitask", "fomaml", "maml", "maml_recompute", "reptile")
FIRST_ORDER = ("fomaml", "reptile")  # rows that get the x (k+1) plain ratio
TASK = "t"
SAMPLE_INTERVAL_S = 0.005
MMAP_THRESHOLD = 64 * 1024
# Modules each measured process needs; the fork server imports them once (see _context).
PRELOAD = ["torch", "transformers", "transformers.models.bert.modeling_bert", "metalm.models.encoder",
           "metalm.models.multitask", "metalm.learn.algorithms", "metalm.train.optim"]


# ----------------------------------------------------------------------------------------------
# One configuration, in its own process
# ----------------------------------------------------------------------------------------------

def _rss_reader():
    """A function returning this process's current RSS in bytes."""
    try:
        import psutil

        proc = psutil.Process()
        return (lambda: proc.memory_info().rss), "psutil"
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read, "/proc/self/statm"


def _status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB, read at once (missing ones are left out)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    before = _status_kb("VmHWM").get("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    after = _status_kb("VmHWM", "VmRSS")
    if before is None or len(after) < 2:
        return False
    # reset: the mark dropped from the earlier (warm-up) peak, or sits at the current RSS
    return after["VmHWM"] < before or after["VmHWM"] <= after["VmRSS"] + 1024


def _pin_malloc() -> bool:
    """Makes glibc serve every allocation over 64 KiB by mmap and return it to the OS on free, so RSS
    follows live tensors. Called first thing in a memory-measuring process (before the model is
    built), so no large freed chunk is ever left in the heap to be reused unseen or kept resident.
    It slows large allocations down (page faults), which is why time is measured in another process.
    False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1 and mallopt(m_trim_threshold, MMAP_THRESHOLD) == 1


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Sampler:
    """Samples RSS every 5 ms in a background thread; ``peak`` is the largest value seen."""

    def __init__(self, read):
        self.read, self.peak = read, read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _batches(n: int, *, batch: int, seq: int, vocab: int, seed: int, device):
    """``n`` random token batches, identical in every configuration."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (batch, seq), generator=gen)  # (B, T)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (batch,), generator=gen)}  # labels (B,)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def run_config(cfg: dict) -> dict:
    """One configuration, ``cfg["measure"]`` = ``time`` (``repeats`` timed steps after one warm-up)
    or ``memory`` (the peak memory added by one step after one warm-up)."""
    measure = cfg["measure"]
    if measure not in ("time", "memory"):
        raise ValueError(f"measure must be 'time' or 'memory', got {measure!r}")
    pinned = measure == "memory" and cfg["device"] == "cpu" and _pin_malloc()

    import torch
    import transformers

    from metalm.learn.algorithms import Episode, build_algorithm
    from metalm.models.encoder import load_encoder
    from metalm.models.multitask import MultiTaskModel
    from metalm.train.optim import build_optimizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # metalm.learn.functional.task_loss_fn reads `is_gradient_checkpointing`, deprecated in
    # transformers 5 (FutureWarning once per process); keep the progress lines readable.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"

    torch.manual_seed(cfg["seed"])
    encoder, _ = load_encoder(cfg["encoder"])
    model = MultiTaskModel(encoder)
    model.add_task(TASK, "classification", 2)
    model.to(device).train()

    method, k = cfg["method"], cfg["k"]
    if method == "multitask":
        algorithm = build_algorithm("multitask")
    elif method == "maml_recompute":  # second-order MAML recomputing its inner steps in backward
        algorithm = build_algorithm("maml", inner_steps=k, inner_lr=cfg["inner_lr"], recompute_inner_steps=True)
    else:
        algorithm = build_algorithm(method, inner_steps=k, inner_lr=cfg["inner_lr"])
    batches = _batches(1 + cfg["max_k"], batch=cfg["batch"], seq=cfg["seq"], vocab=encoder.config.vocab_size,
                       seed=cfg["seed"], device=device)
    # multitask: k=0, no support batches; the query is the same batch 0 for every method
    episode = Episode(task=TASK, support=tuple(batches[1:1 + k]), query=batches[0])
    optimizer = build_optimizer(model, lr=cfg["lr"])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step() -> None:
        algorithm.step(model, [episode])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, kernels, the attention switch of second-order MAML
    sync()
    result = {
        "method": method, "k": k if method != "multitask" else None,
        "attention": getattr(encoder.config, "_attn_implementation", None),
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "torch_threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }

    if measure == "time":
        times = []
        for _ in range(cfg["repeats"]):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return {**result, "step_time_s": statistics.median(times), "times_s": times}

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(device) - before
        return {**result, "peak_mb": peak / 2**20, "baseline_mb": before / 2**20,
                "memory_method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, "
                                 "minus memory_allocated right before the step"}

    read, reader = _rss_reader()
    _trim_heap()
    hwm_ok = _reset_hwm()
    before = read()
    with _Sampler(read) as sampler:
        step()
    hwm_kb = _status_kb("VmHWM").get("VmHWM") if hwm_ok else None
    sampled = sampler.peak - before
    hwm = hwm_kb * 1024 - before if hwm_kb is not None else None
    peak = max(hwm, sampled) if hwm is not None else sampled
    how = ("peak RSS (VmHWM, reset via /proc/self/clear_refs; max with RSS sampled every "
           f"{SAMPLE_INTERVAL_S * 1000:.0f} ms)" if hwm is not None
           else f"peak of RSS sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms ({reader})")
    how += " minus RSS right before the step, in a separate process from the timing"
    how += (f"; glibc mmap threshold pinned to {MMAP_THRESHOLD // 1024} KiB from process start so RSS "
            "follows live tensors" if pinned
            else "; allocator not pinned (not glibc): memory it keeps from the warm-up is not counted")
    return {**result, "peak_mb": peak / 2**20, "baseline_mb": before / 2**20,
            "hwm_peak_mb": None if hwm is None else hwm / 2**20, "sampled_peak_mb": sampled / 2**20,
            "memory_method": how, "malloc_pinned": pinned, "rss_reader": reader}


def _child(cfg: dict, conn) -> None:
    try:
        conn.send(("ok", run_config(cfg)))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _context():
    """A fork server that has imported torch, transformers and metalm once: each configuration is a
    fresh process (own heap, own model) without paying the ~5 s of imports again."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def run_fresh(ctx, cfg: dict) -> dict:
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(cfg, child))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{cfg['method']} k={cfg['k']} ({cfg['measure']}): the measuring process died "
                           f"(exit code {proc.exitcode}; out of memory?)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{cfg['method']} k={cfg['k']} ({cfg['measure']}) failed:\n{payload}")
    return payload


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    lines = ["| method | k | step time (s) | × multitask | × (k+1) plain | peak MB | × k=1 peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['k'], 'd')} | {r['step_time_s']:.3f} | {r['x_multitask']:.2f} | "
                     f"{_fmt(r['x_k_plus_1_plain'], '.2f')} | {r['peak_mb']:.1f} | {_fmt(r['x_k1_peak'], '.2f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random encoder, 2x16 tokens, k=1,2, 2 repeats")
    p.add_argument("--encoder", default=None, help="encoder name for load_encoder (default minilm; quick: tiny)")
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 8; quick: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per example T (default 64; quick: 16)")
    p.add_argument("--ks", default=None, help="inner steps, comma-separated (default 1,3,5; quick: 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 3; quick: 2)")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--inner-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--one", default=None, metavar="JSON",
                   help="measure one configuration in this process and print its result as JSON, for "
                        "debugging: a dict as run_config takes, e.g. {\"method\": \"fomaml\", \"k\": 5, "
                        "\"measure\": \"time\", \"encoder\": \"tiny\", \"batch\": 2, \"seq\": 16, \"repeats\": 2, "
                        "\"device\": \"cpu\", \"inner_lr\": 0.001, \"lr\": 5e-05, \"seed\": 0, \"max_k\": 5}")
    args = p.parse_args(argv)
    quick = dict(encoder="tiny", batch=2, seq=16, ks="1,2", repeats=2)
    full = dict(encoder="minilm", batch=8, seq=64, ks="1,3,5", repeats=3)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in args.methods):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    if "multitask" not in args.methods:
        p.error("--methods must include multitask (every ratio is relative to it)")
    if not args.ks or min(args.ks) < 1:
        p.error("--ks: one or more integers >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_config(json.loads(args.one))))
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(encoder=args.encoder, batch=args.batch, seq=args.seq, repeats=args.repeats, device=device,
                threads=args.threads, inner_lr=args.inner_lr, lr=args.lr, seed=args.seed, max_k=max(args.ks))
    configs = [dict(base, method=m, k=0 if m == "multitask" else k)
               for m in args.methods for k in ([0] if m == "multitask" else args.ks)]

    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    ctx = _context()
    rows = []
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {label(cfg)} ...", end=" ", file=sys.stderr, flush=True)
        timed = run_fresh(ctx, dict(cfg, measure="time"))
        memory = run_fresh(ctx, dict(cfg, measure="memory"))
        row = {**memory, **timed}  # the same model facts; time from one process, memory from the other
        print(f"{row['step_time_s']:.3f} s/step, peak +{row['peak_mb']:.1f} MB", file=sys.stderr, flush=True)
        rows.append(row)
    add_ratios(rows)
    wall = time.perf_counter() - started

    machine = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": rows[0]["torch_threads"],
        "torch": torch.__version__, "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "python": platform.python_version(), "load_average_at_start": load,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    memory_method = rows[0]["memory_method"]
    other_memory = {label(r): r["memory_method"] for r in rows if r["memory_method"] != memory_method}
    attention = {label(r): r["attention"] for r in rows}
    second_order_attn = sorted({r["attention"] for r in rows if r["method"].startswith("maml")})
    other_attn = sorted({str(r["attention"]) for r in rows if not r["method"].startswith("maml")})

    print(f"## meta-step benchmark: {args.encoder}, batch {args.batch} x {args.seq} tokens, "
          f"one episode per step, {args.repeats} timed steps (median) after 1 warm-up\n")
    print(table(rows))
    print()
    print(f"- command: `{command}` (cwd {os.getcwd()})")
    print(f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch {machine['torch']}, "
          f"{machine['torch_threads']} torch threads (OMP_WAIT_POLICY={machine['omp_wait_policy']}), device {machine['device']}, Python {machine['python']}"
          + (f", load average at start {load[0]:.2f}" if load else ""))
    print(f"- model: {rows[0]['params']:,} trainable parameters; fused AdamW: {rows[0]['fused_adamw']}; "
          f"attention: {', '.join(other_attn)}" + (f" (second-order MAML: {', '.join(map(str, second_order_attn))})"
                                                  if second_order_attn else ""))
    print("- step = algorithm.step + optimizer.step + zero_grad; each (method, k) timed in one fresh process "
          "and its memory measured in another")
    print(f"- peak memory: increase during one step: {memory_method}")
    for name, how in other_memory.items():
        print(f"  - except {name}: {how}")
    print("- × (k+1) plain: step time / ((k+1) × multitask step time), first-order rows only; "
          "× k=1 peak: peak / the same method's peak at k=1")
    print("- timings are from a possibly shared machine: compare ratios within this run, not across runs")
    print(f"- wall time: {wall:.1f} s")

    if args.json:
        out = {"command": command, "cwd": os.getcwd(), "machine": machine,
               "settings": {k: v for k, v in base.items() if k != "max_k"} | {"ks": args.ks, "methods": args.methods},
               "memory_method": memory_method, "attention": attention, "wall_time_s": wall, "rows": rows}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
