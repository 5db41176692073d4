"""Runs a test body in several gloo processes (``torch.multiprocessing``, a file rendezvous, one
torch thread each), for the tests that compare multi-process runs with one process."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def run_on_processes(body: Callable, out: Path, nprocs: int = 2) -> Path:
    """Calls ``body(rank, comm, out)`` in each of ``nprocs`` processes joined by gloo (``comm`` a
    ``TorchCommunicator``); ``body`` must be a module-level function. Returns ``out``."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nprocs, str(out / "init"), str(out), body), nprocs=nprocs, join=True)
    return out


def _worker(rank: int, world_size: int, init_file: str, out: str, body: Callable) -> None:
    import torch
    import torch.distributed as dist

    from metalm.train.distributed import TorchCommunicator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        body(rank, TorchCommunicator(), Path(out))
    finally:
        dist.destroy_process_group()
