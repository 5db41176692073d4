"""Statistics over seeds for a sweep's result rows: mean ± std per cell, and paired differences
of each method to a baseline with a paired-t interval.

A result row is ``{"method", "target", "fraction", "per_class", "seed", "split", "metric", "value",
"degenerate"}``; a cell is everything but the seed. A budget is either a fraction of the training
split (``fraction``) or ``per_class`` examples of each class, never both. Rows written before
per-class budgets and degenerate-run flags existed lack those keys: they read as ``None`` / False.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from scipy import stats as scipy_stats

Budget = tuple[float | None, int | None]  # (fraction, per_class), exactly one of them set

TEST = "two-sided paired t, 95%"


def budget_key(row: dict) -> Budget:
    """(fraction, per_class) of a row, checking that exactly one of them is set."""
    fraction, per_class = row.get("fraction"), row.get("per_class")
    if (fraction is None) == (per_class is None):
        raise ValueError(f"a result row needs exactly one of 'fraction' and 'per_class', got fraction={fraction!r}, "
                         f"per_class={per_class!r} in {row}")
    return fraction, per_class


def budget_label(budget: Budget) -> str:
    """'10%' for fraction 0.1, '8/class' for 8 examples per class."""
    fraction, per_class = budget
    return f"{fraction * 100:g}%" if fraction is not None else f"{per_class}/class"


def budget_order(budget: Budget) -> tuple:
    """Sort key: fraction budgets ascending, then per-class budgets ascending."""
    fraction, per_class = budget
    return (0, fraction) if fraction is not None else (1, per_class)


def cell_key(row: dict) -> tuple:
    """(target, fraction, per_class, split, metric): what a row scores, apart from method and seed."""
    return (row["target"], *budget_key(row), row["split"], row["metric"])


def aggregate(rows: Iterable[dict]) -> list[dict]:
    """Mean, sample std (0 for one seed), seed count and degenerate-run count per method and cell.

    Returns:
        ``{"method", "target", "fraction", "per_class", "split", "metric", "mean", "std", "n",
        "degenerate_runs"}`` per cell, in the order the cells first appear.
    """
    groups: dict[tuple, list[tuple[float, bool]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], *cell_key(row))].append((float(row["value"]), bool(row.get("degenerate", False))))
    out = []
    for (method, target, fraction, per_class, split, metric), runs in groups.items():
        v = np.asarray([value for value, _ in runs])
        out.append({"method": method, "target": target, "fraction": fraction, "per_class": per_class,
                    "split": split, "metric": metric, "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                    "degenerate_runs": sum(degenerate for _, degenerate in runs)})
    return out


def paired_interval(values_a: Sequence[float], values_b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired-t interval and two-sided p-value for the mean of d_i = a_i - b_i.

    The interval is mean(d) ± t_{(1+confidence)/2, n-1} · sd(d) / √n with the sample sd (ddof=1);
    the p-value is that of ``scipy.stats.ttest_rel(a, b)``. One pair gives no interval and p = 1.
    Identical differences (sd 0) give the interval [mean, mean] and p = 0, or p = 1 when they are
    all zero, where the t statistic itself is undefined.

    Args:
        values_a: the method's values, one per seed.
        values_b: the baseline's values for the same seeds, in the same order.
        confidence: coverage of the interval.

    Returns:
        ``{"n", "mean", "sd", "lo", "hi", "p", "excludes_zero"}``; ``sd``, ``lo`` and ``hi`` are
        None for one pair.
    """
    if len(values_a) != len(values_b) or not values_a:
        raise ValueError(f"paired_interval needs two equally long, non-empty sequences, "
                         f"got {len(values_a)} and {len(values_b)} values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = np.asarray(values_a, dtype=float) - np.asarray(values_b, dtype=float)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "p": 1.0, "excludes_zero": False}
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        lo = hi = mean
        p = 0.0 if mean != 0.0 else 1.0
    else:
        se = sd / math.sqrt(n)
        half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * se
        lo, hi = mean - half, mean + half
        p = float(2 * scipy_stats.t.sf(abs(mean / se), n - 1))
    return {"n": n, "mean": mean, "sd": sd, "lo": lo, "hi": hi, "p": p, "excludes_zero": lo > 0 or hi < 0}


def paired_differences(rows: Iterable[dict], *, baseline: str, confidence: float = 0.95) -> list[dict]:
    """Each non-baseline method against the baseline, per cell, paired by seed.

    Only seeds that both the method and the baseline ran in a cell are paired; a cell the
    baseline never ran has no entry.

    Returns:
        One dict per method and cell: the cell's keys, ``"baseline"``, ``"seeds"`` (sorted),
        ``"differences"`` (method - baseline, in seed order) and the fields of `paired_interval`.
    """
    by_seed: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (method, cell) -> seed -> value
    for row in rows:
        key = (row["method"], *cell_key(row))
        seeds = by_seed[key]
        if row["seed"] in seeds:
            raise ValueError(f"two result rows for method {row['method']!r}, seed {row['seed']!r} and cell "
                             f"{key[1:]}: each seed may be scored once per cell")
        seeds[row["seed"]] = float(row["value"])
    out = []
    for (method, *cell), values in by_seed.items():
        reference = by_seed.get((baseline, *cell))
        if method == baseline or reference is None:
            continue
        seeds = sorted(set(values) & set(reference), key=_seed_order)
        if not seeds:
            continue
        a, b = [values[s] for s in seeds], [reference[s] for s in seeds]
        target, fraction, per_class, split, metric = cell
        out.append({"method": method, "baseline": baseline, "target": target, "fraction": fraction,
                    "per_class": per_class, "split": split, "metric": metric, "seeds": seeds,
                    "differences": [x - y for x, y in zip(a, b)], **paired_interval(a, b, confidence)})
    return out


def _seed_order(seed) -> tuple:
    # Seeds are ints in every config, but sort mixed types without raising.
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))
