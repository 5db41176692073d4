"""The Two Moons study's outputs: the table, the student's decision regions over all 64x64 inputs
(their Fig. 3), accuracy against set size (their Fig. 1, left), the student's MLM loss (Fig. 1, right) and the teacher's samples (Table 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metalm.experiments.report import save_figure
from metalm.teacher import twomoons as tm
from metalm.teacher.study import PAPER_TABLE_10, ROWS, StudySize, load_results, summarize, table
from metalm.files import write_text_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_regions(results: list[dict], path: Path, *, set_sizes, title: str) -> None:
    """Rows: methods; columns: set sizes; each panel the predicted label of every (x, y) in
    [0, 64)^2 for the lowest seed, with that run's labelled points on top."""
    plt = _plt()
    rows = [row for row in ROWS if any(r["method"] == row for r in results)]
    fig, axes = plt.subplots(len(rows), len(set_sizes), figsize=(2.2 * len(set_sizes), 2.2 * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, n in enumerate(set_sizes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            runs = sorted((r for r in results if r["method"] == row and r["n"] == n), key=lambda r: r["seed"])
            if j == 0:
                ax.set_ylabel(ROWS[row], fontsize=8)
            if i == 0:
                ax.set_title(f"{n} examples", fontsize=8)
            if not runs:
                continue
            r = runs[0]
            pred = np.frombuffer(r["grid"].encode(), dtype=np.uint8) - ord("0")
            ax.imshow(pred.reshape(tm.GRID, tm.GRID).T, origin="lower", cmap="coolwarm", vmin=0, vmax=1, alpha=0.5,
                      extent=(0, tm.GRID, 0, tm.GRID))
            pts = np.asarray(r["train_points"]) + 0.5
            ax.scatter(pts[:, 0], pts[:, 1], c=r["train_labels"], cmap="coolwarm", vmin=0, vmax=1, s=6,
                       edgecolors="k", linewidths=0.3)
            ax.text(1, 59, f"{100 * r['test_accuracy']:.0f}%", fontsize=7)
    save_figure(fig, path, title)


def plot_accuracy(results: list[dict], path: Path, *, set_sizes, title: str) -> None:
    """Test accuracy against labelled-set size, ours (solid, ± std) and the paper's (dashed)."""
    plt = _plt()
    summary = summarize(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, (row, name) in enumerate(ROWS.items()):
        color = f"C{k}"
        pts = [(n, summary[(row, n)]) for n in set_sizes if (row, n) in summary]
        if pts:
            ax.errorbar([n for n, _ in pts], [100 * s["mean"] for _, s in pts], yerr=[100 * s["std"] for _, s in pts],
                        marker="o", capsize=3, color=color, label=name)
        paper = [(n, v) for n, v in PAPER_TABLE_10[row].items() if v is not None and n in set_sizes]
        if paper:
            ax.plot(*zip(*paper), linestyle="--", marker="x", color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xticks(list(set_sizes), [str(n) for n in set_sizes])
    ax.set_xlabel("labelled examples (dashed: paper's Table 10)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, title)


def mlm_curves(results: list[dict]) -> dict[str, tuple[list[int], list[float], int]]:
    """Per method, (pre-training samples, mean held-out MLM loss over seeds, seeds) from each run's
    stored ``mlm_curve``. A pre-training is shared by its fine-tunings on several set sizes (and
    MLM (latest) and MLM (best) are one pre-training), so each (method, seed) counts once."""
    per: dict[str, dict[int, list[dict]]] = {}
    for r in results:
        if r.get("mlm_curve"):
            method = "mlm" if r["method"].startswith("mlm") else r["method"]
            per.setdefault(method, {}).setdefault(r.get("seed", 0), r["mlm_curve"])
    out = {}
    for method, runs in per.items():
        length = min(len(c) for c in runs.values())  # seeds of one size evaluate at the same steps
        first = next(iter(runs.values()))
        y = np.mean([[p["mlm_loss"] for p in c[:length]] for c in runs.values()], axis=0)
        out[method] = ([p["samples"] for p in first[:length]], [float(v) for v in y], len(runs))
    return out


def plot_mlm_curve(results: list[dict], path: Path, *, title: str) -> None:
    """The student's held-out MLM loss against pre-training samples (their Fig. 1, right)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, (x, y, seeds) in mlm_curves(results).items():
        label = "MLM" if method == "mlm" else ROWS.get(method, method)
        ax.plot(x, y, marker=".", label=f"{label} ({seeds} seeds)")
    ax.set_xlabel("pre-training samples")
    ax.set_ylabel("student MLM loss (held out)")
    ax.legend(fontsize=7)
    save_figure(fig, path, title)


def samples_markdown(results: list[dict]) -> str:
    """The teacher's pseudo data for three held-out sequences, per meta method, lowest seed and set size."""
    lines = []
    for row in ("hard", "soft", "soft_fixed_y"):
        runs = sorted((r for r in results if r["method"] == row), key=lambda r: (r["seed"], r["n"]))
        if not runs:
            continue
        r = runs[0]
        lines += [f"### {ROWS[row]} (seed {r['seed']}, {r['n']} labelled examples)", ""]
        for s in r["teacher_samples"]:
            lines += ["```", f"x_u : {s['x_u']}", f"x̂   : {s['x_hat']}", f"ŷ   : {s['y_hat']}", "```"]
        lines.append("")
    return "\n".join(lines)


def pretraining_markdown(results: list[dict]) -> str:
    """Each pre-training's end state (their Fig. 1, right): the student's held-out MLM loss, and
    for hard labels the mean h and the skipped teacher updates; mean over runs."""
    lines = ["| method | student MLM loss after pre-training | mean h (hard labels) | runs |", "|---|---|---|---|"]
    for row, name in ROWS.items():
        runs = [r for r in results if r["method"] == row]
        if not runs:
            continue
        loss = np.mean([r["final_mlm_loss"] for r in runs])
        hs = [r["h_mean"] for r in runs if r.get("h_mean") is not None]
        h = f"{np.mean(hs):.4f}" if hs else "–"
        lines.append(f"| {name} | {loss:.3f} | {h} | {len(runs)} |")
    return "\n".join(lines)


def write_study_report(out: str | Path, size: StudySize) -> dict[str, Path]:
    """Writes results.md (table and teacher samples), results.json, regions.png, accuracy.png and
    mlm_curve.png."""
    out = Path(out)
    results = [r for r in load_results(out) if r["n"] in size.set_sizes and r["seed"] in size.seeds]
    title = f"Two Moons, size {size.name}: {size.samples:,} pre-training samples per run"
    paths = {"markdown": out / "results.md", "json": out / "results.json", "regions": out / "regions.png",
             "accuracy": out / "accuracy.png", "mlm_curve": out / "mlm_curve.png"}
    text = (f"## {title}\n\n{table(results, size)}\n\n## Pre-training\n\n{pretraining_markdown(results)}\n\n"
            f"## What the teacher writes\n\n{samples_markdown(results)}")
    write_text_atomic(paths["markdown"], text)
    summary = [{"method": k[0], "n": k[1], **{f: v[f] for f in ("mean", "std", "n")}} for k, v in
               summarize(results).items()]
    write_text_atomic(paths["json"], json.dumps({"size": size.name, "summary": summary}, indent=1))
    plot_regions(results, paths["regions"], set_sizes=size.set_sizes, title=title)
    plot_accuracy(results, paths["accuracy"], set_sizes=size.set_sizes, title=title)
    plot_mlm_curve(results, paths["mlm_curve"], title=title)
    return paths
