"""Configuration: every shipped config validates, and bad overrides fail with exit 2 and a useful message."""

from __future__ import annotations

import pytest

from metalm import config as cfg
from metalm.cli import config_class, main, resolve_config, shipped_configs
from metalm.schema import ExperimentConfig, FinetuneConfig, TrainConfig
from metalm.tasks.spec import TaskSpec

EXPECTED_KIND = {
    "demo": ExperimentConfig,
    "glue_rte": ExperimentConfig,
    "train_glue": TrainConfig,
    "finetune_rte": FinetuneConfig,
    "task_example": TaskSpec,
}


def test_the_expected_configs_ship():
    assert set(EXPECTED_KIND) <= set(shipped_configs())


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_config_parses_and_checks(name, capsys):
    data = cfg.read_yaml(shipped_configs()[name])
    schema = config_class(data)
    if name in EXPECTED_KIND:
        assert schema is EXPECTED_KIND[name]
    parsed = cfg.parse(schema, data, where=name)
    assert isinstance(parsed, schema)
    assert main(["check", name]) == 0
    assert capsys.readouterr().out.strip() == f"{name}: valid {schema.__name__}"


def test_task_example_is_a_task_spec():
    spec = cfg.parse(TaskSpec, cfg.read_yaml(resolve_config("task_example")), where="task_example")
    assert spec.name == "my_reviews"
    assert spec.kind == "classification"
    assert spec.format == "csv" and spec.quoting == "csv"
    assert spec.labels == ("1", "2", "3", "4", "5")
    assert spec.metrics == ("accuracy", "macro_f1")
    assert spec.columns == {"text_a": "review", "label": "stars"}


def test_shipped_values_survive_parsing():
    # Learning rates written as `5.0e-5` in YAML come out as floats.
    exp = cfg.load(ExperimentConfig, resolve_config("glue_rte"))
    assert [m.name for m in exp.methods][0] == "pre-trained encoder only"
    assert exp.methods[0].train is None
    assert exp.methods[1].train.tasks == ("sst2", "mrpc", "cola", "qnli_dev")
    assert exp.methods[1].train.optim.lr == pytest.approx(5e-5)
    assert exp.finetune.optim.lr == pytest.approx(3e-5)
    assert exp.targets == ("rte",) and exp.fractions == (0.1,) and exp.seeds == (0, 1, 2)
    train = cfg.load(TrainConfig, resolve_config("train_glue"))
    assert train.train.sampler.kind == "temperature" and train.train.sampler.temperature == 2.0
    assert isinstance(train.train.optim.lr, float)


# --- errors: exit status 2 and a message that names the key -----------------------------------

def test_unknown_key_names_it_and_lists_known_keys(capsys):
    assert main(["train", "train_glue", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metalm: error:")
    assert "'stepz'" in err
    assert "known keys:" in err
    for known in ("steps", "batch_size", "tasks", "sampler", "optim", "checkpoint_every"):
        assert known in err.split("known keys:", 1)[1]


def test_wrong_type_names_the_dotted_key(capsys):
    assert main(["train", "train_glue", "train.steps=many"]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err
    assert "expected an integer" in err and "'many'" in err


def test_check_reports_bad_override_with_exit_2(capsys):
    assert main(["check", "glue_rte", "--set", "finetune.epochs=three"]) == 2
    assert main(["check", "glue_rte", "finetune.epochs=three"]) == 2  # the spelling every command takes
    assert main(["check", "glue_rte", "finetune.epochs=4"]) == 0
    assert main(["check", "finetune.epochs=4"]) == 2  # no config
    assert "finetune.epochs" in capsys.readouterr().err


def test_unknown_task_in_finetune_is_exit_2(tmp_path, capsys, data_root):
    argv = ["finetune", "finetune_rte", "task=no_such_task", "encoder.name=tiny", f"output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}", f"data.root={data_root}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'no_such_task'" in err
    assert "rte" in err  # the message lists the registered tasks
    assert not (tmp_path / "out").exists()


def test_unknown_task_in_train_is_exit_2(tmp_path, capsys, data_root):
    argv = ["train", "train_glue", "train.tasks=[rte,nope_task]", "encoder.name=tiny",
            f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", f"data.root={data_root}"]
    assert main(argv) == 2
    assert "'nope_task'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "final").exists()


def test_missing_config_is_exit_2(capsys):
    assert main(["train", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "train_glue" in err


# --- overrides ---------------------------------------------------------------------------------

def test_override_through_a_list_index():
    original = cfg.read_yaml(resolve_config("glue_rte"))
    changed = cfg.apply_overrides(original, ["methods.1.train.steps=5"])
    assert changed["methods"][1]["train"]["steps"] == 5
    # Siblings are kept and the input is not modified.
    assert changed["methods"][1]["train"]["batch_size"] == 16
    assert changed["methods"][1]["train"]["tasks"] == ["sst2", "mrpc", "cola", "qnli_dev"]
    assert changed["methods"][0] == original["methods"][0]
    assert original["methods"][1]["train"]["steps"] == 300
    exp = cfg.parse(ExperimentConfig, changed)
    assert exp.methods[1].train.steps == 5
    assert exp.methods[1].train.batch_size == 16


def test_override_value_parsing():
    data = cfg.apply_overrides({}, ["a.lr=3e-5", "a.tasks=[cola,rte]", "a.flag=true", "a.none=null", "a.s=abc"])
    assert data == {"a": {"lr": 3e-5, "tasks": ["cola", "rte"], "flag": True, "none": None, "s": "abc"}}
    assert isinstance(data["a"]["lr"], float)


@pytest.mark.parametrize("override, message", [
    ("methods.5.name=x", "not an index of a list of 2"),
    ("methods.one.name=x", "not an index"),
    ("title.x=1", "cannot set 'x'"),
    ("noequals", "expected key=value"),
    ("a..b=1", "empty key"),
])
def test_bad_overrides_raise_config_error(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.apply_overrides(cfg.read_yaml(resolve_config("glue_rte")), [override])


def test_resumed_sweep_refuses_results_of_other_settings(tmp_path, data_root):
    from metalm import cli

    base = ["demo", "encoder.name=tiny", "seeds=[0]", "fractions=[0.3]", "methods.1.train.steps=4",
            "methods=[{name: a}, {name: b, train: {tasks: [simlex], steps: 4}}]", f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert cli.main(base) == 0
    # Changing the fine-tuning settings must not silently reuse the finished runs.
    assert cli.main(base + ["finetune.epochs=1"]) == 2
    # Changing the training stage must not reuse the trained method either.
    assert cli.main(base + ["methods.1.train.steps=5", "methods.0.name=other"]) == 2
    # The same settings (and a new seed) resume fine.
    assert cli.main(base[:2] + ["seeds=[0,1]"] + base[3:]) == 0


def test_first_difference_names_the_key():
    from metalm.config import ConfigError, check_same_settings, first_difference

    assert first_difference({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3]}}) == "a.c.1"
    assert first_difference({"a": 1}, {"a": 1}) is None
    with pytest.raises(ConfigError, match=r"train\.steps: 4 then, 5 now"):
        check_same_settings({"train": {"steps": 4}}, {"train": {"steps": 5}}, where="run x")
    check_same_settings({"x": 1, "y": 2}, {"x": 1, "y": 3}, where="run x", ignore=("y",))
