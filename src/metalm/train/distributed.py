"""Training across processes with ``torch.distributed``: the loop's communication seam.

metalm does not wrap the model in DistributedDataParallel: DDP's hooks do not fire under
``functional_call`` + ``autograd.grad`` and it cannot double-backward (second-order MAML). The
loop splits each step's meta-batch of episodes instead. Every process draws the same tasks from
an identically seeded sampler and advances every batch stream identically (indices only), builds
and runs only its own contiguous share of the episodes, and `TorchCommunicator` sums the
weighted outer gradients before clipping and the optimiser step. The optimiser, sampler and
streams therefore hold the same state on every process, and with dropout off a run at N
processes ends with the parameters of the one-process run with the same meta-batch (up to the
order of floating-point sums).

Start one process per device with ``torchrun --nproc_per_node N -m metalm train CONFIG`` (or
``metalm train CONFIG --nproc N``): `communicator_from_env` joins the process group that
torchrun describes in the environment (gloo on CPU, NCCL on CUDA, one device per process).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from metalm.contracts import Communicator, LocalCommunicator


SPARSE_ROWS_FROM = 10_000
"""2-D parameters with at least this many rows are embedding tables, reduced row-sparsely."""


class TorchCommunicator:
    """A `metalm.contracts.Communicator` over the default ``torch.distributed`` process group."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("TorchCommunicator needs an initialised process group "
                               "(torch.distributed.init_process_group, or start the run with torchrun)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()

    def _device(self, tensors: Sequence[Tensor]) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return tensors[0].device if tensors else torch.device("cpu")

    def reduce_gradients(self, params: Sequence[Tensor], weight: float = 1.0) -> None:
        """Each ``.grad`` becomes the sum over processes of ``weight × .grad`` (a missing gradient
        counts as zero and stays ``None`` where no process has one, so the optimiser skips it as in
        one process). One flat all-reduce for the dense gradients, one for which gradients exist,
        and, for embedding tables (2-D, at least `SPARSE_ROWS_FROM` rows), only the rows that hold
        a nonzero gradient on some process: a batch touches a few thousand of 30,000 token rows, and
        the rows left out are zero on every process, so their sum is exactly zero."""
        if not params:
            return
        device = self._device(params)
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
        dist.all_reduce(present)
        tables = [p for p in params if p.dim() == 2 and p.shape[0] >= SPARSE_ROWS_FROM]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            if not any(p is t for t in tables):
                by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            if weight != 1.0:
                flat.mul_(weight)
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone()
                offset += n
        for p in tables:
            self._reduce_rows(p, weight)
        for p, seen in zip(params, present.tolist()):
            if seen == 0:
                p.grad = None

    def _reduce_rows(self, p: Tensor, weight: float) -> None:
        grad = p.grad
        used = (grad != 0).any(dim=1).to(torch.float64) if grad is not None else \
            torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)
        dist.all_reduce(used)
        rows = used.nonzero().squeeze(1)
        part = grad.index_select(0, rows) if grad is not None else p.new_zeros((len(rows), p.shape[1]))
        if weight != 1.0:
            part.mul_(weight)
        dist.all_reduce(part)
        p.grad = torch.zeros_like(p).index_copy_(0, rows, part)

    def reduce_mean(self, values: Mapping[str, float], weight: float | None = None) -> dict[str, float]:
        """The mean of each value over processes; with ``weight`` (this process's share of the
        step's episodes, the shares summing to 1), the weighted sum. Non-numeric values pass through."""
        names = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not names:
            return dict(values)
        scale = (1.0 / self.world_size) if weight is None else weight
        vector = torch.tensor([float(values[k]) * scale for k in names], dtype=torch.float64,
                              device=self._device([]))
        dist.all_reduce(vector)
        out = dict(values)
        out.update(zip(names, vector.tolist()))
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copies rank 0's parameters and buffers to every process."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if self.backend == "nccl" or tensor.device.type == "cpu":
                    dist.broadcast(tensor.data, src=0)
                else:
                    staged = tensor.data.cpu()
                    dist.broadcast(staged, src=0)
                    tensor.data.copy_(staged)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list | None:
        """Every process's ``obj``, in rank order, on rank 0 (``None`` elsewhere)."""
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        dist.barrier()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def communicator_from_env(device: str = "auto") -> Communicator:
    """The communicator for this process: `LocalCommunicator` outside torchrun; under torchrun with
    more than one process, joins the process group (NCCL when this run trains on CUDA, else gloo),
    binds this process to GPU ``LOCAL_RANK`` on CUDA, and returns a `TorchCommunicator`."""
    if launched_world_size() <= 1:
        return LocalCommunicator()
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return TorchCommunicator()


def share(count: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``count`` episodes that process ``rank`` runs (sizes differ by at most one)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


__all__ = ["TorchCommunicator", "communicator_from_env", "launched_world_size", "local_rank", "share"]
