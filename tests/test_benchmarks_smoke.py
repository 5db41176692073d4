"""The benchmark scripts run end to end. They are not timed here: speed and memory targets are
read from the ratios the scripts print, measured side by side in one run (benchmarks/README.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_meta_step_quick_runs_and_reports_every_configuration(tmp_path: Path):
    out = tmp_path / "meta_step.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "benchmarks/meta_step.py", "--quick", "--json", str(out)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| method | k |" in proc.stdout

    result = json.loads(out.read_text())
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    expected = {("multitask", None)} | {(m, k) for m in ("fomaml", "maml", "maml_recompute", "reptile") for k in (1, 2)}
    assert set(rows) == expected
    for key, row in rows.items():
        for field in ("step_time_s", "peak_mb", "x_multitask"):
            value = row[field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, field, value)
    for method in ("fomaml", "reptile"):
        for k in (1, 2):
            value = rows[method, k]["x_k_plus_1_plain"]
            assert math.isfinite(value) and value > 0
    assert result["memory_method"] and result["machine"]["torch"]


def test_run_all_quick_reports_every_benchmark_and_target(tmp_path: Path, data_root: Path):
    """benchmarks/run_all.py --quick: every benchmark runs and produces finite numbers; the peers of
    maml_peers are measured (meta-gradients checked equal) or reported as not installed, never absent.
    data_pipeline reads SST-2 from the data folder, so without one the test is skipped."""
    out = tmp_path / "all.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "METALM_DATA": str(data_root)}
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--only",
                           "finetune,scaling,maml_peers,data_pipeline,flops,mlm_throughput,sampler_overhead,eval_order", "--json", str(out)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "## targets" in proc.stdout
    result = json.loads(out.read_text())["results"]

    def positive(value) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

    sweep = result["finetune"]
    assert positive(sweep["ratio"]) and positive(sweep["local"]["steps_per_s"])
    assert set(sweep["local"]["scores"]) == set(sweep["processes"]["scores"]) == {"0", "1"}
    assert math.isfinite(sweep["max_score_diff"])

    scaling = result["scaling"]["rows"]
    assert set(scaling) == {"multitask", "maml"}
    assert all(positive(r["ratio"]) and r["two"]["ranks"] == 2 for r in scaling.values())

    peers = {(r["impl"], r["k"]): r for r in result["maml_peers"]["rows"]}
    assert set(peers) == {(i, k) for i in ("metalm", "metalm_recompute", "higher", "torchopt") for k in (1,)}
    for key, row in peers.items():
        if row.get("status"):
            assert key[0] in ("higher", "torchopt") and row["status"].startswith("not installed"), (key, row)
            assert f"| {key[0]} | {key[1]} | not installed" in proc.stdout
        else:
            assert row["check"]["equal"] is True and positive(row["step_time_s"]) and positive(row["peak_mb"]), key

    order = result["eval_order"]
    assert [r["task"] for r in order["tasks"]] == ["rte", "stsb"] and positive(order["ratio"])
    assert all(r["max_metric_diff"] < 1e-5 for r in order["tasks"])  # the same scores in either order

    data = result["data_pipeline"]
    assert data["examples"] == 872 and positive(data["speedup"]) and all(map(positive, data["first_s"] + data["cached_s"]))

    flops = result["flops"]
    assert positive(flops["matmul"]["flops_per_s"])
    (row,) = flops["rows"]
    assert row["method"] == "multitask" and positive(row["flops"]) and 0 < row["utilisation"] < 10

    mlm = result["mlm_throughput"]
    rates = mlm["tokens_per_s"]
    assert set(rates) == {"metalm", "hf_trainer", "metalm_grouped", "hf_grouped"} and all(map(positive, rates.values()))
    assert math.isclose(mlm["ratios"]["metalm/hf_trainer"], rates["metalm"] / rates["hf_trainer"])
    assert math.isclose(mlm["ratios"]["metalm_grouped/hf_grouped"], rates["metalm_grouped"] / rates["hf_grouped"])
    assert "| HF Trainer + DataCollatorForLanguageModeling |" in proc.stdout
    _check_mlm_tokens(mlm)

    overhead = result["sampler_overhead"]
    assert len(overhead["runs"]["uniform"]) == len(overhead["runs"]["mometas"]) == 1
    assert overhead["meta_test_s"] > 0 and math.isfinite(overhead["overhead_pct"])
    assert "| MOMETAS |" in proc.stdout


def _check_mlm_tokens(mlm: dict) -> None:
    """The tokens both sides of mlm_throughput counted per step (checked equal by the script) are the
    hand count: for each row metalm's stream draws, its word pieces cut to seq - 2, plus [CLS] and [SEP]."""
    from metalm.data.batching import BatchStream
    from metalm.models.encoder import load_tokenizer
    from metalm.objectives.task import load_objective

    s = mlm["settings"]
    task = load_objective("mlm", load_tokenizer("minilm"), paths=[s["corpus"]], seed=s["seed"],
                          max_sentences=s["max_sentences"], max_length=s["seq"])
    stream = BatchStream(task.size("train"), s["batch"], seed=s["seed"] * 1000)  # train_loop's stream of task 0
    ids = task.splits["train"]["ids"]
    expected = [sum(min(len(ids[task.rows["train"][i]]), s["seq"] - 2) + 2 for i in stream.next_indices())
                for _ in range(s["steps"])]
    assert mlm["tokens_per_step"]["metalm"] == mlm["tokens_per_step"]["hf_trainer"] == expected
    assert mlm["timed_tokens"]["metalm"] == sum(expected[s["warmup"]:])


def test_flop_count_of_a_training_step_matches_the_analytic_count():
    """benchmarks/flops.py counts 3x the forward matmul FLOPs of a BERT step (backward: input and
    weight gradients), checked against the hand count for the tiny encoder (hidden 32, 2 layers,
    intermediate 64, 2 x 16 tokens, a 2-class head on the first token)."""
    import torch

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    try:
        import flops
    finally:
        sys.path.remove(str(PROJECT_ROOT / "benchmarks"))
    B, T, H, I, L, C = 2, 16, 32, 64, 2, 2
    step, _ = flops.step_fn("multitask", encoder="tiny", batch=B, seq=T, k=1, device=torch.device("cpu"),
                            autocast_dtype=None)
    step()
    total, by_op = flops.count_flops(step)
    linear = L * (4 * H * H + 2 * H * I)  # Q, K, V, output; the two feed-forward matrices
    attention = L * 2 * (2 * B * T * T * H)  # Q K^T and (softmax) V, over all heads
    forward = 2 * B * T * linear + attention + 2 * B * H * C
    assert total == 3 * forward, by_op
