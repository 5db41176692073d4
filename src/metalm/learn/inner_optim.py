"""A differentiable Adam(W) for the inner loop (Xue uses AdamW inside Reptile; SGD is the default).

State (first and second moments) is a pair of parameter dicts threaded through the inner
steps; every update is built from tensor operations on the gradients, so with
``create_graph=True`` the adapted parameters stay differentiable in θ through the moments
(second-order MAML over Adam steps). Step t of ``update`` is torch.optim.AdamW's:

    θ ← θ·(1 − α·λ);  m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²
    θ ← θ − α · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ) + ε_root) + ε)

with ε_root = 0 exactly torch's update. ``sqrt`` has an infinite derivative at 0, so a
coordinate whose gradient is exactly zero (a padding embedding row) would give 0·∞ = NaN in a
second-order meta-gradient; ``eps_root`` > 0 (1e-16, the default for second order)
keeps it finite. A parameter no loss reaches is skipped, as torch.optim skips ``grad is None``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from metalm.learn.functional import Params
INNER_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class InnerAdam:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay λ."""
    eps_root: float = 0.0
    """Added under the square root; > 0 keeps second derivatives finite where a gradient is 0."""

    def __post_init__(self):
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"inner Adam betas must lie in [0, 1), got {self.betas}")
        if self.eps <= 0 and self.eps_root <= 0:
            raise ValueError("inner Adam needs eps > 0 or eps_root > 0")
        if self.weight_decay < 0:
            raise ValueError(f"inner weight decay must be >= 0, got {self.weight_decay}")

    def init(self) -> tuple[Params, Params]:
        """Empty moments: a parameter's moments start at zero on its first gradient."""
        return {}, {}

    def update(self, params: Params, grads: dict[str, Tensor | None], state: tuple[Params, Params],
               step: int) -> tuple[Params, tuple[Params, Params]]:
        """Step ``step`` (1-based) from ``params`` with ``grads``; new params and new moments."""
        b1, b2 = self.betas
        m, v = dict(state[0]), dict(state[1])
        new = dict(params)
        for name, g in grads.items():
            if g is None:
                continue
            p = params[name]
            m[name] = g * (1 - b1) if name not in m else m[name] * b1 + g * (1 - b1)
            v[name] = g * g * (1 - b2) if name not in v else v[name] * b2 + g * g * (1 - b2)
            m_hat = m[name] / (1 - b1 ** step)
            v_hat = v[name] / (1 - b2 ** step)
            decayed = p * (1 - self.lr * self.weight_decay) if self.weight_decay else p
            new[name] = decayed - self.lr * m_hat / (torch.sqrt(v_hat + self.eps_root) + self.eps)
        return new, (m, v)


def build_inner_optimizer(name: str, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                          weight_decay: float = 0.0, second_order: bool = False) -> InnerAdam | None:
    """None for plain SGD (the fast path in ``functional.inner_step``), else an ``InnerAdam``."""
    if name not in INNER_OPTIMIZERS:
        raise ValueError(f"inner_optimizer: expected one of {', '.join(INNER_OPTIMIZERS)}, got {name!r}")
    if name == "sgd":
        if weight_decay:
            raise ValueError("inner_weight_decay applies to inner_optimizer: adam only")
        return None
    return InnerAdam(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                     eps_root=1e-16 if second_order else 0.0)


def step_decay_lr(lr: float, *, decay: float, every: int, step: int) -> float:
    """``lr · decay^⌊step / every⌋`` (``every`` 0: ``lr``): Xue's inner scheduler, 0.8 every 30 meta iterations."""
    return lr * decay ** (step // every) if every > 0 else lr


def with_lr(optimizer: InnerAdam | None, lr: float) -> InnerAdam | None:
    """The inner optimiser at learning rate ``lr`` (None, plain SGD, takes its lr per call)."""
    return None if optimizer is None else dataclasses.replace(optimizer, lr=lr)
