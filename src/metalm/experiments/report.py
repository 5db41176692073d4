"""Results of a sweep as tables (markdown, CSV, JSON) of mean ± std over seeds with each method's
paired difference to a baseline, reference scores (majority class, zero-shot, ...), warnings
about a baseline that learned nothing, and plots.

A result row is ``{"method", "target", "fraction", "per_class", "seed", "split", "metric", "value",
"train_size", "degenerate"}`` (see `metalm.experiments.stats`). A reference is ``{"reference",
"target", "split", "metric", "value"}``: a score that does not depend on the budget.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from metalm.experiments.plots import plot_curves, plot_scores, save_figure
from metalm.experiments.stats import (TEST, aggregate, budget_key, budget_label, budget_order,
                                      paired_differences)
from metalm.files import write_text_atomic

__all__ = ["aggregate", "markdown_table", "study_warnings", "write_reports", "plot_scores", "plot_curves",
           "save_figure", "FLOOR_REFERENCES"]

# The references a baseline must beat to have learned anything (the highest of those a cell has).
FLOOR_REFERENCES = ("majority class", "constant mean", "zero-shot cosine")
REFERENCE_KEYS = ("reference", "target", "split", "metric", "value")
SUMMARY_FIELDS = ["method", "target", "fraction", "per_class", "split", "metric", "mean", "std", "n",
                  "degenerate_runs"]
DIFFERENCE_FIELDS = ["method", "baseline", "target", "fraction", "per_class", "split", "metric", "n", "mean",
                     "sd", "lo", "hi", "p", "excludes_zero", "seeds", "differences"]
DEGENERATE_NOTE = "† predictions constant (one class) on the scored split in at least one seed"


def markdown_table(summary: Sequence[dict], *, headline: dict[str, tuple[str, str]], methods: Sequence[str],
                   title: str = "", scale: float = 100.0, note: str = "", baseline: str | None = None,
                   differences: Sequence[dict] = (), references: Sequence[dict] = ()) -> str:
    """Methods as rows, (target, budget) as columns, headline metric as mean ± std.

    A non-baseline cell adds its paired difference to the baseline, ``(Δ +1.2 [−0.3, +2.7])``,
    starred when the interval excludes 0; a cell with a degenerate run in any seed gets a ``†``.
    Each reference with a value for a shown target follows the methods as an italic row.

    Args:
        headline: target -> (split, metric) shown in its columns.
        scale: multiply scores and differences (100 gives the usual GLUE percentages).
        baseline: the method the differences are to (default: ``methods[0]``).
        differences: `metalm.experiments.stats.paired_differences` of the rows behind ``summary``.
        references: budget-independent scores, shown in every budget column of their target.
    """
    baseline = baseline or methods[0]
    cells = {(r["method"], r["target"], budget_key(r)): r for r in summary if _is_headline(r, headline)}
    deltas = {(d["method"], d["target"], budget_key(d)): d for d in differences
              if _is_headline(d, headline) and d["method"] != baseline}
    columns = sorted({(t, b) for _, t, b in cells}, key=lambda c: (list(headline).index(c[0]), budget_order(c[1])))
    header = ["method"] + [f"{t} {headline[t][1]} @{budget_label(b)}" for t, b in columns]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown_deltas = False
    for method in methods:
        row = [method]
        for target, budget in columns:
            delta = deltas.get((method, target, budget)) if method != baseline else None
            shown_deltas |= delta is not None and (method, target, budget) in cells
            row.append(_cell(cells.get((method, target, budget)), delta, scale))
        lines.append("| " + " | ".join(row) + " |")
    lines += _reference_rows(references, headline=headline, columns=columns, scale=scale)
    seeds = "/".join(map(str, sorted({r["n"] for r in cells.values()})))
    parts = [f"mean ± std over {seeds} seed(s)", f"scores × {scale:g}"]
    if shown_deltas:
        parts.append(f"Δ: paired difference to {baseline} over seeds, 95% paired-t interval; * interval excludes 0")
    if any(r.get("degenerate_runs", 0) for r in cells.values()):
        parts.append(DEGENERATE_NOTE)
    if note:
        parts.append(note)
    return "\n".join(lines + ["", "; ".join(parts)])


def _is_headline(row: dict, headline: dict[str, tuple[str, str]]) -> bool:
    return (row["split"], row["metric"]) == headline.get(row["target"])


def _cell(summary: dict | None, delta: dict | None, scale: float) -> str:
    if summary is None:
        return "–"
    text = f"{summary['mean'] * scale:.1f} ± {summary['std'] * scale:.1f}"
    text += "†" if summary.get("degenerate_runs", 0) else ""
    if delta is None:
        return text
    if delta["lo"] is None:
        return f"{text} (Δ {_signed(delta['mean'] * scale)}, n={delta['n']})"
    interval = f"[{_signed(delta['lo'] * scale)}, {_signed(delta['hi'] * scale)}]"
    return f"{text} (Δ {_signed(delta['mean'] * scale)} {interval})" + ("*" if delta["excludes_zero"] else "")


def _signed(x: float) -> str:
    text = f"{x:+.1f}"
    # A typographic minus reads better in a table; a rounded -0.0 is shown as +0.0, not as a loss.
    return "+0.0" if text == "-0.0" else text.replace("-", "−")


def _reference_rows(references: Sequence[dict], *, headline: dict[str, tuple[str, str]],
                    columns: Sequence[tuple], scale: float) -> list[str]:
    """One italic row per reference name with a value for a shown column's target and headline."""
    values: dict[str, dict[str, float]] = {}  # name -> target -> value, names in order of appearance
    for ref in references:
        if _is_headline(ref, headline) and math.isfinite(float(ref["value"])):
            values.setdefault(ref["reference"], {})[ref["target"]] = float(ref["value"])
    shown = {target for target, _ in columns}
    lines = []
    for name, by_target in values.items():
        if shown & set(by_target):
            cells = [f"{by_target[t] * scale:.1f}" if t in by_target else "–" for t, _ in columns]
            lines.append("| " + " | ".join([f"*{name}*"] + cells) + " |")
    return lines


def check_references(references: Iterable[dict]) -> list[dict]:
    """The references as a list, checking each has the keys of `REFERENCE_KEYS`."""
    out = list(references)
    for i, ref in enumerate(out):
        missing = [k for k in REFERENCE_KEYS if k not in ref]
        if missing:
            raise ValueError(f"reference {i} ({ref}) lacks {missing}; a reference is a dict with keys "
                             f"{list(REFERENCE_KEYS)}")
    return out


def study_warnings(summary: Sequence[dict], *, baseline: str, headline: dict[str, tuple[str, str]],
                   references: Sequence[dict] = (), scale: float = 100.0) -> list[str]:
    """Warnings for each target and budget whose baseline looks like it learned nothing.

    The baseline's headline cell is flagged when any seed's predictions were degenerate, or when
    its mean is not above the target's highest floor reference (``"majority class"``, or ``"constant
    mean"`` and, for text pairs, ``"zero-shot cosine"``) on the headline split and metric. Headline metrics are taken to be higher-is-better.

    Args:
        summary: `aggregate` of the result rows.
        baseline: the method the table's differences are to.
        headline: target -> (split, metric) as in the table.
        references: as for `write_reports`; a non-finite floor value is not compared.
        scale: multiplies the numbers quoted, as in the table.

    Returns:
        One message per flagged cell, in table column order; empty when nothing is wrong.
    """
    cells = [r for r in summary if r["method"] == baseline and _is_headline(r, headline)]
    cells.sort(key=lambda r: (list(headline).index(r["target"]), budget_order(budget_key(r))))
    out = []
    for r in cells:
        split, metric = headline[r["target"]]
        floor = _floor(references, r["target"], split, metric)
        problems = []
        if floor is not None and not r["mean"] > floor[1]:
            problems.append(f"not above the {floor[0]}")
        if r.get("degenerate_runs", 0):
            problems.append(f"predictions constant (one class) in {r['degenerate_runs']} of {r['n']} seed(s)")
        if not problems:
            continue
        against = f" against {floor[0]} {floor[1] * scale:.2f}" if floor is not None else ""
        out.append(f"{r['target']} @{budget_label(budget_key(r))}: baseline {baseline!r} scores {split} {metric} "
                   f"{r['mean'] * scale:.2f} (× {scale:g}, mean of {r['n']} seed(s)){against}: "
                   + "; ".join(problems) + ". It may not have learned the task, and differences to it then "
                   "overstate the other methods; check its fine-tuning (epochs, learning rate, budget).")
    return out


def _floor(references: Sequence[dict], target: str, split: str, metric: str) -> tuple[str, float] | None:
    """The highest finite reference a baseline must beat on this cell: the majority class or
    constant mean, and the zero-shot cosine where the target has one (a fine-tune below it lost
    what the encoder knew without any training)."""
    best = None
    for ref in references:
        if ref["reference"] in FLOOR_REFERENCES and (ref["target"], ref["split"], ref["metric"]) == (target, split, metric):
            value = float(ref["value"])
            if math.isfinite(value) and (best is None or value > best[1]):
                best = ref["reference"], value
    return best


def other_metrics(headline: dict[str, tuple[str, str]], metrics: dict[str, Sequence[str]]) -> list[dict]:
    """The headline-like maps of every further metric: the i-th of them shows each target's
    (i+1)-th metric on its headline split (targets with fewer metrics drop out)."""
    out = []
    for i in range(1, max((len(m) for m in metrics.values()), default=0)):
        extra = {t: (headline[t][0], metrics[t][i]) for t in headline if t in metrics and len(metrics[t]) > i}
        if extra:
            out.append(extra)
    return out


def write_reports(rows: Sequence[dict], out_dir: str | Path, *, headline: dict[str, tuple[str, str]],
                  methods: Sequence[str], title: str, note: str = "", curves: Sequence[dict] = (),
                  baseline: str | None = None, references: Sequence[dict] = (),
                  metrics: dict[str, Sequence[str]] | None = None) -> dict[str, Path]:
    """Writes results.md, results.csv, differences.csv, results.json, scores.png and, when runs were
    scored after more than one epoch, curves.png; returns their paths.

    results.json also holds the `study_warnings`; a caller that wants to show them calls
    `study_warnings` itself (``study_warnings(aggregate(rows), baseline=..., headline=...,
    references=...)``) or reads ``"warnings"`` back from the file.

    Args:
        baseline: the method the paired differences are to (default: ``methods[0]``).
        references: ``{"reference", "target", "split", "metric", "value"}`` scores that do not
            depend on the budget (majority class, constant mean, zero-shot cosine, ...).
        curves: ``{"method", "target", "fraction" | "per_class", "seed", "curve": [{"epoch",
            "<split>/<metric>"}]}``.
        metrics: target -> its metrics, the headline first; each further metric gets a table of its
            own in results.md (with differences and references) and a plot ``scores-<n>.png``.
    """
    rows, references = list(rows), check_references(references)
    baseline = baseline or methods[0]
    if baseline not in methods:
        raise ValueError(f"baseline {baseline!r} is not one of the methods {list(methods)}")
    out_dir = Path(out_dir)
    summary = aggregate(rows)
    differences = paired_differences(rows, baseline=baseline)
    warnings = study_warnings(summary, baseline=baseline, headline=headline, references=references)
    table = markdown_table(summary, headline=headline, methods=methods, title=title, note=note, baseline=baseline,
                           differences=differences, references=references)
    paths = {"markdown": out_dir / "results.md", "csv": out_dir / "results.csv",
             "differences": out_dir / "differences.csv", "json": out_dir / "results.json",
             "plot": out_dir / "scores.png"}
    extras = other_metrics(headline, metrics or {})
    for i, extra in enumerate(extras, start=2):
        names = ", ".join(f"{t} {m}" for t, (_, m) in extra.items())
        table += "\n\n" + markdown_table(summary, headline=extra, methods=methods, title=f"Other metrics: {names}",
                                         baseline=baseline, differences=differences, references=references)
    write_text_atomic(paths["markdown"], table + "\n")
    write_text_atomic(paths["csv"], _csv(summary, SUMMARY_FIELDS))
    write_text_atomic(paths["differences"], _csv([_flat_difference(d) for d in differences], DIFFERENCE_FIELDS))
    results = {"title": title, "baseline": baseline, "test": TEST, "summary": summary, "differences": differences,
               "references": references, "warnings": warnings, "runs": rows}
    write_text_atomic(paths["json"], json.dumps(results, indent=1))
    plot_scores(summary, paths["plot"], headline=headline, methods=methods, title=title, references=references)
    for i, extra in enumerate(extras, start=2):
        paths[f"plot-{i}"] = out_dir / f"scores-{i}.png"
        plot_scores(summary, paths[f"plot-{i}"], headline=extra, methods=methods, title=title, references=references)
    if any(len(c["curve"]) > 1 for c in curves):
        paths["curves"] = out_dir / "curves.png"
        plot_curves(curves, paths["curves"], headline=headline, methods=methods, title=title)
    return paths


def _csv(rows: Sequence[dict], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _flat_difference(d: dict) -> dict:
    # Lists become space-separated fields so the CSV stays one row per method and cell.
    return {**d, "seeds": " ".join(map(str, d["seeds"])), "differences": " ".join(map(repr, d["differences"]))}
