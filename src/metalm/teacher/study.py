"""The Two Moons study of Shen (§4.2, Tables 4-6, 10; Figs. 2-3; Table 1), one command.

Every run is independent and writes one JSON file per result under ``<out>/runs/``; a re-run
reads those and only does what is missing, so a study can be stopped and resumed. Runs go to a
pool of worker processes with one torch thread each. The MLM baseline pre-trains once per seed
(its pre-training does not see the labelled set) and fine-tunes its latest and its best-MLM-loss
checkpoints on every set size; the meta methods pre-train once per (set size, seed).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from metalm.experiments.report import aggregate
from metalm.teacher import objective as obj
from metalm.teacher import twomoons as tm
from metalm.teacher.finetune import accuracy, finetune, predict
from metalm.teacher.model import ModelSize, teacher_and_student
from metalm.teacher.pretrain import PretrainSettings, masking_scheme, pretrain
from metalm.files import write_text_atomic

ROWS = {"mlm_latest": "MLM (latest)", "mlm_best": "MLM (best MLM loss)", "hard": "Hard",
        "soft": "Soft", "soft_fixed_y": "Soft (fixed y)"}
# Their Table 10 (test accuracy %, 5 seeds, 640k pre-training samples); None where not reported.
PAPER_TABLE_10 = {
    "mlm_latest": {10: 61.4, 20: 76.6, 40: 82.4, 80: 85.3, 160: 92.3},
    "mlm_best": {10: 73.4, 20: 81.2, 40: 82.8, 80: 83.5, 160: 88.9},
    "hard": {10: 60.6, 20: 62.9, 40: 74.8, 80: 86.0, 160: 90.5},
    "soft": {10: 56.3, 20: 74.6, 40: 71.0, 80: 86.2, 160: 93.2},
    "soft_fixed_y": {10: 75.1, 20: None, 40: None, 80: None, 160: 94.0},
}
META_METHODS = ("hard", "soft", "soft_fixed_y")


@dataclass(frozen=True)
class StudySize:
    """How big a study is. ``samples`` and ``warmup`` set pre-training (Table 5: 640k, 1000)."""

    name: str
    samples: int
    warmup: int
    unlabelled: int = 32000
    set_sizes: tuple[int, ...] = (10, 20, 40, 80, 160)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    finetune_epochs: int = 100
    test_points: int = 1000
    noise: float = 0.1
    methods: tuple[str, ...] = ("mlm",) + META_METHODS


SIZES = {
    "paper": StudySize("paper", samples=640_000, warmup=1000),
    # ~1 h on 2 idle cores; the warmup keeps the paper's ratio (1k of 40k optimizer steps) and peak lr.
    "default": StudySize("default", samples=9_600, warmup=15),
    "quick": StudySize("quick", samples=64, warmup=2, unlabelled=256, set_sizes=(10, 20), seeds=(0,),
                       finetune_epochs=3, test_points=200),
}


def _data_seed(kind: str, seed: int, n: int = 0) -> int:
    """Disjoint numpy seeds for each data set of a run."""
    return {"unlabelled": 1, "train": 2, "val": 3}[kind] * 1_000_000 + seed * 1000 + n


def _result_path(out: Path, row: str, n: int, seed: int) -> Path:
    return out / "runs" / f"{row}-n{n}-s{seed}.json"


def jobs(size: StudySize) -> list[dict]:
    """Seed-major order, so that a study stopped early holds whole seeds."""
    out = []
    for seed in size.seeds:
        if "mlm" in size.methods:
            out.append({"method": "mlm", "seed": seed, "set_sizes": list(size.set_sizes),
                        "rows": ["mlm_latest", "mlm_best"]})
        for n in size.set_sizes:
            for method in size.methods:
                if method != "mlm":
                    out.append({"method": method, "seed": seed, "set_sizes": [n], "rows": [method]})
    return out


def _done(out: Path, job: dict) -> bool:
    return all(_result_path(out, row, n, job["seed"]).exists() for row in job["rows"] for n in job["set_sizes"])


def teacher_samples(teacher, x_u: torch.Tensor, *, soft: bool, fixed_y: bool, seed: int) -> list[dict]:
    """What the teacher writes for some unlabelled sequences (their Table 1): sampled tokens for
    hard labels, the most likely token per position for soft labels."""
    teacher.eval()
    with torch.no_grad():
        logits = teacher(x_u, x_u != tm.VOCAB.pad)
    teacher.train()
    g = torch.Generator().manual_seed(seed)
    if soft:
        x_hat, y_hat = logits["input"].argmax(-1), logits["output"].argmax(-1)
    else:
        x_hat, y_hat = obj.sample_tokens(logits["input"], g), obj.sample_tokens(logits["output"], g)
    y_hat = x_u if fixed_y else y_hat
    return [{"x_u": tm.VOCAB.decode(a), "x_hat": tm.VOCAB.decode(b), "y_hat": tm.VOCAB.decode(c)}
            for a, b, c in zip(x_u, x_hat, y_hat)]


def _score(student, n: int, seed: int, size: StudySize, test: tm.LabelledSet, grid: torch.Tensor) -> dict:
    train = tm.labelled_set(n, noise=size.noise, seed=_data_seed("train", seed, n))
    val = tm.labelled_set(min(n, 128), noise=size.noise, seed=_data_seed("val", seed, n))
    fit = finetune(student, train, val, epochs=size.finetune_epochs, seed=seed)
    return {"test_accuracy": accuracy(student, test), "val_accuracy": fit["val_accuracy"],
            "best_epoch": fit["best_epoch"], "grid": "".join(map(str, predict(student, grid).tolist())),
            "train_points": train.points.tolist(), "train_labels": train.labels.tolist()}


def run_job(job: dict, size: StudySize, out: Path) -> list[Path]:
    """One pre-training and its fine-tunings; writes and returns the result files."""
    torch.set_num_threads(1)
    start = time.time()
    seed = job["seed"]
    unlabelled = tm.unlabelled_sequences(size.unlabelled, noise=size.noise, seed=_data_seed("unlabelled", seed))
    held = tm.unlabelled_sequences(256, noise=size.noise, seed=7)
    held_out = obj.mask_tokens(held, masking_scheme(), generator=torch.Generator().manual_seed(7))
    test = tm.labelled_set(size.test_points, noise=size.noise, seed=8)
    grid = tm.all_grid_inputs()
    settings = PretrainSettings(job["method"], samples=size.samples, warmup=size.warmup)
    teacher, student = teacher_and_student(ModelSize(tm.VOCAB.size), seed=seed)
    n0 = job["set_sizes"][0]
    train0 = tm.labelled_set(n0, noise=size.noise, seed=_data_seed("train", seed, n0))
    pre = pretrain(settings, teacher, student, unlabelled, [(train0.inputs, train0.targets())], held_out, seed=seed)
    common = {"seed": seed, "samples": size.samples, "size": size.name, "pretrain_steps": pre["steps"],
              "mlm_curve": pre["curve"], "final_mlm_loss": pre["curve"][-1]["mlm_loss"]}
    if job["method"] != "mlm":
        common["teacher_samples"] = teacher_samples(teacher, held[:3], soft=settings.soft,
                                                    fixed_y=settings.fixed_y, seed=seed)
        common["h_mean"] = sum(pre["h"]) / len(pre["h"]) if pre["h"] else None
        common["skipped_teacher_updates"] = pre["skipped"]
    states = {job["rows"][0]: {k: v.clone() for k, v in student.state_dict().items()}}
    if job["method"] == "mlm":
        states["mlm_best"] = pre["best_state"]
    written = []
    for row, state in states.items():
        for n in job["set_sizes"]:
            student.load_state_dict(state)
            result = {"method": row, "n": n, **common, **_score(student, n, seed, size, test, grid),
                      "seconds": round(time.time() - start, 1)}
            path = _result_path(out, row, n, seed)
            write_text_atomic(path, json.dumps(result))
            written.append(path)
    return written


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_study(size: StudySize, out: str | Path, *, workers: int = 2, progress: bool = True) -> dict[str, Path]:
    """Runs what is missing of ``size`` under ``out`` and writes the table and pictures."""
    out = Path(out)
    todo = [job for job in jobs(size) if not _done(out, job)]
    if progress:
        print(f"{len(jobs(size)) - len(todo)} of {len(jobs(size))} runs already done; running {len(todo)} "
              f"on {workers} worker(s)", flush=True)
    write_text_atomic(out / "study.json", json.dumps(asdict(size), indent=1))
    if workers <= 1:
        for job in todo:
            _report_job(run_job(job, size, out), progress)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures = [pool.submit(run_job, job, size, out) for job in todo]
            for future in as_completed(futures):
                _report_job(future.result(), progress)
    from metalm.teacher.pictures import write_study_report

    return write_study_report(out, size)


def _report_job(paths: list[Path], progress: bool) -> None:
    if progress:
        for path in paths:
            r = json.loads(path.read_text())
            print(f"{r['method']:>14} n={r['n']:<4} seed={r['seed']} test acc {100 * r['test_accuracy']:.1f} "
                  f"({r['seconds']:.0f}s)", flush=True)


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("*.json"))]


def summarize(results: list[dict]) -> dict[tuple[str, int], dict]:
    """(row, n) -> mean/std/n of test accuracy over seeds (report.aggregate's convention)."""
    rows = [{"method": r["method"], "target": "twomoons", "fraction": r["n"], "seed": r["seed"], "split": "test",
             "metric": "accuracy", "value": r["test_accuracy"]} for r in results]
    return {(s["method"], s["fraction"]): s for s in aggregate(rows)}


def table(results: list[dict], size: StudySize) -> str:
    """Their Table 10 layout: rows are methods, columns set sizes; ours as mean ± std, theirs in brackets."""
    summary = summarize(results)
    most = max((s["n"] for s in summary.values()), default=0)
    header = ["method"] + [f"{n} examples" for n in size.set_sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, name in ROWS.items():
        cells = [name]
        for n in size.set_sizes:
            s = summary.get((row, n))
            paper = PAPER_TABLE_10.get(row, {}).get(n)
            ours = "–" if s is None else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
            ours += f" [{s['n']} seed(s)]" if s is not None and s["n"] < most else ""
            cells.append(f"{ours} ({'–' if paper is None else f'{paper:.1f}'})")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s["n"] for s in summary.values()})
    lines += ["", f"Test accuracy (%) on {size.test_points} points, mean ± std over {'/'.join(map(str, seeds))} "
              f"seed(s); in brackets the paper's Table 10 (5 seeds, 640,000 pre-training samples). Ours: "
              f"size `{size.name}`, {size.samples:,} pre-training samples per run (batch 4 x grad. accum. 4, "
              f"warmup {size.warmup} optimizer steps), {size.unlabelled:,} unlabelled sequences, "
              f"{size.finetune_epochs} fine-tuning epochs."]
    return "\n".join(lines)

