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


def test_sampler_overhead_quick_runs_and_reports_the_overhead(tmp_path: Path):
    out = tmp_path / "sampler_overhead.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "benchmarks/sampler_overhead.py", "--quick", "--steps", "6", "--k", "3",
                           "--json", str(out)], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| MOMETAS |" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["runs"]["uniform"]) == len(result["runs"]["mometas"]) == 1
    assert result["meta_test_s"] > 0 and math.isfinite(result["overhead_pct"])
