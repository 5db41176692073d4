"""Studies that measure: stages read exactly their cell's rows, budgets are bounded, degenerate
runs are flagged, references are computed from the data, and model selection never looks at a
reported split.

Runs use the random tiny encoder on the data that ships inside gensim (no data folder needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metalm.builders import build_model, build_tasks
from metalm.config import ConfigError, parse
from metalm.data.sampling import holdout, rows_digest, subsample
from metalm.experiments.references import majority_reference, constant_reference
from metalm.experiments.runner import run_experiment
from metalm.recipes import cell_task, run_finetune
from metalm.schema import DataConfig, EncoderConfig, ExperimentConfig, FinetuneConfig
from metalm.tasks.registry import get_task_spec
from metalm.train.evaluate import is_constant

TINY = {"name": "tiny", "max_length": 32}


def _experiment(tmp_path: Path, **changes) -> ExperimentConfig:
    data = {"title": "leak test", "output_dir": str(tmp_path / "out"), "encoder": TINY,
            "data": {"cache_dir": str(tmp_path / "cache")},
            "targets": ["polarity"], "fractions": [0.2], "seeds": [0, 1],
            "finetune": {"epochs": 1, "batch_size": 8, "eval_each_epoch": False},
            "methods": [{"name": "none"},
                        {"name": "joint", "train": {"tasks": ["polarity", "simlex"], "steps": 3, "batch_size": 4,
                                                    "checkpoint_every": 0, "evaluate": False}}]}
    data.update(changes)
    return parse(ExperimentConfig, data)


def _expected_rows(seed: int, fraction: float, validation_fraction: float = 0.0) -> np.ndarray:
    """The cell's training rows computed independently of the runner: the polarity labels of its
    training split, subsampled and held out with the public sampling functions."""
    _, tokenizer = build_model(EncoderConfig(**TINY), seed=0)
    task = build_tasks(["polarity"], tokenizer, data=DataConfig(cache_dir=None), max_length=32)["polarity"]
    labels = list(task.labels("train"))
    keep = subsample(labels, seed=seed, fraction=fraction)
    return holdout(labels, keep, fraction=validation_fraction, seed=seed)[0]


def test_stage_listing_the_target_reads_exactly_the_cells_rows(tmp_path):
    rows, _ = run_experiment(_experiment(tmp_path), progress=False)
    out = tmp_path / "out"
    for seed in (0, 1):
        stage = json.loads((out / "methods" / "joint" / "fraction-0.2" / f"seed-{seed}" / "stage.json").read_text())
        result = json.loads((out / "results" / "joint" / "polarity" / "fraction-0.2" / f"seed-{seed}.json").read_text())
        expected = _expected_rows(seed, 0.2)
        assert stage["tasks"]["polarity"]["indices_sha256"] == rows_digest(expected)
        assert stage["tasks"]["polarity"]["rows"] == len(expected) == result["train_size"] == 20
        assert result["rows_read"]["indices_sha256"] == rows_digest(expected)
        assert stage["tasks"]["simlex"]["rows"] == stage["tasks"]["simlex"]["of"]  # not a target: all of it
        assert result["stage"]["seed"] == seed  # stage_seeds: per_seed
    digests = {json.loads((out / "methods" / "joint" / "fraction-0.2" / f"seed-{s}" / "stage.json").read_text())
               ["tasks"]["polarity"]["indices_sha256"] for s in (0, 1)}
    assert len(digests) == 2  # each seed's cell has its own rows
    assert {r["method"] for r in rows} == {"none", "joint"}


def test_fine_tune_refuses_rows_that_differ_from_its_stage(tmp_path):
    cfg = _experiment(tmp_path, seeds=[0])
    run_experiment(cfg, progress=False)
    out = tmp_path / "out"
    stage_file = out / "methods" / "joint" / "fraction-0.2" / "seed-0" / "stage.json"
    stage = json.loads(stage_file.read_text())
    stage["tasks"]["polarity"]["indices_sha256"] = rows_digest(range(20))
    stage_file.write_text(json.dumps(stage))
    (out / "results" / "joint" / "polarity" / "fraction-0.2" / "seed-0.json").unlink()
    with pytest.raises(ConfigError, match="a stage must see exactly the cell's rows"):
        run_experiment(cfg, progress=False)


def test_stage_reading_a_target_file_under_another_name_is_refused(tmp_path):
    copy = {"name": "polarity_copy", "kind": "classification", "format": "fasttext",
            "files": {"all": "{gensim}/pang_lee_polarity.cor"}, "labels": ["neg", "pos"], "encoding": "cp1252",
            "split_ratios": {"train": 0.5, "dev": 0.5}}
    cfg = _experiment(tmp_path, methods=[{"name": "none"}, {"name": "leaky", "train": {
        "tasks": [copy, "simlex"], "steps": 2, "batch_size": 4}}])
    with pytest.raises(ConfigError, match="polarity_copy reads .* a file of the target polarity"):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "out" / "methods").exists()


def test_shared_stage_seed_and_per_class_budget(tmp_path):
    cfg = _experiment(tmp_path, fractions=[], per_class=[3], stage_seeds="shared", stage_seed=7,
                      methods=[{"name": "none"}, {"name": "simlex stage", "train": {
                          "tasks": ["simlex"], "steps": 2, "batch_size": 4, "checkpoint_every": 0,
                          "evaluate": False}}])
    rows, _ = run_experiment(cfg, progress=False)
    out = tmp_path / "out"
    assert (out / "methods" / "simlex-stage" / "final").is_dir()  # one stage for both seeds
    result = json.loads((out / "results" / "simlex-stage" / "polarity" / "per_class-3" / "seed-1.json").read_text())
    assert result["stage"]["seed"] == 7 and result["train_size"] == 6
    assert {r["per_class"] for r in rows} == {3} and {r["fraction"] for r in rows} == {None}


@pytest.mark.parametrize("changes, message", [
    ({"fractions": [0.0]}, r"fractions\[0\]: a fraction of the training data must be in \(0, 1\], got 0"),
    ({"fractions": [1.5]}, r"fractions\[0\]: .* got 1.5"),
    ({"per_class": [0]}, r"per_class\[0\]: examples per class must be at least 1"),
    ({"fractions": [], "per_class": []}, "give at least one budget"),
    ({"baseline": "nope"}, "baseline: 'nope' is not one of the methods"),
])
def test_budget_bounds_are_config_errors(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        _experiment(tmp_path, **changes)


def test_per_class_above_a_class_size_names_the_class(tmp_path):
    cfg = _experiment(tmp_path, fractions=[], per_class=[60], methods=[{"name": "none"}])
    with pytest.raises(ConfigError, match=r"class '(neg|pos)'"):
        run_experiment(cfg, progress=False)


def test_constant_predictions_are_flagged_and_varied_ones_are_not():
    assert is_constant([1, 1, 1, 1])
    assert is_constant([2.5, 2.5, 2.5])
    assert is_constant([[0, 0], [0]])  # token tags: one tag everywhere
    assert not is_constant([0, 1, 1, 1])
    assert not is_constant([2.5, 2.6, 2.5])
    assert not is_constant([[0, 1], [0]])


def test_degenerate_flag_on_a_constant_head_and_not_on_a_varied_one():
    import torch

    from metalm.builders import add_heads
    from metalm.train.evaluate import CONSTANT, evaluate

    model, tokenizer = build_model(EncoderConfig(**TINY), seed=0)
    tasks = build_tasks(["polarity"], tokenizer, data=DataConfig(cache_dir=None), max_length=32)
    add_heads(model, tasks, seed=0)
    linear = model.heads["polarity"][1]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([0.0, 1.0]))  # always "pos"
    constant = evaluate(model, tasks["polarity"], "dev", flag_constant=True)
    assert constant[CONSTANT] == 1.0
    assert constant["accuracy"] == pytest.approx(np.mean(np.asarray(tasks["polarity"].labels("dev")) == 1))
    task = tasks["polarity"]
    model.eval()
    with torch.no_grad():  # a head that splits the dev sentences along one direction of their vectors
        vectors = model.embed(task.batch("dev", list(range(task.size("dev")))))  # (N, H)
        direction = vectors[0] - vectors.mean(0)  # (H,)
        linear.weight.copy_(torch.stack([torch.zeros_like(direction), direction / direction.norm() ** 2]))
        linear.bias.copy_(torch.tensor([0.0, -float(vectors.mean(0) @ linear.weight[1])]))
    assert evaluate(model, tasks["polarity"], "dev", flag_constant=True)[CONSTANT] == 0.0
    assert CONSTANT not in evaluate(model, tasks["polarity"], "dev")


def test_best_epoch_is_chosen_on_held_out_training_rows(tmp_path):
    cfg = parse(FinetuneConfig, {"task": "polarity", "encoder": TINY, "data": {"cache_dir": None}, "fraction": 0.5,
                                 "finetune": {"epochs": 4, "batch_size": 8, "select": "best",
                                              "validation_fraction": 0.4, "optim": {"lr": 1e-3}},
                                 "output_dir": str(tmp_path / "ft")})
    result = run_finetune(cfg, progress=False, tensorboard=False)
    selection = [point["selection/accuracy"] for point in result.curve]
    best = int(np.argmax(selection))  # the first best epoch
    assert result.selected_epoch == result.curve[best]["epoch"]
    assert result.scores["dev"]["accuracy"] == result.curve[best]["dev/accuracy"]
    assert "selection" not in result.scores  # never reported
    assert result.train_size == len(_expected_rows(0, 0.5, validation_fraction=0.4)) == 30
    # The held-out rows are part of the cell's subsample and disjoint from what it trains on.
    _, tokenizer = build_model(EncoderConfig(**TINY), seed=0)
    task = build_tasks(["polarity"], tokenizer, data=DataConfig(cache_dir=None), max_length=32)["polarity"]
    cell = cell_task(task, seed=0, fraction=0.5, per_class=None, validation_fraction=0.4)
    assert cell.size("selection") == 20 and cell.size("dev") == task.size("dev")
    kept, held = holdout(list(task.labels("train")), subsample(list(task.labels("train")), seed=0, fraction=0.5),
                         fraction=0.4, seed=0)
    assert not set(kept) & set(held)


def test_majority_and_constant_references_by_hand():
    spec = get_task_spec("mrpc")
    labels = [1] * 281 + [0] * 127  # MRPC dev: 281 paraphrases of 408
    refs = {r["metric"]: r["value"] for r in majority_reference(spec, "dev", labels)}
    assert refs["accuracy"] == pytest.approx(281 / 408)
    assert refs["f1"] == pytest.approx(2 * 281 / (281 + 408))  # 0.8157: "always paraphrase"
    sts = get_task_spec("stsb")
    refs = constant_reference(sts, "dev", [0.0, 2.5, 5.0], train_labels=[1.0, 3.0])
    assert {r["metric"]: r["value"] for r in refs} == {"pearson": 0.0, "spearman": 0.0}
    assert {r["reference"] for r in refs} == {"constant mean"}
