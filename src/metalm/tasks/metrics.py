"""Metrics as GLUE reports them, plus entity-level F1 for BIO tagging.

Plain NumPy/SciPy so that they can be checked against scikit-learn and SciPy references.
Every metric maps (predictions, references) to a float; classification metrics take label
indices, regression metrics real numbers, ``entity_f1`` lists of tag-name sequences.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats


def accuracy(predictions, references) -> float:
    p, r = np.asarray(predictions), np.asarray(references)
    return float((p == r).mean())


def f1(predictions, references, *, positive: int = 1) -> float:
    """Binary F1 of the positive class (GLUE's MRPC/QQP F1)."""
    p, r = np.asarray(predictions) == positive, np.asarray(references) == positive
    tp = float(np.sum(p & r))
    denominator = float(p.sum() + r.sum())
    return 0.0 if denominator == 0 else 2 * tp / denominator


def macro_f1(predictions, references) -> float:
    p, r = np.asarray(predictions), np.asarray(references)
    labels = np.union1d(p, r)
    return float(np.mean([f1(p, r, positive=c) for c in labels]))


def matthews(predictions, references) -> float:
    """Matthews correlation (multi-class form, as scikit-learn computes it)."""
    p, r = np.asarray(predictions), np.asarray(references)
    labels = np.union1d(p, r)
    index = {c: i for i, c in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)))
    for pi, ri in zip(p, r):
        confusion[index[ri], index[pi]] += 1
    t = confusion.sum(axis=1)  # true counts per class
    q = confusion.sum(axis=0)  # predicted counts per class
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s**2 - q @ q) * (s**2 - t @ t))
    return 0.0 if denominator == 0 else float((c * s - t @ q) / denominator)


def pearson(predictions, references) -> float:
    p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    if np.ptp(p) == 0 or np.ptp(r) == 0:
        # Undefined; a constant predictor has no correlation. (Not ``std() == 0``: the std of many
        # copies of one float can come out as 1e-16, and scipy then returns nan.)
        return 0.0
    return float(stats.pearsonr(p, r)[0])


def spearman(predictions, references) -> float:
    p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    if np.ptp(p) == 0 or np.ptp(r) == 0:
        return 0.0
    return float(stats.spearmanr(p, r)[0])


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans of a BIO sequence; an I- without a matching B- opens a span."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, typ = tag.partition("-")
        continues = prefix == "I" and kind == typ
        if start is not None and not continues:
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = i, typ
    return spans


def entity_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Micro F1 over exact entity spans (the CoNLL / seqeval definition)."""
    tp = n_pred = n_ref = 0
    for p, r in zip(predictions, references):
        ps, rs = entity_spans(p), entity_spans(r)
        tp += len(ps & rs)
        n_pred += len(ps)
        n_ref += len(rs)
    return 0.0 if n_pred + n_ref == 0 else 2 * tp / (n_pred + n_ref)


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews,
    "pearson": pearson, "spearman": spearman, "entity_f1": entity_f1,
}


def compute(names: Sequence[str], predictions, references) -> dict[str, float]:
    """The named metrics, in order."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    return {name: METRICS[name](predictions, references) for name in names}
