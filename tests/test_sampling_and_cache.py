"""Seeded stratified subsampling, the content-addressed Arrow cache, and Hub-style reading."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from metalm.data.cache import DONE
from metalm.data.errors import DataError
from metalm.data.hub import read_hub
from metalm.data.readers import label_parser
from metalm.config import ConfigError
from metalm.data.sampling import StratumTooSmall, subsample
from metalm.tasks import task as task_module
from metalm.tasks.registry import REGISTRY
from metalm.tasks.spec import HubSource, TaskSpec, read_split, spec_from_mapping
from metalm.tasks.task import Task, load_task

ENTAIL2 = ("entailment", "not_entailment")

# --- subsample --------------------------------------------------------------------------------


def test_same_seed_same_indices_and_different_seed_differs():
    labels = [i % 3 for i in range(300)]
    a = subsample(labels, seed=7, fraction=0.2)
    b = subsample(labels, seed=7, fraction=0.2)
    c = subsample(labels, seed=8, fraction=0.2)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) == 60
    assert not np.array_equal(a, c)
    assert list(a) == sorted(set(a.tolist()))  # sorted, no repeats
    assert a.min() >= 0 and a.max() < 300


def test_stratification_keeps_class_proportions():
    labels = [0] * 90 + [1] * 10
    for seed in range(5):
        keep = subsample(labels, seed=seed, fraction=0.1)
        assert Counter(labels[i] for i in keep) == {0: 9, 1: 1}


def test_a_small_class_keeps_at_least_one_example():
    labels = [0] * 98 + [1] * 2
    keep = subsample(labels, seed=0, fraction=0.05)
    assert Counter(labels[i] for i in keep) == {0: 5, 1: 1}


def test_per_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 4)
    keep = subsample(labels, seed=3, per_class=4)
    assert Counter(labels[keep].tolist()) == {0: 4, 1: 4, 2: 4}  # all of a class exactly k large
    np.testing.assert_array_equal(keep, subsample(labels, seed=3, per_class=4))


def test_per_class_above_a_class_size_is_refused():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 2)  # class 2 cannot give 4: no silent imbalance
    with pytest.raises(StratumTooSmall, match=r"per_class 4 is more than the 2 examples of class 2") as info:
        subsample(labels, seed=3, per_class=4)
    assert (info.value.label, info.value.size, info.value.per_class) == (2, 2, 4)
    assert isinstance(info.value, ValueError)
    with pytest.raises(StratumTooSmall, match="the 30 examples of class 1"):  # the smallest short stratum
        subsample(labels[:80], seed=3, per_class=31)
    scores = np.linspace(0.0, 5.0, 100)  # 20 per quintile
    with pytest.raises(StratumTooSmall, match=r"the 20 examples of scores 0 to 0.96 \(quintile 1 of 5\)") as info:
        subsample(scores, seed=0, per_class=21, kind="regression")
    assert info.value.label is None
    assert len(subsample(scores, seed=0, per_class=20, kind="regression")) == 100


def _fake_rte(labels: list[int]) -> Task:
    """RTE's spec over a made-up training split (only the labels matter to subsampling)."""
    return Task(spec=REGISTRY["rte"], splits={"train": {"input_ids": [[101, 102]] * len(labels), "labels": labels}},
                pad_id=0)


def test_subsampled_names_the_task_and_the_class():
    task = _fake_rte([0] * 300 + [1] * 249)
    with pytest.raises(ConfigError) as info:
        task.subsampled(seed=0, per_class=300)
    assert str(info.value) == "task rte: per_class 300 is more than the 249 training examples of class 'not_entailment'"
    assert task.subsampled(seed=0, per_class=249).size("train") == 498
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"task rte: fraction must be in \(0, 1\], got {fraction}"):
            task.subsampled(seed=0, fraction=fraction)
    with pytest.raises(ConfigError, match="task rte: per_class must be >= 1"):
        task.subsampled(seed=0, per_class=0)


def test_regression_is_stratified_by_quintile():
    scores = np.linspace(0.0, 5.0, 100)
    keep = subsample(scores, seed=0, fraction=0.2, kind="regression")
    assert len(keep) == 20
    quintile = np.minimum(keep // 20, 4)  # scores are sorted, so index // 20 is the quintile
    assert Counter(quintile.tolist()) == {q: 4 for q in range(5)}
    keep = subsample(scores, seed=0, per_class=3, kind="regression")
    assert len(keep) == 15 and Counter(np.minimum(keep // 20, 4).tolist()) == {q: 3 for q in range(5)}


def test_token_tasks_are_not_stratified():
    labels = [0] * 100  # placeholders for sentences
    keep = subsample(labels, seed=0, fraction=0.25, kind="token_classification")
    assert len(keep) == 25


def test_fraction_one_returns_everything():
    np.testing.assert_array_equal(subsample([1, 0, 1, 1], seed=5, fraction=1.0), np.arange(4))


@pytest.mark.parametrize("kwargs", [dict(), dict(fraction=0.5, per_class=2), dict(fraction=0.0),
                                    dict(fraction=1.5), dict(per_class=0)])
def test_bad_subsample_arguments(kwargs):
    with pytest.raises(ValueError):
        subsample([0, 1, 0, 1], seed=0, **kwargs)


# --- cache ------------------------------------------------------------------------------------


@pytest.fixture
def rte_copy(tmp_path, data_root) -> Path:
    """A data root with a copy of RTE dev (so the test may edit it)."""
    folder = tmp_path / "data" / "glue" / "RTE"
    folder.mkdir(parents=True)
    shutil.copy(data_root / "glue" / "RTE" / "dev.tsv", folder / "dev.tsv")
    return tmp_path / "data"


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))


def test_second_load_comes_from_the_cache(data_root, tokenizer, cache_dir, monkeypatch):
    spec = REGISTRY["rte"]
    first = load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir)
    assert first.size("train") == 2490 and first.size("dev") == 277
    entries = _entries(cache_dir)
    assert len(entries) == 2 and all((e / DONE).exists() for e in entries)

    def no_reading(*args, **kwargs):
        raise AssertionError("read_split was called although the cache holds the task")

    monkeypatch.setattr(task_module, "read_split", no_reading)
    second = load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir)
    assert second.splits == first.splits
    # without a cache folder the reader is always called
    with pytest.raises(AssertionError, match="read_split was called"):
        load_task(spec, tokenizer, root=data_root, cache_dir=None, splits=["dev"])


def test_tokenised_columns_match_the_records(data_root, tokenizer, cache_dir):
    spec = REGISTRY["rte"]
    task = load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"])
    records = read_split(spec, "dev", root=data_root)
    assert task.labels("dev") == [r["label"] for r in records]
    enc = tokenizer(records[0]["text_a"], records[0]["text_b"], truncation=True, max_length=128)
    assert task.splits["dev"]["input_ids"][0] == enc["input_ids"]


def test_max_length_is_part_of_the_key(data_root, tokenizer, cache_dir, monkeypatch):
    spec = REGISTRY["rte"]
    long = load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"], max_length=128)
    calls = []
    real_read = task_module.read_split
    monkeypatch.setattr(task_module, "read_split", lambda *a, **k: calls.append(1) or real_read(*a, **k))
    short = load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"], max_length=16)
    assert calls == [1]  # read again, not taken from the max_length=128 entry
    assert len(_entries(cache_dir)) == 2
    assert max(len(ids) for ids in short.splits["dev"]["input_ids"]) == 16
    assert max(len(ids) for ids in long.splits["dev"]["input_ids"]) > 16
    load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"], max_length=16)
    assert calls == [1]  # and that entry is reused in turn


def test_changed_file_contents_change_the_key(rte_copy, tokenizer, cache_dir):
    spec = REGISTRY["rte"]
    before = load_task(spec, tokenizer, root=rte_copy, cache_dir=cache_dir, splits=["dev"])
    path = rte_copy / "glue" / "RTE" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[1].rstrip("\n").split("\t")
    flipped = "entailment" if fields[3] == "not_entailment" else "not_entailment"
    lines[1] = "\t".join(fields[:3] + [flipped]) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    after = load_task(spec, tokenizer, root=rte_copy, cache_dir=cache_dir, splits=["dev"])
    assert after.labels("dev")[0] == 1 - before.labels("dev")[0]
    assert after.labels("dev")[1:] == before.labels("dev")[1:]
    assert len(_entries(cache_dir)) == 2


def test_subsampled_task(data_root, tokenizer, cache_dir):
    task = load_task(REGISTRY["rte"], tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"])
    small = task.subsampled(seed=0, per_class=10, split="dev")
    assert small.size("dev") == 20 and Counter(small.labels("dev")) == {0: 10, 1: 10}
    assert task.size("dev") == 277  # the original is unchanged
    again = task.subsampled(seed=0, per_class=10, split="dev")
    assert again.splits["dev"] == small.splits["dev"]


def test_pairs_are_tokenised_at_pair_max_length(data_root, tokenizer, cache_dir):
    from metalm.builders import build_tasks
    from metalm.schema import DataConfig

    data = DataConfig(root=str(data_root), cache_dir=str(cache_dir))
    tasks = build_tasks(["rte", "cola"], tokenizer, data=data, max_length=12, pair_max_length=40, splits=["dev"])
    longest = {name: max(len(ids) for ids in task.splits["dev"]["input_ids"]) for name, task in tasks.items()}
    assert longest == {"rte": 40, "cola": 12}  # both truncated, each at its own limit
    same = build_tasks(["rte", "cola"], tokenizer, data=data, max_length=12, splits=["dev"])  # no pair limit
    assert {name: max(map(len, task.splits["dev"]["input_ids"])) for name, task in same.items()} == \
        {"rte": 12, "cola": 12}


def test_which_tasks_have_two_texts():
    from metalm.tasks.spec import has_two_texts

    pairs = {name for name, spec in REGISTRY.items() if has_two_texts(spec)}
    assert {"rte", "mrpc", "stsb", "qnli_dev", "quora", "sts", "simlex", "analogy"} <= pairs
    assert not pairs & {"sst2", "cola", "sst5", "cfimdb", "mr", "wnut16", "polarity"}
    hub_only = TaskSpec(name="nli", kind="pair_classification", format="hub", labels=ENTAIL2,
                        hub=HubSource(path="csv", columns={"text_a": "premise", "text_b": "hypothesis"}))
    assert has_two_texts(hub_only)


def test_finetune_passes_both_limits_to_build_tasks(monkeypatch):
    from metalm import recipes
    from metalm.schema import EncoderConfig, FinetuneConfig

    seen = {}

    class Stop(Exception):
        pass

    def record(refs, tokenizer, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(recipes, "build_tasks", record)
    cfg = FinetuneConfig(task="rte", encoder=EncoderConfig(name="tiny", max_length=24, pair_max_length=48))
    with pytest.raises(Stop):
        recipes.run_finetune(cfg, progress=False, tensorboard=False)
    assert seen["max_length"] == 24 and seen["pair_max_length"] == 48
    assert EncoderConfig().pair_max_length == 128


# --- Hub-style reading (datasets' csv / json / parquet builders over local files) ---------------


def _write_csv(path: Path) -> Path:
    path.write_text(
        "premise,hypothesis,label\n"
        '"A man, tired, sleeps.",A person sleeps.,entailment\n'
        "A dog runs.,A cat sits.,not_entailment\n"
        "A bird sings.,A bird makes a sound.,entailment\n",
        encoding="utf-8")
    return path


COLUMNS = {"text_a": "premise", "text_b": "hypothesis", "label": "label"}
EXPECTED = [
    {"text_a": "A man, tired, sleeps.", "text_b": "A person sleeps.", "label": 0},
    {"text_a": "A dog runs.", "text_b": "A cat sits.", "label": 1},
    {"text_a": "A bird sings.", "text_b": "A bird makes a sound.", "label": 0},
]


def test_read_hub_csv(tmp_path, hf_datasets_cache):
    csv_path = _write_csv(tmp_path / "pairs.csv")
    records = read_hub("csv", split="train", data_files={"train": str(csv_path)}, columns=COLUMNS,
                       parse_label=label_parser("class", ENTAIL2))
    assert records == EXPECTED


def test_hub_task_spec_through_read_split(tmp_path, hf_datasets_cache):
    csv_path = _write_csv(tmp_path / "pairs.csv")
    spec = spec_from_mapping({
        "name": "local_csv", "kind": "pair_classification", "format": "hub", "columns": COLUMNS,
        "labels": list(ENTAIL2),
        "hub": {"path": "csv", "data_files": {"train": str(csv_path)}, "splits": {"train": "train"}},
    })
    assert isinstance(spec.hub, HubSource) and spec.splits == ("train",)
    assert read_split(spec, "train", root=tmp_path) == EXPECTED
    with pytest.raises(ValueError, match="no Hub split for 'dev'"):
        read_split(spec, "dev", root=tmp_path)


def test_hub_bad_label_and_missing_file(tmp_path, hf_datasets_cache):
    path = tmp_path / "bad.csv"
    path.write_text("premise,hypothesis,label\nA b.,C d.,entailment\nE f.,G h.,maybe\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_hub("csv", split="train", data_files={"train": str(path)}, columns=COLUMNS,
                 parse_label=label_parser("class", ENTAIL2))
    assert "csv[train], line 2, column 'label'" in str(info.value) and "'maybe'" in str(info.value)
    with pytest.raises(DataError, match="a dataset that can be loaded"):
        read_hub("csv", split="train", data_files={"train": str(tmp_path / "absent.csv")}, columns=COLUMNS,
                 parse_label=label_parser("class", ENTAIL2))


def test_hub_json_with_scores(tmp_path, hf_datasets_cache):
    path = tmp_path / "scores.json"
    rows = [{"s1": "A plane takes off.", "s2": "An airplane takes off.", "score": 5.0},
            {"s1": "A man plays.", "s2": "A woman sings.", "score": 0.6}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    spec = TaskSpec(name="local_json", kind="regression", format="hub",
                    columns={"text_a": "s1", "text_b": "s2", "label": "score"},
                    hub=HubSource(path="json", data_files={"train": str(path)}, splits={"train": "train"}))
    records = read_split(spec, "train", root=tmp_path)
    assert [r["label"] for r in records] == [5.0, 0.6]
    assert records[1]["text_b"] == "A woman sings."


def test_hub_class_label_maps_by_name(tmp_path, hf_datasets_cache):
    from datasets import ClassLabel, Dataset, Features, Value

    # The dataset orders its classes the other way round from the task's labels.
    features = Features({"premise": Value("string"), "hypothesis": Value("string"),
                         "label": ClassLabel(names=["not_entailment", "entailment"])})
    Dataset.from_dict({"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [0, 1, 1]},
                      features=features).to_parquet(str(tmp_path / "cl.parquet"))
    records = read_hub("parquet", split="train", data_files={"train": str(tmp_path / "cl.parquet")},
                       columns=COLUMNS, parse_label=label_parser("class", ENTAIL2))
    assert [r["label"] for r in records] == [1, 0, 0]  # indices in the task's order (entailment = 0)

    Dataset.from_dict({"premise": ["a", "b"], "hypothesis": ["x", "y"], "label": [1, -1]},
                      features=features).to_parquet(str(tmp_path / "unlabelled.parquet"))
    with pytest.raises(DataError) as info:
        read_hub("parquet", split="train", data_files={"train": str(tmp_path / "unlabelled.parquet")},
                 columns=COLUMNS, parse_label=label_parser("class", ENTAIL2))
    assert "line 2" in str(info.value) and "label -1" in str(info.value)


def test_cache_key_follows_the_tokenizer_not_its_folder(tmp_path, data_root, tokenizer, cache_dir, monkeypatch):
    """The tokenizer saved beside a trained model must hit the entries of the one it came from."""
    from transformers import AutoTokenizer

    from metalm.tasks import task as task_module
    from metalm.tasks.registry import REGISTRY

    spec = REGISTRY["rte"]
    first = task_module.load_task(spec, tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"])
    tokenizer.save_pretrained(tmp_path / "saved")
    copy = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert copy.name_or_path != tokenizer.name_or_path
    monkeypatch.setattr(task_module, "read_split", lambda *a, **k: pytest.fail("re-read despite the cache"))
    again = task_module.load_task(spec, copy, root=data_root, cache_dir=cache_dir, splits=["dev"])
    assert again.splits["dev"] == first.splits["dev"]
    # A different tokenizer (other casing) must not share the entry.
    assert task_module.tokenizer_fingerprint(copy) == task_module.tokenizer_fingerprint(tokenizer)
    other = AutoTokenizer.from_pretrained(tmp_path / "saved", do_lower_case=False)
    assert task_module.tokenizer_fingerprint(other) != task_module.tokenizer_fingerprint(tokenizer)
