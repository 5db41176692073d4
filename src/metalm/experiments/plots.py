"""A sweep's plots: headline score against budget (with reference scores as dashed lines) and
dev score against fine-tuning epoch."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from metalm.experiments.stats import budget_key, budget_label, budget_order

# Row 0 of the score plot holds fraction budgets, row 1 per-class budgets (index into budget_key).
BUDGET_AXES = {0: "fraction of training data", 1: "examples per class"}
REFERENCE_COLOURS = ("0.35", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(summary: Sequence[dict], path: Path, *, headline: dict[str, tuple[str, str]],
                methods: Sequence[str], title: str, references: Sequence[dict] = ()) -> None:
    """One panel per target: headline score against budget (log x), one line per method.

    Fraction budgets fill the first row of panels; per-class budgets, when there are any, a second
    row. Each reference on a target's headline split and metric is a dashed horizontal line.
    """
    plt = _pyplot()
    targets = list(headline)
    kinds = [k for k in BUDGET_AXES if any(budget_key(r)[k] is not None for r in summary)] or [0]
    names = list(dict.fromkeys(ref["reference"] for ref in references))
    colours = {name: REFERENCE_COLOURS[i % len(REFERENCE_COLOURS)] for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(kinds), len(targets), figsize=(max(6.0, 4.5 * len(targets)), 4.0 * len(kinds)),
                             squeeze=False)
    for row, kind in enumerate(kinds):
        for ax, target in zip(axes[row], targets):
            split, metric = headline[target]
            levels = [(ref["reference"], float(ref["value"])) for ref in references
                      if (ref["target"], ref["split"], ref["metric"]) == (target, split, metric)]
            _score_panel(ax, summary, target=target, kind=kind, split=split, metric=metric, methods=methods,
                         levels=levels, colours=colours)
    save_figure(fig, path, title)


def _score_panel(ax, summary: Sequence[dict], *, target: str, kind: int, split: str, metric: str,
                 methods: Sequence[str], levels: Sequence[tuple[str, float]], colours: dict[str, str]) -> None:
    drawn = False
    for method in methods:
        points = sorted((budget_key(r)[kind], r["mean"], r["std"]) for r in summary
                        if r["method"] == method and r["target"] == target and r["split"] == split
                        and r["metric"] == metric and budget_key(r)[kind] is not None)
        if points:
            x, y, e = (np.array(v) for v in zip(*points))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
            drawn = True
    if not drawn and kind != 0:
        ax.set_visible(False)  # this target has no per-class budgets
        return
    levels = [(name, value) for name, value in levels if math.isfinite(value)]
    for name, value in levels:
        ax.axhline(value, linestyle="--", linewidth=1.2, color=colours[name], label=name)
    if drawn:
        ax.set_xscale("log")
    ax.set_xlabel(BUDGET_AXES[kind])
    ax.set_ylabel(f"{metric} ({split})")
    ax.set_title(target)
    ax.grid(alpha=0.3)
    if drawn or levels:
        ax.legend(fontsize=7)


def plot_curves(curves: Sequence[dict], path: Path, *, headline: dict[str, tuple[str, str]],
                methods: Sequence[str], title: str) -> None:
    """Dev score after each fine-tuning epoch (mean over seeds), one panel per target and budget
    (the per-epoch curves of Lv et al. 2020, Fig. 2)."""
    plt = _pyplot()
    panels = sorted({(c["target"], budget_key(c)) for c in curves},
                    key=lambda p: (list(headline).index(p[0]), budget_order(p[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.5 * len(panels)), 4.0), squeeze=False)
    for ax, (target, budget) in zip(axes[0], panels):
        key = "/".join(headline[target])
        for method in methods:
            runs = [c["curve"] for c in curves if (c["method"], c["target"], budget_key(c)) == (method, target, budget)]
            if not runs:
                continue
            epochs = [point["epoch"] for point in runs[0]]
            scores = np.array([[point[key] for point in run] for run in runs if len(run) == len(epochs)])
            ax.plot(epochs, scores.mean(axis=0), marker="o", label=method)
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{target} @{budget_label(budget)}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, title)


def save_figure(fig, path: Path, title: str) -> None:
    """Titles, lays out and writes a figure atomically (temporary file, then rename)."""
    import matplotlib.pyplot as plt

    fig.suptitle(textwrap.fill(title, 70), fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    plt.close(fig)
    tmp.replace(path)
