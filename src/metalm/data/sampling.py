"""Low-resource subsampling: a fraction of a training set or k examples per class.

Stratified by label (by score quintile for regression), seeded with NumPy's PCG64, so
the same arguments give the same examples on every run and machine.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class StratumTooSmall(ValueError):
    """``per_class`` asks for more examples than a stratum has.

    Attributes:
        per_class: the k asked for.
        size: how many examples the stratum has.
        label: the stratum's class label for classification, else None.
        stratum: the stratum in words (``class 1``, ``scores 0.6 to 1.8 (quintile 2 of 5)``).
    """

    def __init__(self, *, per_class: int, size: int, label, stratum: str):
        super().__init__(f"per_class {per_class} is more than the {size} examples of {stratum}")
        self.per_class, self.size, self.label, self.stratum = per_class, size, label, stratum


def subsample(labels: Sequence, *, seed: int, fraction: float | None = None, per_class: int | None = None,
              kind: str = "classification") -> np.ndarray:
    """Indices (sorted) of a stratified subsample.

    Args:
        labels: one label per example: class indices, scores (``kind="regression"``) or,
            for token tasks, anything (no stratification).
        seed: the sampling seed.
        fraction: keep this fraction of each stratum (at least one example per stratum).
        per_class: keep this many examples of each stratum.
        kind: the task kind, which decides the strata.

    Returns:
        Sorted indices into ``labels``.

    Raises:
        StratumTooSmall: ``per_class`` is more than the smallest stratum holds (taking all of it
            would silently unbalance the classes).
        ValueError: neither or both of ``fraction`` / ``per_class``, or one out of range.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction or per_class")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    n = len(labels)
    if fraction == 1.0:
        return np.arange(n)
    strata = _strata(labels, kind)
    if per_class is not None:
        _check_strata(labels, strata, per_class=per_class, kind=kind)
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        members = members[rng.permutation(len(members))]
        take = per_class if per_class is not None else max(1, int(round(len(members) * fraction)))
        chosen.append(members[:take])
    return np.sort(np.concatenate(chosen))


def _strata(labels: Sequence, kind: str) -> np.ndarray:
    if kind == "token_classification":
        return np.zeros(len(labels), dtype=int)
    if kind == "regression":
        scores = np.asarray(labels, dtype=float)
        edges = np.quantile(scores, [0.2, 0.4, 0.6, 0.8])
        return np.searchsorted(edges, scores, side="right")
    return np.asarray(labels)


def holdout(labels: Sequence, rows: Sequence[int], *, fraction: float, seed: int,
            kind: str = "classification") -> tuple[np.ndarray, np.ndarray]:
    """Splits ``rows`` into (kept, held out), holding out ``fraction`` of each stratum.

    Every stratum keeps at least one row, so a tiny subsample still trains on every class; the
    held-out part is drawn with its own stream (``seed`` offset), independent of the subsample.

    Returns:
        Sorted index arrays (into ``labels``) of the kept and the held-out rows.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if fraction <= 0 or len(rows) == 0:
        return np.sort(rows), np.zeros(0, dtype=np.int64)
    strata = _strata([labels[i] for i in rows], kind)
    rng = np.random.default_rng([seed, 1])
    held = []
    for value in np.unique(strata):
        members = rows[strata == value]
        members = members[rng.permutation(len(members))]
        take = min(int(round(len(members) * fraction)), len(members) - 1)
        held.append(members[:take])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(rows, held_out), held_out


def rows_digest(rows: Sequence[int]) -> str:
    """SHA-256 of row indices (as int64, in order): equal digests mean the same rows of a split."""
    import hashlib

    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()


def _check_strata(labels: Sequence, strata: np.ndarray, *, per_class: int, kind: str) -> None:
    """Raises StratumTooSmall for the smallest stratum when it has fewer than ``per_class`` examples."""
    values, sizes = np.unique(strata, return_counts=True)
    smallest = int(np.argmin(sizes))
    size = int(sizes[smallest])
    if size >= per_class:
        return
    value = values[smallest]
    if kind == "token_classification":
        label, stratum = None, "the whole split (token tasks are not stratified)"
    elif kind == "regression":
        scores = np.asarray(labels, dtype=float)[strata == value]
        label = None
        stratum = f"scores {scores.min():.3g} to {scores.max():.3g} (quintile {int(value) + 1} of 5)"
    else:
        label = value.item() if hasattr(value, "item") else value
        stratum = f"class {label!r}"
    raise StratumTooSmall(per_class=per_class, size=size, label=label, stratum=stratum)
