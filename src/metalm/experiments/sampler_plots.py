"""Plots of adaptive samplers over a study's training stages (Wu et al. 2022 Figs. 2-3):
sampling weights over time, and each rewarded method's meta-test reward against uniform's."""

from __future__ import annotations

import json
from pathlib import Path


def read_histories(out: str | Path) -> dict[str, dict]:
    """Method folder name -> ``sampler.json`` ({"names", "history"}) for every method that wrote one;
    with a stage per seed (or per cell), the first stage's in sorted order (seed-0 before seed-1)."""
    found = {}
    for method in sorted(p for p in Path(out).glob("methods/*") if p.is_dir()):
        paths = sorted(method.rglob("sampler.json"), key=lambda p: (len(p.parts), str(p)))
        if paths:
            found[method.name] = json.loads(paths[0].read_text())
    return found


def plot_sampler_histories(out: str | Path, *, uniform: str | None = None) -> dict[str, Path]:
    """Writes ``sampler_weights.png`` (weights after each update, one panel per adaptive method)
    and, where methods recorded meta-test rewards, ``sampler_rewards.png`` (reward per meta-test,
    and its difference to the ``uniform`` method's when given). Returns the written paths."""
    histories = {m: h for m, h in read_histories(out).items() if h["history"]}
    if not histories:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = {}
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.2), squeeze=False)
    for ax, (method, data) in zip(axes[0], histories.items()):
        steps = [r["step"] for r in data["history"]]
        weights = list(zip(*[r["new_probabilities"] for r in data["history"]]))
        for name, series in zip(data["names"], weights):
            ax.plot(steps, series, label=name)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("sampling weight")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths["sampler_weights"] = out / "sampler_weights.png"
    fig.savefig(paths["sampler_weights"], dpi=110)
    plt.close(fig)
    rewarded = {m: [(r["step"], r["reward"]) for r in h["history"] if "reward" in r] for m, h in histories.items()}
    rewarded = {m: v for m, v in rewarded.items() if v}
    if rewarded:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        base = dict(rewarded.get(uniform, []))
        for method, points in rewarded.items():
            if base and method != uniform:
                points = [(s, r - base[s]) for s, r in points if s in base]
            elif base:
                continue
            ax.plot(*zip(*points), label=method)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"reward − {uniform}'s" if base else "meta-test reward R(τ)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["sampler_rewards"] = out / "sampler_rewards.png"
        fig.savefig(paths["sampler_rewards"], dpi=110)
        plt.close(fig)
    return paths
