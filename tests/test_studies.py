"""Every shipped study runs end to end at a tiny size (tiny encoder, a few steps, one seed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from metalm import cli
from metalm.config import read_yaml

# dou_paper reads MNLI, QQP and QNLI from the Hub, which tests cannot reach (tests/test_dou.py checks it).
STUDIES = ["dou", "dou_distributions", "dou_hyper", "dou_transfer", "xue", "lv", "mometas",
           "xue_paper", "lv_paper", "lv_mlm_nsp", "lv_scratch"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny(study: str, out: Path, data_root: Path, cache: Path) -> Path:
    """The study's config shrunk to seconds: tiny encoder, 2 steps per stage, one seed, one epoch."""
    data = read_yaml(cli.resolve_config(study))
    data.update(output_dir=str(out), seeds=[0], encoder={"name": "bilstm-tiny" if study == "lv_scratch" else "tiny",
                                                          "max_length": 32, "pair_max_length": 32},
                data={"root": str(data_root), "cache_dir": str(cache)})
    # One process: starting a pool of workers (each importing torch) cost more than the tiny cells;
    # tests/test_executor.py runs the pooled executor against the local one.
    data.update(executor="local", workers=1)
    data["finetune"] = {**data["finetune"], "epochs": 1 if study != "lv" else 2, "min_steps": 0}
    data["target_finetune"] = {t: {**c, "min_steps": 0} for t, c in data.get("target_finetune", {}).items()}
    # Small fine-tuning sets; two fractions where the study sweeps them (one example per class at 0.001).
    data["fractions"] = [0.001, 0.01] if len(data["fractions"]) > 1 else [0.02]
    for method in data["methods"]:
        if method.get("train"):
            method["train"] = {**method["train"], "steps": 2, "batch_size": 4, "checkpoint_every": 0}
            if method["train"].get("objectives"):  # corpus objectives: a few sentences, a meta-test every step
                method["train"]["objectives"] = [{**o, "corpus": {**o["corpus"], "max_sentences": 40}}
                                                 for o in method["train"]["objectives"]]
                if method["train"].get("sampler", {}).get("kind") in ("gradient", "loss", "mometas"):
                    method["train"]["sampler"] = {**method["train"]["sampler"], "update_every": 1}  # adaptive
            if method["train"].get("sampler", {}).get("kind") == "mometas":  # a meta-test every step
                method["train"]["sampler"] = {**method["train"]["sampler"], "update_every": 1}
    path = out.parent / f"{study}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("study", STUDIES)
def test_study_runs_end_to_end(study, tmp_path, data_root, shared_cache, capsys):
    config = tiny(study, tmp_path / "out", data_root, shared_cache)
    assert cli.main(["experiment", str(config)]) == 0
    printed = capsys.readouterr().out
    spec = read_yaml(config)
    for method in spec["methods"]:
        assert f"| {method['name']} |" in printed  # every method has its row
    if spec.get("notes"):
        assert spec["notes"].split()[0] in printed  # the study says what stands in for what
    if spec["finetune"].get("max_steps"):  # the note under the table says how fine-tuning was capped
        assert f"at most {spec['finetune']['max_steps']} steps" in printed
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    combos = {(r["method"], r["target"], r["fraction"]) for r in summary}
    assert len(combos) == len(spec["methods"]) * len(spec["targets"]) * len(spec["fractions"])
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0
    if study == "lv":  # per-epoch fine-tuning curves (Lv et al. Fig. 2)
        assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    if study == "dou":  # the learned task sampler of the Reptile row: its weights over time
        assert (tmp_path / "out" / "sampler_weights.png").stat().st_size > 0
        assert "reptile--learned-sampler" in json.dumps(sorted(p.name for p in (tmp_path / "out" / "methods").iterdir()))
    if study == "mometas":  # sampling weights and rewards against uniform (Wu et al. Figs. 2-3)
        assert (tmp_path / "out" / "sampler_weights.png").stat().st_size > 0
        assert (tmp_path / "out" / "sampler_rewards.png").stat().st_size > 0
