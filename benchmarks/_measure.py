"""Measurement machinery shared by the benchmark scripts: fresh processes, step time, peak memory.

Each configuration a script compares runs in a fresh process forked from a server that imported
torch and transformers once (``context`` / ``run_fresh``), so no configuration sees another's
allocator state, caches or attention switch. Within it:

* step time (``time_steps``): the median of ``repeats`` timed steps after the caller's warm-up.
* peak memory (``step_memory``), CPU: a memory-measuring process pins glibc's mmap threshold to
  64 KiB before it builds anything (``pin_malloc``), so every tensor is mapped on allocation and
  unmapped on free and RSS follows live tensors (without this, freed chunks kept in the heap made
  the same measurement vary by +-30%; with it, repeated steps agree to within 1 MB). After the
  warm-up it trims the heap, resets the kernel's RSS high-water mark (VmHWM, via
  ``/proc/self/clear_refs``) and reports VmHWM after one step minus RSS right before it. RSS is
  also sampled every 5 ms in a thread (psutil if installed, else ``/proc/self/statm``): the larger
  reading is kept, and it is the only one where VmHWM cannot be reset. Pinning slows large
  allocations (page faults), hence time and memory are measured in separate processes.
* peak memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` right before the step.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import platform
import statistics
import threading
import time
import traceback
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libgomp's default busy-wait makes torch's 2 OpenMP threads 5-7x slower when another process holds
# one of 2 cores (measured: MiniLM 8x64 forward+backward 0.6 s passive vs 3-4 s active). Set before
# torch loads libgomp; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SAMPLE_INTERVAL_S = 0.005
MMAP_THRESHOLD = 64 * 1024
# Modules each measured process needs; the fork server imports them once (see context).
PRELOAD = ["torch", "transformers", "transformers.models.bert.modeling_bert", "metalm.models.encoder",
           "metalm.models.multitask", "metalm.learn.algorithms", "metalm.train.optim"]


# ----------------------------------------------------------------------------------------------
# Peak memory
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


def pin_malloc() -> bool:
    """Makes glibc serve every allocation over 64 KiB by mmap and return it to the OS on free, so RSS
    follows live tensors. Call it first thing in a memory-measuring process (before the model is
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


def step_memory(step: Callable[[], None], device, *, pinned: bool) -> dict:
    """The peak memory one call of ``step`` adds (call it after a warm-up step), with how it was measured.

    ``pinned``: whether ``pin_malloc`` succeeded at the start of this process (CPU only).
    Returns ``peak_mb``, ``baseline_mb``, ``memory_method`` and, on CPU, both readings.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return {"peak_mb": peak / 2**20, "baseline_mb": before / 2**20,
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
    return {"peak_mb": peak / 2**20, "baseline_mb": before / 2**20,
            "hwm_peak_mb": None if hwm is None else hwm / 2**20, "sampled_peak_mb": sampled / 2**20,
            "memory_method": how, "malloc_pinned": pinned, "rss_reader": reader}


# ----------------------------------------------------------------------------------------------
# Step time
# ----------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device, repeats: int) -> dict:
    """``step_time_s``: the median of ``repeats`` timed calls (call it after a warm-up step)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"step_time_s": statistics.median(times), "times_s": times}


# ----------------------------------------------------------------------------------------------
# Fresh processes
# ----------------------------------------------------------------------------------------------

def quiet_transformers() -> None:
    """No progress bars or info lines from transformers in a measured process."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # metalm.learn.functional.task_loss_fn reads `is_gradient_checkpointing`, deprecated in
    # transformers 5 (FutureWarning once per process); keep the progress lines readable.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _child(fn, cfg: dict, conn) -> None:
    try:
        conn.send(("ok", fn(cfg)))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def context(preload: list[str] = PRELOAD):
    """A fork server that has imported torch, transformers and metalm once: each configuration is a
    fresh process (own heap, own model) without paying the ~5 s of imports again."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(preload)
        return ctx
    return multiprocessing.get_context("spawn")


def run_fresh(ctx, fn: Callable[[dict], dict], cfg: dict, name: str) -> dict:
    """``fn(cfg)`` in a fresh process of ``ctx``; ``name`` labels errors (a module-level ``fn``)."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, cfg, child))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"{name}: the measuring process died (exit code {proc.exitcode}; out of memory?)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{name} failed:\n{payload}")
    return payload


# ----------------------------------------------------------------------------------------------
# Inputs and the machine
# ----------------------------------------------------------------------------------------------

def random_batches(n: int, *, batch: int, seq: int, vocab: int, seed: int, device):
    """``n`` random token batches with two-class labels, identical in every configuration."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000 if vocab > 2000 else 0, vocab, (batch, seq), generator=gen)  # (B, T)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.randint(0, 2, (batch,), generator=gen)}  # labels (B,)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str, torch_threads: int | None = None) -> dict:
    """The facts a table needs to be read: CPU, torch, threads, device, load."""
    import torch

    return {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "torch_threads": torch_threads if torch_threads is not None else torch.get_num_threads(),
        "torch": torch.__version__, "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def machine_line(m: dict) -> str:
    load = m.get("load_average")
    return (f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['torch_threads']} torch threads "
            f"(OMP_WAIT_POLICY={m['omp_wait_policy']}), device {m['device']}, Python {m['python']}"
            + (f", load average {load[0]:.2f}" if load else ""))


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def command_line(argv) -> str:
    """The command that ran this script, for the report."""
    import shlex
    import sys

    return "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])


def target(name: str, value: float | None, limit: float, *, at_least: bool = False) -> dict:
    """A performance target of the issue: ``value <= limit`` (or ``>=`` with ``at_least``)."""
    met = None if value is None else (value >= limit if at_least else value <= limit)
    return {"name": name, "value": value, "target": f"{'>=' if at_least else '<='} {limit:g}", "met": met}


def target_line(t: dict) -> str:
    value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
    verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    return f"- target: {t['name']} = {value} (target {t['target']}): {verdict}"


def write_json(path: str, data: dict) -> None:
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))


def time_in_rounds(ctx, fn: Callable[[dict], dict], cfgs: list[dict], rounds: int, names: list[str]) -> list[dict]:
    """Step times of every configuration, measured in ``rounds`` rounds that each run every
    configuration once (a fresh process each, the order rotating from round to round), so a change
    in the load of a shared machine falls on all of them alike rather than on whichever ran last.

    Returns one result per configuration (``fn``'s, from its last round) with ``times_s`` every
    timed step of every round and ``step_time_s`` their median.
    """
    results: list[dict | None] = [None] * len(cfgs)
    times: list[list[float]] = [[] for _ in cfgs]
    for r in range(rounds):
        order = [(i + r) % len(cfgs) for i in range(len(cfgs))]
        for i in order:
            import sys

            print(f"  round {r + 1}/{rounds}: {names[i]} ...", end=" ", file=sys.stderr, flush=True)
            out = run_fresh(ctx, fn, dict(cfgs[i], measure="time"), f"{names[i]} (time)")
            print(f"{out['step_time_s']:.3f} s/step", file=sys.stderr, flush=True)
            times[i] += out["times_s"]
            results[i] = out
    return [{**res, "times_s": t, "step_time_s": statistics.median(t), "rounds": rounds}
            for res, t in zip(results, times)]


def fmt(x, spec: str) -> str:
    """``x`` formatted with ``spec``, or a dash for a missing value (table cells)."""
    return "–" if x is None else format(x, spec)


def add_common_args(p, *, model: bool = True) -> None:
    """The options every benchmark script shares: --quick, --json and (``model``) the model's."""
    p.add_argument("--quick", action="store_true", help="a small, fast run (a smoke test)")
    if model:
        p.add_argument("--encoder", default=None, help="encoder name for load_encoder (default minilm; quick: tiny)")
        p.add_argument("--batch", type=int, default=None, help="batch size B (default 8; quick: 2)")
        p.add_argument("--seq", type=int, default=None, help="tokens per example T (default 64; quick: 16)")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--json", default=None, help="write all numbers to this file")


def fill_defaults(args, quick: dict, full: dict) -> None:
    """Sets every option left at None to its quick or full default."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def report(args, out: dict) -> int:
    """Prints a script's report and writes its JSON (``--json``); the exit status."""
    print(out["text"])
    if args.json:
        write_json(args.json, out["json"])
    return 0


def add_meta_step_args(p, *, ks: str, rounds: str) -> None:
    """The options of the scripts that time meta-steps: k values, repeats, rounds, α, β, seed."""
    p.add_argument("--ks", default=None, help=f"inner steps, comma-separated ({ks})")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per process (default 2; quick: 2)")
    p.add_argument("--rounds", type=int, default=None, help=f"timing rounds over all configurations ({rounds})")
    p.add_argument("--inner-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)


def check_meta_step_args(p, args) -> None:
    """Parses ``--ks`` into a list and rejects values below 1 (``p.error``)."""
    args.ks = [int(k) for k in str(args.ks).split(",") if k.strip()]
    if not args.ks or min(args.ks) < 1:
        p.error("--ks: one or more integers >= 1")
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be >= 1")


def script_main(parse_args, run, argv=None) -> int:
    """A benchmark script's ``main``: parse, run, print the report, write ``--json``."""
    args = parse_args(argv)
    return report(args, run(args, command_line(argv)))


def build_model(*, encoder: str, device, seed: int, threads: int | None = None, task: str = "t"):
    """The benchmarked model: ``encoder`` + one two-class classification head ``task``, seeded, in
    train mode on ``device``; returns (model, torch.device)."""
    import torch

    from metalm.models.encoder import load_encoder
    from metalm.models.multitask import MultiTaskModel

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    torch.manual_seed(seed)
    enc, _ = load_encoder(encoder)
    model = MultiTaskModel(enc)
    model.add_task(task, "classification", 2)
    model.to(device).train()
    return model, device
