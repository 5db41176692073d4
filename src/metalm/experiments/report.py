"""Results of a sweep as tables (markdown, CSV, JSON) of mean ± std over seeds, and a plot.

A result row is ``{"method", "target", "fraction", "seed", "split", "metric", "value"}``.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from metalm.train.checkpoint import write_text_atomic


def aggregate(rows: Iterable[dict]) -> list[dict]:
    """Mean, sample std (0 for one seed) and count over seeds, per method/target/fraction/split/metric."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        key = (row["method"], row["target"], row["fraction"], row["split"], row["metric"])
        groups[key].append(float(row["value"]))
    out = []
    for (method, target, fraction, split, metric), values in groups.items():
        v = np.asarray(values)
        out.append({"method": method, "target": target, "fraction": fraction, "split": split, "metric": metric,
                    "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)})
    return out


def markdown_table(summary: Sequence[dict], *, headline: dict[str, tuple[str, str]], methods: Sequence[str],
                   title: str = "", scale: float = 100.0, note: str = "") -> str:
    """Methods as rows, (target, fraction) as columns, headline metric as mean ± std.

    Args:
        headline: target -> (split, metric) shown in its columns.
        scale: multiply scores (100 gives the usual GLUE percentages).
    """
    cells = {(r["method"], r["target"], r["fraction"]): r for r in summary
             if (r["split"], r["metric"]) == headline.get(r["target"])}
    columns = sorted({(t, f) for _, t, f in cells}, key=lambda c: (list(headline).index(c[0]), c[1]))
    header = ["method"] + [f"{t} {headline[t][1]} @{_fraction(f)}" for t, f in columns]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = [method]
        for target, fraction in columns:
            r = cells.get((method, target, fraction))
            row.append("–" if r is None else f"{r['mean'] * scale:.1f} ± {r['std'] * scale:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    n = {r["n"] for r in cells.values()}
    lines += ["", f"mean ± std over {'/'.join(map(str, sorted(n)))} seed(s); scores × {scale:g}"
              + (f"; {note}" if note else "")]
    return "\n".join(lines)


def _fraction(f: float) -> str:
    return f"{f * 100:g}%"


def write_reports(rows: Sequence[dict], out_dir: str | Path, *, headline: dict[str, tuple[str, str]],
                  methods: Sequence[str], title: str, note: str = "",
                  curves: Sequence[dict] = ()) -> dict[str, Path]:
    """Writes results.md, results.csv, results.json, scores.png and, when runs were scored after
    more than one epoch, curves.png; returns their paths.

    Args:
        curves: ``{"method", "target", "fraction", "seed", "curve": [{"epoch", "<split>/<metric>"}]}``.
    """
    out_dir = Path(out_dir)
    summary = aggregate(rows)
    table = markdown_table(summary, headline=headline, methods=methods, title=title, note=note)
    paths = {"markdown": out_dir / "results.md", "csv": out_dir / "results.csv",
             "json": out_dir / "results.json", "plot": out_dir / "scores.png"}
    write_text_atomic(paths["markdown"], table + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "target", "fraction", "split", "metric", "mean", "std", "n"])
    writer.writeheader()
    writer.writerows(summary)
    write_text_atomic(paths["csv"], buffer.getvalue())
    write_text_atomic(paths["json"], json.dumps({"title": title, "summary": summary, "runs": list(rows)}, indent=1))
    plot_scores(summary, paths["plot"], headline=headline, methods=methods, title=title)
    if any(len(c["curve"]) > 1 for c in curves):
        paths["curves"] = out_dir / "curves.png"
        plot_curves(curves, paths["curves"], headline=headline, methods=methods, title=title)
    return paths


def plot_scores(summary: Sequence[dict], path: Path, *, headline: dict[str, tuple[str, str]],
                methods: Sequence[str], title: str) -> None:
    """One panel per target: headline score against training-data fraction, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(headline)
    fig, axes = plt.subplots(1, len(targets), figsize=(max(6.0, 4.5 * len(targets)), 4.0), squeeze=False)
    for ax, target in zip(axes[0], targets):
        split, metric = headline[target]
        for method in methods:
            points = sorted((r["fraction"], r["mean"], r["std"]) for r in summary
                            if r["method"] == method and r["target"] == target
                            and r["split"] == split and r["metric"] == metric)
            if not points:
                continue
            x, y, e = (np.array(v) for v in zip(*points))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("fraction of training data")
        ax.set_ylabel(f"{metric} ({split})")
        ax.set_title(target)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, title)


def plot_curves(curves: Sequence[dict], path: Path, *, headline: dict[str, tuple[str, str]],
                methods: Sequence[str], title: str) -> None:
    """Dev score after each fine-tuning epoch (mean over seeds), one panel per target and fraction
    (the per-epoch curves of Lv et al. 2020, Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["target"], c["fraction"]) for c in curves}, key=lambda p: (list(headline).index(p[0]), p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.5 * len(panels)), 4.0), squeeze=False)
    for ax, (target, fraction) in zip(axes[0], panels):
        key = "/".join(headline[target])
        for method in methods:
            runs = [c["curve"] for c in curves if (c["method"], c["target"], c["fraction"]) == (method, target, fraction)]
            if not runs:
                continue
            epochs = [point["epoch"] for point in runs[0]]
            scores = np.array([[point[key] for point in run] for run in runs if len(run) == len(epochs)])
            ax.plot(epochs, scores.mean(axis=0), marker="o", label=method)
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{target} @{_fraction(fraction)}")
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
