"""Mixed precision: ``bf16`` runs the forward and backward passes under ``torch.autocast`` with
bfloat16, while parameters, gradients and optimiser state stay float32.

bfloat16 has float32's exponent range, so no loss scaling is needed (float16 would need a
``GradScaler``, which the meta-gradients' inner ``torch.autograd.grad`` calls do not go
through; it is not offered). Second-order MAML works under autocast: the inner gradients are
taken in the same autocast region and differentiated again.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        hint = " (float16 needs loss scaling, which metalm does not do: use bf16)" if precision in ("fp16", "16") else ""
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}{hint}")
    return precision


def autocast(device: torch.device | str, precision: str):
    """The context that runs a step at ``precision`` on ``device`` (a no-op for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
