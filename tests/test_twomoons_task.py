"""Two Moons as a registered task: its reader is Shen's codec, so any encoder fine-tunes on it."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from metalm import config as cfg
from metalm.cli import main
from metalm.data.errors import DataError
from metalm.data.readers import read_twomoons
from metalm.tasks.registry import get_task_spec
from metalm.tasks.spec import read_split, spec_from_mapping
from metalm.teacher import twomoons as tm


def test_the_registered_test_split_is_the_points_the_study_scores():
    spec = get_task_spec("twomoons")
    records = read_split(spec, "test", root="/nonexistent")
    study_test = tm.labelled_set(1000, noise=0.1, seed=8)  # teacher.study's test set
    assert [r["text_a"] for r in records] == [f"{x} {y}" for x, y in study_test.points.tolist()]
    assert [r["label"] for r in records] == study_test.labels.tolist()
    train = read_split(spec, "train", root="/nonexistent")
    assert len(train) == 1000 and {r["label"] for r in train} == {0, 1}
    assert not {r["text_a"] for r in train[:50]} <= {r["text_a"] for r in records}  # other points


@pytest.mark.parametrize("recipe, message", [
    ("points=10 seed=1", "missing noise"),
    ("points=10 noise=0.1 seed=1 colour=red", "'colour=red' is not one of"),
    ("points=ten noise=0.1 seed=1", "points must be an integer, got 'ten'"),
    ("points=1 noise=0.1 seed=1", "points must be >= 2"),
])
def test_a_bad_recipe_is_refused_with_the_split_and_what_is_wrong(recipe, message):
    with pytest.raises(cfg.ConfigError, match=f"task mine: files.train: .*{message}"):
        spec_from_mapping({"name": "mine", "kind": "classification", "format": "twomoons", "labels": ["0", "1"],
                           "metrics": ["accuracy"], "files": {"train": recipe}})
    with pytest.raises(DataError, match=message):
        read_twomoons(recipe, parse_label=int)


def test_a_tiny_encoder_fine_tunes_on_two_moons_without_a_data_folder(tmp_path):
    out = tmp_path / "ft"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["finetune", "finetune_rte", "task=twomoons", "encoder.name=tiny", "fraction=0.2",
                     "finetune.epochs=1", "finetune.optim.lr=1e-3", f"output_dir={out}",
                     f"data.cache_dir={tmp_path / 'cache'}", "data.root=/nonexistent"])
    assert code == 0
    scores = json.loads(stdout.getvalue())["scores"]
    assert set(scores) == {"dev", "test"} and 0.0 <= scores["test"]["accuracy"] <= 1.0
    assert (out / "final" / "heads.json").is_file()
