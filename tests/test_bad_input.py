"""Bad input is a DataError naming file, line, column and what was expected; nothing is cached.

Every case is read twice: through ``read_split`` and through ``load_task`` with a cache
folder, which must stay empty after the failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metalm import config as cfg
from metalm.data.cache import DONE
from metalm.data.errors import DataError
from metalm.schema import ExperimentConfig, TrainConfig
from metalm.tasks.spec import TaskSpec, read_split
from metalm.tasks.task import load_task

ENTAIL2 = ("entailment", "not_entailment")


def _pair_spec(file_name: str, **kw) -> TaskSpec:
    args = dict(name="toy", kind="pair_classification", files={"train": f"{{root}}/{file_name}"},
                columns={"text_a": "sentence1", "text_b": "sentence2", "label": "label"}, labels=ENTAIL2)
    args.update(kw)
    return TaskSpec(**args)


def _assert_no_cache_entries(cache_dir: Path) -> None:
    if cache_dir.exists():
        assert list(cache_dir.iterdir()) == []


def _fails_both_ways(spec: TaskSpec, root: Path, tokenizer, cache_dir: Path) -> DataError:
    """The DataError of read_split, after checking load_task raises the same one and caches nothing."""
    with pytest.raises(DataError) as direct:
        read_split(spec, "train", root=root)
    with pytest.raises(DataError) as loaded:
        load_task(spec, tokenizer, root=root, cache_dir=cache_dir)
    assert str(loaded.value) == str(direct.value)
    _assert_no_cache_entries(cache_dir)
    return direct.value


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_row_with_too_few_fields(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "short.tsv",
           "sentence1\tsentence2\tlabel\n"
           "A man sleeps.\tA person sleeps.\tentailment\n"
           "A dog runs.\tA cat sits.\tnot_entailment\n"
           "Only one sentence here.\tentailment\n"
           "A bird sings.\tA bird is silent.\tnot_entailment\n")
    err = _fails_both_ways(_pair_spec("short.tsv"), tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "short.tsv" in message and "line 4" in message
    assert "at least 3 tab-separated fields" in message and "2 field(s)" in message
    assert err.line == 4 and Path(err.path) == tmp_path / "short.tsv"


def test_unknown_label(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "labels.tsv",
           "sentence1\tsentence2\tlabel\n"
           "A man sleeps.\tA person sleeps.\tentailment\n"
           "A dog runs.\tA dog is running.\tmaybe\n")
    err = _fails_both_ways(_pair_spec("labels.tsv"), tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "labels.tsv" in message and "line 3" in message and "column 'label'" in message
    assert "expected one of ['entailment', 'not_entailment']" in message and "'maybe'" in message
    assert (err.line, err.column, err.got) == (3, "label", "maybe")


def test_unknown_label_in_an_indexed_column(tmp_path, tokenizer, cache_dir):
    # No header: columns are indices and the message names the index.
    _write(tmp_path / "noheader.tsv", "1\tgood film\n0\tbad film\n2\tstrange film\n")
    spec = TaskSpec(name="toy", kind="classification", files={"train": "{root}/noheader.tsv"}, header=False,
                    columns={"text_a": 1, "label": 0}, labels=("0", "1"))
    err = _fails_both_ways(spec, tmp_path, tokenizer, cache_dir)
    assert "noheader.tsv, line 3, column 0: expected one of ['0', '1'], got '2'" in str(err)


def test_empty_file(tmp_path, tokenizer, cache_dir):
    (tmp_path / "empty.tsv").write_bytes(b"")
    err = _fails_both_ways(_pair_spec("empty.tsv"), tmp_path, tokenizer, cache_dir)
    assert "empty.tsv" in str(err) and "expected a non-empty file" in str(err)


def test_header_only_file(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "header.tsv", "sentence1\tsentence2\tlabel\n")
    err = _fails_both_ways(_pair_spec("header.tsv"), tmp_path, tokenizer, cache_dir)
    assert "header.tsv" in str(err) and "at least one data row" in str(err)


def test_missing_file(tmp_path, tokenizer, cache_dir):
    err = _fails_both_ways(_pair_spec("nowhere/absent.tsv"), tmp_path, tokenizer, cache_dir)
    assert str(tmp_path / "nowhere" / "absent.tsv") in str(err) and "an existing file" in str(err)


def test_missing_header_column(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "cols.tsv",
           "sentence1\tsentence2\tgold_label\n"
           "A man sleeps.\tA person sleeps.\tentailment\n")
    err = _fails_both_ways(_pair_spec("cols.tsv"), tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "cols.tsv" in message and "line 1" in message and "column 'label'" in message
    assert "a header column named 'label'" in message and "gold_label" in message


def test_non_numeric_score(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "scores.tsv",
           "sentence1\tsentence2\tscore\n"
           "A plane takes off.\tAn airplane takes off.\t5.0\n"
           "A man plays.\tA man sings.\t1.25\n"
           "A cat eats.\tA dog eats.\tabc\n")
    spec = TaskSpec(name="toy", kind="regression", files={"train": "{root}/scores.tsv"},
                    columns={"text_a": "sentence1", "text_b": "sentence2", "label": "score"})
    err = _fails_both_ways(spec, tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "scores.tsv" in message and "line 4" in message and "column 'score'" in message
    assert "a number" in message and "'abc'" in message


def test_non_finite_score(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "nan.tsv", "sentence1\tsentence2\tscore\nA b.\tC d.\tnan\n")
    spec = TaskSpec(name="toy", kind="regression", files={"train": "{root}/nan.tsv"},
                    columns={"text_a": "sentence1", "text_b": "sentence2", "label": "score"})
    err = _fails_both_ways(spec, tmp_path, tokenizer, cache_dir)
    assert "nan.tsv, line 2, column 'score': expected a finite number" in str(err)


def _jsonl_spec(file_name: str) -> TaskSpec:
    return TaskSpec(name="toy", kind="classification", format="jsonl", files={"train": f"{{root}}/{file_name}"},
                    columns={"text_a": "text", "label": "label"}, labels=("neg", "pos"))


def test_jsonl_invalid_json(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "broken.jsonl",
           json.dumps({"text": "fine", "label": "pos"}) + "\n"
           '{"text": "no closing brace", "label": "neg"\n')
    err = _fails_both_ways(_jsonl_spec("broken.jsonl"), tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "broken.jsonl" in message and "line 2" in message and "expected a JSON object" in message


def test_jsonl_missing_key(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "keys.jsonl",
           json.dumps({"text": "fine", "label": "pos"}) + "\n\n"
           + json.dumps({"text": "no label here"}) + "\n")
    err = _fails_both_ways(_jsonl_spec("keys.jsonl"), tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "keys.jsonl" in message and "line 3" in message and "column 'label'" in message
    assert "a field named 'label'" in message and "['text']" in message


def test_jsonl_not_an_object_and_bad_label(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "list.jsonl", '["text", "pos"]\n')
    err = _fails_both_ways(_jsonl_spec("list.jsonl"), tmp_path, tokenizer, cache_dir)
    assert "list.jsonl, line 1: expected a JSON object" in str(err)
    _write(tmp_path / "label.jsonl", json.dumps({"text": "fine", "label": "neutral"}) + "\n")
    err = _fails_both_ways(_jsonl_spec("label.jsonl"), tmp_path, tokenizer, cache_dir)
    assert "label.jsonl, line 1, column 'label': expected one of ['neg', 'pos'], got 'neutral'" in str(err)


def test_conll_bad_tag(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "ner.txt",
           "John\tB-PER\nlives\tO\n\n"
           "Paris\tB-LOC\nis\tO\nbig\tB-CITY\n")
    spec = TaskSpec(name="toy", kind="token_classification", format="conll", files={"train": "{root}/ner.txt"},
                    labels=("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), metrics=("entity_f1",))
    err = _fails_both_ways(spec, tmp_path, tokenizer, cache_dir)
    message = str(err)
    assert "ner.txt" in message and "line 6" in message and "column 1" in message
    assert "'B-LOC'" in message and "'B-CITY'" in message


def test_conll_line_without_tag(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "ner.txt", "John\tB-PER\nlives\n")
    spec = TaskSpec(name="toy", kind="token_classification", format="conll", files={"train": "{root}/ner.txt"},
                    labels=("O", "B-PER", "I-PER"), metrics=("entity_f1",))
    err = _fails_both_ways(spec, tmp_path, tokenizer, cache_dir)
    assert "ner.txt, line 2: expected a line 'token<TAB>tag'" in str(err)


def test_line_numbers_count_comments_and_blank_lines(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "commented.tsv",
           "# a comment before the header\n"          # 1
           "sentence1\tsentence2\tlabel\n"            # 2
           "\n"                                       # 3
           "# another comment\n"                      # 4
           "A man sleeps.\tA person sleeps.\tentailment\n"  # 5
           "\n"                                       # 6
           "A dog runs.\tA cat sits.\tperhaps\n")     # 7
    err = _fails_both_ways(_pair_spec("commented.tsv", comment_prefix="#"), tmp_path, tokenizer, cache_dir)
    assert "commented.tsv, line 7, column 'label'" in str(err) and "'perhaps'" in str(err)


def test_line_numbers_count_multiline_csv_fields(tmp_path, tokenizer, cache_dir):
    # A quoted field spanning two physical lines: the bad row after it is on line 4.
    _write(tmp_path / "multi.tsv",
           "sentence1\tsentence2\tlabel\n"                       # 1
           '"A sentence that\nspans two lines."\tShort.\tentailment\n'  # 2-3
           "A dog runs.\tA cat sits.\tnope\n")                   # 4
    spec = _pair_spec("multi.tsv", quoting="csv")
    err = _fails_both_ways(spec, tmp_path, tokenizer, cache_dir)
    assert "multi.tsv, line 4, column 'label'" in str(err)
    # and the good rows before it are read with the quotes removed
    good = _write(tmp_path / "good.tsv", "sentence1\tsentence2\tlabel\n"
                  '"A sentence that\nspans two lines."\tShort.\tentailment\n')
    assert good.exists()
    records = read_split(_pair_spec("good.tsv", quoting="csv"), "train", root=tmp_path)
    assert records == [{"text_a": "A sentence that\nspans two lines.", "text_b": "Short.", "label": 0}]


def test_good_split_is_cached_and_bad_split_leaves_nothing(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\nA man sleeps.\tA person sleeps.\tentailment\n")
    _write(tmp_path / "dev.tsv", "sentence1\tsentence2\tlabel\nA dog runs.\tA cat sits.\tmaybe\n")
    spec = _pair_spec("train.tsv", files={"train": "{root}/train.tsv", "dev": "{root}/dev.tsv"})
    with pytest.raises(DataError, match=r"dev\.tsv, line 2, column 'label'"):
        load_task(spec, tokenizer, root=tmp_path, cache_dir=cache_dir)
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and (entries[0] / DONE).exists()  # only the complete train entry


def test_failure_while_writing_leaves_no_partial_entry(tmp_path, tokenizer, cache_dir, monkeypatch):
    import datasets

    _write(tmp_path / "train.tsv", "sentence1\tsentence2\tlabel\nA man sleeps.\tA person sleeps.\tentailment\n")

    def broken_save(self, path, *args, **kwargs):
        (Path(path) / "half-written.arrow").write_bytes(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_task(_pair_spec("train.tsv"), tokenizer, root=tmp_path, cache_dir=cache_dir)
    _assert_no_cache_entries(cache_dir)


# --- configuration errors ---------------------------------------------------------------------

def test_config_unknown_key_is_named():
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(TrainConfig, {"train": {"steps": 10}, "trian": {}})
    assert "unknown key 'trian'" in str(info.value)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(TrainConfig, {"train": {"optim": {"lrate": 1e-4}}})
    assert "train.optim" in str(info.value) and "'lrate'" in str(info.value) and "lr" in str(info.value)


def test_config_wrong_type_names_the_dotted_key():
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(TrainConfig, {"train": {"steps": "many"}})
    assert "train.steps" in str(info.value) and "integer" in str(info.value) and "'many'" in str(info.value)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(TrainConfig, {"train": {"optim": {"lr": "fast"}}})
    assert "train.optim.lr" in str(info.value)
    with pytest.raises(cfg.ConfigError, match="train: required key is missing"):
        cfg.parse(TrainConfig, {})


@pytest.mark.parametrize("train, expected", [
    ({"algorithm": "mamll"}, "algorithm: expected one of multitask, maml, fomaml, reptile, metapretrain, got 'mamll' "
                             "(did you mean 'maml'?)"),
    ({"algorithm": "maml", "inner_optimizer": "adamw"}, "inner_optimizer: expected one of sgd, adam, got 'adamw'"),
    ({"algorithm": "reptile", "first_order": True}, "first_order: algorithm 'reptile' does not take it"),
    ({"algorithm": "reptile", "recompute_inner_steps": True}, "recompute_inner_steps: algorithm 'reptile'"),
    ({"algorithm": "maml", "task_inner_steps": {"a": 2}}, "task_inner_steps: algorithm 'maml' does not take it "
                                                         "(it would be ignored); it applies to reptile"),
    ({"algorithm": "multitask", "first_order": True}, "it applies to maml, fomaml, metapretrain"),
    ({"algorithm": "multitask", "inner_steps": 2}, "inner_steps: algorithm 'multitask' does not take it"),
    ({"algorithm": "multitask", "inner_lr": 0.01}, "inner_lr: algorithm 'multitask' does not take it"),
    ({"algorithm": "multitask", "inner_optimizer": "adam"}, "inner_optimizer: algorithm 'multitask' does not take it"),
])
def test_algorithm_names_and_settings_are_checked_at_parse_time(train, expected):
    """What a run would refuse (or silently drop) is refused when the config is read, with the key's place."""
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(ExperimentConfig, {"targets": ["sst2"], "methods": [{"name": "base"}, {"name": "m", "train": train}]})
    assert ".methods[1].train: " in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("sampler, expected", [
    ({"kind": "uniform", "meta_lr": 1.0}, "sampler.meta_lr: kind 'uniform' does not take it (it would be ignored); "
                                          "it applies to kind mometas"),
    ({"kind": "proportional", "target": "sst2"}, "sampler.target: kind 'proportional' does not take it"),
    ({"kind": "gradient", "reward": "hard"}, "sampler.reward: kind 'gradient'"),
    ({"kind": "mometas", "scaling": "proportional"}, "it applies to kind gradient, loss"),
    ({"kind": "weights", "temperature": 2.0}, "sampler.temperature: kind 'weights'"),
])
def test_sampler_settings_a_kind_does_not_read_are_refused_at_parse_time(sampler, expected):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(ExperimentConfig, {"targets": ["sst2"], "methods": [{"name": "base"}, {"name": "m", "train": {
            "tasks": ["sst2", "quora"], "sampler": sampler}}]})
    assert ".methods[1].train.sampler: " in str(info.value) and expected in str(info.value)


def test_settings_an_algorithm_takes_pass_the_parse_time_check():
    parsed = cfg.parse(ExperimentConfig, {"targets": ["sst2"], "methods": [
        {"name": "a", "train": {"algorithm": "metapretrain", "first_order": True, "inner_steps": 3}},
        {"name": "b", "train": {"algorithm": "reptile", "task_inner_steps": {"sst2": 2}, "inner_optimizer": "adam"}},
        {"name": "c", "train": {"algorithm": "maml", "recompute_inner_steps": True}}]})
    assert [m.train.algorithm for m in parsed.methods] == ["metapretrain", "reptile", "maml"]


@pytest.mark.parametrize("schema, data", [(TrainConfig, {"train": {}, "precision": "fp16"}),
                                          (ExperimentConfig, {"targets": ["sst2"], "methods": [{"name": "a"}], "precision": "fp16"})])
def test_precision_is_checked_at_parse_time(schema, data):
    with pytest.raises(cfg.ConfigError, match="precision: expected one of fp32, bf16, got 'fp16' .*use bf16"):
        cfg.parse(schema, data)


def test_overrides_parse_numbers():
    data = cfg.apply_overrides({"train": {"steps": 10}}, ["train.optim.lr=3e-5", "train.steps=25"])
    lr = data["train"]["optim"]["lr"]
    assert isinstance(lr, float) and lr == pytest.approx(3e-5)
    parsed = cfg.parse(TrainConfig, data)
    assert parsed.train.optim.lr == pytest.approx(3e-5) and parsed.train.steps == 25
    with pytest.raises(cfg.ConfigError, match="expected key=value"):
        cfg.apply_overrides({}, ["train.steps"])


def test_skip_unlabelled_drops_only_empty_labels(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "gaps.tsv",
           "sentence1\tsentence2\tlabel\n"
           "A man sleeps.\tA person sleeps.\tentailment\n"
           "A dog runs.\tA cat sits.\t\n"
           "A bird sings.\tA bird is silent.\tnot_entailment\n")
    with pytest.raises(DataError, match=r"gaps\.tsv, line 3, column 'label'"):
        read_split(_pair_spec("gaps.tsv"), "train", root=tmp_path)  # strict by default
    records = read_split(_pair_spec("gaps.tsv", skip_unlabelled=True), "train", root=tmp_path)
    assert [(r["text_a"], r["label"]) for r in records] == [("A man sleeps.", 0), ("A bird sings.", 1)]
    # a wrong (non-empty) label is still an error
    _write(tmp_path / "wrong.tsv", "sentence1\tsentence2\tlabel\nA b.\tC d.\t\nE f.\tG h.\tmaybe\n")
    err = _fails_both_ways(_pair_spec("wrong.tsv", skip_unlabelled=True), tmp_path, tokenizer, cache_dir)
    assert "wrong.tsv, line 3, column 'label'" in str(err)


# --- row filters ----------------------------------------------------------------------------------

SUBSETS = ("sentence1\tsentence2\tlabel\tsubset\n"
           "A man sleeps.\tA person sleeps.\tentailment\tTRAIN\n"
           "A dog runs.\tA cat sits.\tnot_entailment\tTRAIN\n"
           "A bird sings.\tA bird is silent.\tnot_entailment\tDEV\n"
           "Who wrote it?\t\t\tTEST\n")  # the unlabelled test row is never parsed


def test_split_filters_read_several_splits_from_one_file(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "all.tsv", SUBSETS)
    spec = _pair_spec("all.tsv", files={"train": "{root}/all.tsv", "dev": "{root}/all.tsv"},
                      split_filters={"train": {"subset": "TRAIN"}, "dev": {"subset": ["DEV", "VALID"]}})
    assert [r["text_a"] for r in read_split(spec, "train", root=tmp_path)] == ["A man sleeps.", "A dog runs."]
    assert [r["text_a"] for r in read_split(spec, "dev", root=tmp_path)] == ["A bird sings."]
    task = load_task(spec, tokenizer, root=tmp_path, cache_dir=cache_dir)
    assert task.size("train") == 2 and task.size("dev") == 1
    # A filter on every split narrows further; the same data without filters is another cache entry.
    both = _pair_spec("all.tsv", files={"train": "{root}/all.tsv"}, filter={"label": "entailment"},
                      split_filters={"train": {"subset": "TRAIN"}})
    assert [r["text_a"] for r in read_split(both, "train", root=tmp_path)] == ["A man sleeps."]
    assert load_task(both, tokenizer, root=tmp_path, cache_dir=cache_dir).fingerprint != task.fingerprint


def test_a_filter_that_keeps_nothing_names_the_values_it_saw(tmp_path, tokenizer, cache_dir):
    _write(tmp_path / "all.tsv", SUBSETS)
    err = _fails_both_ways(_pair_spec("all.tsv", filter={"subset": "train"}), tmp_path, tokenizer, cache_dir)
    assert "subset in ['train']" in str(err) and "'TRAIN' (2)" in str(err) and "'DEV' (1)" in str(err)
    err = _fails_both_ways(_pair_spec("all.tsv", filter={"split": "TRAIN"}), tmp_path, tokenizer, cache_dir)
    assert err.line == 1 and "a header column named 'split' (for filter)" in str(err)


def test_jsonl_rows_are_filtered_by_key(tmp_path):
    rows = [{"premise": "A man sleeps.", "hypothesis": "A person sleeps.", "label": "entailment", "part": "a"},
            {"premise": "A dog runs.", "hypothesis": "A cat sits.", "label": "not_entailment", "part": "b"}]
    _write(tmp_path / "all.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    spec = _pair_spec("all.jsonl", format="jsonl", filter={"part": "b"},
                      columns={"text_a": "premise", "text_b": "hypothesis", "label": "label"})
    assert [r["text_a"] for r in read_split(spec, "train", root=tmp_path)] == ["A dog runs."]


def test_filters_are_checked_against_the_spec():
    with pytest.raises(cfg.ConfigError, match=r"split_filters names split\(s\) \['test'\]"):
        _pair_spec("all.tsv", split_filters={"test": {"subset": "TEST"}})
    with pytest.raises(cfg.ConfigError, match="not format conll"):
        TaskSpec(name="ner", kind="token_classification", format="conll", files={"train": "x"}, labels=("O",),
                 filter={"lang": "en"})
    spec = cfg.parse(TaskSpec, {"name": "t", "kind": "classification", "labels": ["0", "1"],
                                "columns": {"text_a": "s", "label": "y"}, "files": {"train": "x.tsv"},
                                "filter": {"lang": ["en", "de"], "source": "web"}})
    assert spec.filter == {"lang": ("en", "de"), "source": "web"}


def test_an_unregistered_metric_is_refused_when_the_config_is_checked(capsys):
    from metalm.cli import main

    assert main(["check", "task_example", "metrics=[accuracy,macro_f11]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("metalm: error: task_example: task my_reviews: metric 'macro_f11' is not registered "
                   "(did you mean 'macro_f1'? known: accuracy, f1, macro_f1, matthews, pearson, spearman, entity_f1)")
    with pytest.raises(cfg.ConfigError, match="metrics is empty"):
        cfg.parse(TaskSpec, {"name": "t", "kind": "regression", "files": {"train": "t.tsv"},
                             "columns": {"text_a": 0, "label": 1}, "metrics": []})


@pytest.mark.parametrize("name, suggestion", [("minlm", "minilm"), ("tin", "tiny"), ("bilstm-tny", "bilstm-tiny")])
def test_an_encoder_name_one_letter_off_a_built_in_is_refused(name, suggestion, capsys):
    from metalm.cli import main

    assert main(["check", "dou", f"encoder.name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"metalm: error: dou.encoder: encoder {name!r} is neither a built-in encoder") and \
        f"did you mean {suggestion!r}?" in err


def test_hub_ids_and_built_in_encoders_are_accepted():
    from metalm.schema import EncoderConfig

    for name in ("minilm", "tiny", "base", "bert-base-uncased", "roberta-base", "sentence-transformers/all-MiniLM-L6-v2"):
        assert EncoderConfig(name=name).name == name


@pytest.mark.parametrize("setting, message", [
    ("methods.1.train.steps=0", "dou.methods[1].train: steps: expected a positive number, got 0"),
    ("methods.1.train.inner_steps=-1", "dou.methods[1].train: inner_steps: expected a number >= 0, got -1"),
    ("methods.1.train.optim.lr=-1e-5", "dou.methods[1].train.optim: lr: expected a positive number, got -1e-05"),
    ("methods.1.train.task_batch_sizes={sst2: 0}",
     "dou.methods[1].train: task_batch_sizes: expected a positive number, got {'sst2': 0}"),
    ("finetune.epochs=0", "dou.finetune: epochs: expected a positive number, got 0"),
    ("finetune.optim.warmup_ratio=1.5", "dou.finetune.optim: warmup_ratio: expected a number in [0, 1), got 1.5"),
    ("workers=0", "dou: workers: expected a positive number of processes, got 0")])
def test_out_of_range_values_are_refused_at_parse_time(setting, message, capsys):
    from metalm.cli import main

    assert main(["check", "dou", setting]) == 2
    assert capsys.readouterr().err.strip() == f"metalm: error: {message}"


def test_a_run_refused_for_a_bound_leaves_no_folder(tmp_path, capsys):
    from metalm.cli import main

    out = tmp_path / "run"
    assert main(["train", "train_glue", "encoder.name=tiny", "train.steps=0", f"output_dir={out}"]) == 2
    assert "train: steps: expected a positive number, got 0" in capsys.readouterr().err
    assert not out.exists()
