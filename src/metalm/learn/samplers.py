"""Task samplers: which task's batch trains next.

A sampler draws from a categorical distribution over task names with its own seeded
NumPy generator, whose state goes into checkpoints (JSON-serialisable).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from metalm.contracts import NO_FEEDBACK, FeedbackRequest, Sampler  # noqa: F401  (the contract, re-exported)


def draw(rng: np.random.Generator, names: tuple[str, ...], probabilities: np.ndarray) -> str:
    """One name drawn with the given probabilities (every categorical sampler draws this way)."""
    return names[rng.choice(len(names), p=probabilities)]


class CategoricalSampler:
    """Fixed probabilities over tasks.

    Args:
        probabilities: task name -> probability (normalised here).
        seed: seed of the sampler's own generator.
    """

    def __init__(self, probabilities: Mapping[str, float], *, seed: int):
        total = float(sum(probabilities.values()))
        if total <= 0 or any(p < 0 for p in probabilities.values()):
            raise ValueError(f"task probabilities must be non-negative with a positive sum, got {dict(probabilities)}")
        self.names = tuple(probabilities)
        self.probabilities = np.array([probabilities[n] / total for n in self.names])
        self.rng = np.random.default_rng(seed)
        self.history = None

    def sample(self) -> str:
        return draw(self.rng, self.names, self.probabilities)

    def request(self, done: int) -> FeedbackRequest:
        return NO_FEEDBACK

    def update(self, feedback: Mapping) -> None:
        """Fixed distributions ignore feedback."""

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping) -> None:
        self.rng.bit_generator.state = state["rng"]


def size_probabilities(sizes: Mapping[str, int], *, kind: str, temperature: float = 1.0,
                       weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Task probabilities from dataset sizes.

    Args:
        sizes: task name -> number of training examples.
        kind: ``uniform``; ``proportional`` (p ∝ n, Dou §2.4 PPS); ``temperature``
            (p ∝ n^(1/T): T=1 is proportional, large T tends to uniform); ``weights`` (given).
        temperature: T for ``temperature``.
        weights: explicit task -> weight for ``weights``.
    """
    names: Sequence[str] = list(sizes)
    if kind == "uniform":
        raw = {n: 1.0 for n in names}
    elif kind == "proportional":
        raw = {n: float(sizes[n]) for n in names}
    elif kind == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        raw = {n: float(sizes[n]) ** (1.0 / temperature) for n in names}
    elif kind == "weights":
        if not weights or set(weights) != set(names):
            raise ValueError(f"sampler weights must name every task exactly: tasks {sorted(names)}, "
                             f"weights {sorted(weights or {})}")
        raw = dict(weights)
    else:
        raise ValueError(f"unknown sampler kind {kind!r} (uniform, proportional, temperature, weights)")
    total = sum(raw.values())
    return {n: raw[n] / total for n in names}


class MixedSampler:
    """Dou et al. (2019) §2.4 "Mixed": in every period, first one sampler, then the other.

    Built from two samplers; draw ``t`` uses ``first`` when ``t mod period < first_draws``
    and ``second`` otherwise. For Dou's setting ``first`` is uniform over the auxiliary
    tasks and ``second`` always picks the target task.

    Args:
        first: the sampler of the first part of each period.
        second: the sampler of the rest.
        period: draws per period (an "epoch" of the schedule).
        first_draws: draws per period that go to ``first``.
    """

    def __init__(self, first: Sampler, second: Sampler, *, period: int, first_draws: int):
        if period < 1 or not 0 <= first_draws <= period:
            raise ValueError(f"need period >= 1 and 0 <= first_draws <= period, got {period}, {first_draws}")
        self.first, self.second = first, second
        self.period, self.first_draws = period, first_draws
        self.names = tuple(dict.fromkeys(first.names + second.names))
        self.draws = 0
        self.history = None

    def request(self, done: int) -> FeedbackRequest:
        return self.first.request(done) | self.second.request(done)

    def sample(self) -> str:
        use_first = self.draws % self.period < self.first_draws
        self.draws += 1
        return (self.first if use_first else self.second).sample()

    def update(self, feedback: Mapping) -> None:
        self.first.update(feedback)
        self.second.update(feedback)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "first": self.first.state_dict(), "second": self.second.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.draws = int(state["draws"])
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])
