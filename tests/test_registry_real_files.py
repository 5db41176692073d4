"""Every built-in task read from the real offline files: counts, label ranges, first rows.

Counts come from ``shared/data/README.md``, with two corrections checked against the files:

* SentEval: the README gives each count one lower than the file holds (8,528 for MR train,
  which has 8,529 lines). The files have no header (the first line of each is
  ``<label><TAB><sentence>``), and the totals with every line counted are the standard
  sizes of these datasets (MR 10,662; SUBJ 10,000), so the README subtracted a header
  that is not there.
* quora: ``quora-dev.csv`` has 20,214 rows, two of them with an empty ``is_duplicate``;
  the task drops those two (as minBERT's own reader does), leaving 20,212 = 12,627 + 7,585,
  the README's per-label counts.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from metalm.data.errors import DataError
from metalm.tasks.registry import REGISTRY, WNUT_TAGS
from metalm.tasks.spec import TaskSpec, read_split, resolve_path, split_records

MISSING = None  # a split whose file is not available offline

# task -> split -> number of records (MISSING: reading must raise DataError naming the file)
PER_FILE = {
    "cola": {"train": 8551, "dev": 1043},
    "sst2": {"train": 67349, "dev": 872, "test": 1821},
    "mrpc": {"train": 3668, "dev": 408, "test": 1725},
    "stsb": {"train": 5749, "dev": 1500, "test": 1379},
    "rte": {"train": 2490, "dev": 277},
    "wnli": {"train": 635, "dev": 71},
    "qqp": {"train": MISSING, "dev": MISSING},
    "mnli": {"train": MISSING, "dev_matched": MISSING, "dev_mismatched": MISSING},
    "qnli": {"train": MISSING, "dev": 5463},  # QNLI's dev.tsv is there; its train.tsv is not
    "sst5": {"train": 8544, "dev": 1101},
    "sts": {"train": 6040, "dev": 863},
    "cfimdb": {"train": 1707, "dev": 245},
    # SentEval: one more than the README says (see the module docstring).
    "mr": {"train": 8529, "dev": 2133},
    "cr": {"train": 3016, "dev": 755},
    "subj": {"train": 8000, "dev": 2000},
    "mpqa": {"train": 8482, "dev": 2121},
}

# tasks split from one file: task -> (records in the file, split sizes)
FROM_ONE_FILE = {
    "quora": (20212, {"train": 16170, "dev": 2021, "test": 2021}),  # 20,214 rows less 2 unlabelled
    "qnli_dev": (5463, {"train": 4370, "dev": 1093}),
    "wnut16": (2394, {"train": 1915, "dev": 479}),
}

# (task, split) -> rows whose text is empty in the file itself. CR train line 1763 is "0<TAB>"
# (label, no sentence); the reader accepts an empty text field, so it comes through as "".
EMPTY_TEXTS = {("cr", "train"): 1}

# (task, split) -> the first record, as the files hold it
FIRST_ROWS = {
    ("rte", "train"): {"text_a": "No Weapons of Mass Destruction Found in Iraq Yet.",
                       "text_b": "Weapons of Mass Destruction Found in Iraq.", "label": 1},  # not_entailment
    ("stsb", "train"): {"text_a": "A plane is taking off.", "text_b": "An air plane is taking off.",
                        "label": 5.0},
    ("cola", "train"): {"text_a": "Our friends won't buy this analysis, let alone the next one we propose.",
                        "label": 1},
    ("sst2", "train"): {"text_a": "hide new secretions from the parental units", "label": 0},
    ("sst5", "train"): {"label": 3},  # header `id sentence sentiment`, first sentiment 3
    ("mr", "train"): {"text_a": "a compelling pre wwii drama with vivid characters and a warm , moving message",
                      "label": 1},
    ("qnli", "dev"): {"text_a": "What came into force after the new constitution was herald?", "label": 0},
}


def _check_records(spec: TaskSpec, records: list[dict], where: str, empty_texts: int = 0) -> None:
    assert records, where
    if spec.kind == "token_classification":
        for r in records:
            assert r["tokens"] and len(r["tokens"]) == len(r["tags"]), where
            assert all(isinstance(t, str) and t for t in r["tokens"]), where
            assert all(isinstance(t, int) and 0 <= t < spec.num_labels for t in r["tags"]), where
        return
    assert sum(not r["text_a"].strip() for r in records) == empty_texts, where
    for r in records:
        assert isinstance(r["text_a"], str) and r["text_a"] == r["text_a"].strip(), (where, r)
        if spec.kind in ("pair_classification", "regression"):
            assert isinstance(r["text_b"], str) and r["text_b"].strip(), (where, r)
        else:
            assert "text_b" not in r, (where, r)
        if spec.kind == "regression":
            assert isinstance(r["label"], float) and math.isfinite(r["label"]), (where, r)
        else:
            assert isinstance(r["label"], int) and 0 <= r["label"] < spec.num_labels, (where, r)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_task_reads_real_files(name, data_root):
    spec = REGISTRY[name]
    if name in FROM_ONE_FILE:
        total, sizes = FROM_ONE_FILE[name]
        parts = {split: read_split(spec, split, root=data_root) for split in spec.splits}
        assert {s: len(p) for s, p in parts.items()} == sizes
        assert sum(len(p) for p in parts.values()) == total
        for split, records in parts.items():
            _check_records(spec, records, f"{name}/{split}")
        return
    expected = PER_FILE.get(name)
    if expected is not None:
        assert set(spec.splits) == set(expected), f"{name}: splits changed, update this test"
    for split in spec.splits:
        want = expected[split] if expected is not None else "any"
        if want is MISSING:
            path = resolve_path(spec.files[split], root=data_root)
            assert not path.exists()
            with pytest.raises(DataError) as info:
                read_split(spec, split, root=data_root)
            assert str(path) in str(info.value)
            assert Path(info.value.path) == path
            continue
        records = read_split(spec, split, root=data_root)
        if want != "any":  # a task added after this test was written: invariants only
            assert len(records) == want, f"{name}/{split}"
        _check_records(spec, records, f"{name}/{split}", EMPTY_TEXTS.get((name, split), 0))
        for key, value in FIRST_ROWS.get((name, split), {}).items():
            assert records[0][key] == value, f"{name}/{split} first row, {key}"


def test_every_expected_task_is_registered():
    assert set(PER_FILE) | set(FROM_ONE_FILE) <= set(REGISTRY)
    assert {"qqp", "mnli", "qnli"} <= set(REGISTRY)


def test_label_balance_of_real_files(data_root):
    # Label counts the README states: quora 12,627 zeros and 7,585 ones.
    spec = REGISTRY["quora"]
    counts = Counter(r["label"] for s in spec.splits for r in read_split(spec, s, root=data_root))
    assert counts == {0: 12627, 1: 7585}
    # RTE labels are names in the file; both map into the index range, in the spec's order.
    rte = read_split(REGISTRY["rte"], "dev", root=data_root)
    assert set(r["label"] for r in rte) == {0, 1}


def test_quora_without_an_empty_label_fails_loudly_when_not_asked_to_skip(data_root):
    from dataclasses import replace

    strict = replace(REGISTRY["quora"], skip_unlabelled=False)
    with pytest.raises(DataError) as info:
        read_split(strict, "train", root=data_root)
    assert "quora-dev.csv" in str(info.value) and "line 2577" in str(info.value)
    assert info.value.column == "is_duplicate"


def test_csv_quoting_is_parsed(data_root):
    # sts-train.csv line 10: "In standard English, I think ""don't got"" has ... ""ain't""."
    sts = read_split(REGISTRY["sts"], "train", root=data_root)
    texts = {r["text_a"] for r in sts}
    assert "In standard English, I think \"don't got\" has the same register as \"ain't\"." in texts
    assert not any(t.startswith('"In standard English') for t in texts)
    # quora-dev.csv: every quoted field is CSV-escaped twice in the file, e.g.
    #   """What does """"turning the ship slowly"""" mean?"""
    # The reader removes the CSV layer (as Python's csv and minBERT's own reader do).
    spec = REGISTRY["quora"]
    quora = [r for s in spec.splits for r in read_split(spec, s, root=data_root)]
    quoted = [r["text_a"] for r in quora if "turning the ship slowly" in r["text_a"]]
    assert quoted == ['"What does ""turning the ship slowly"" mean?"']
    plain = [r for r in quora if r["text_a"] == "What can you get as a customer of Star Alliance?"]
    assert len(plain) == 1 and plain[0]["text_b"] == "What are some ways to register with Star Alliance?"
    assert plain[0]["label"] == 0


def test_glue_tsv_keeps_quotes_as_text(data_root):
    # GLUE tsv uses no CSV quoting: MRPC's first sentence has quotes inside that must survive.
    mrpc = read_split(REGISTRY["mrpc"], "train", root=data_root)
    assert mrpc[0]["text_a"] == ('Amrozi accused his brother, whom he called "the witness", '
                                 "of deliberately distorting his evidence.")


def test_wnut16_tags_decode_to_bio(data_root):
    spec = REGISTRY["wnut16"]
    records = [r for s in spec.splits for r in read_split(spec, s, root=data_root)]
    tags = Counter(WNUT_TAGS[t] for r in records for t in r["tags"])
    assert tags["O"] > sum(v for k, v in tags.items() if k != "O")  # mostly outside entities
    assert tags["B-person"] > 0 and tags["B-geo-loc"] > 0
    # the file's first tweet is somewhere in the two parts
    assert any(r["tokens"][:4] == ["TOP", "EVENT", "--", "&gt;"] for r in records)


def _numbered(n: int) -> list[dict]:
    return [{"text_a": f"s{i}", "label": i % 2} for i in range(n)]


def test_split_records_is_deterministic_and_disjoint():
    records = _numbered(1001)
    ratios = {"train": 0.8, "dev": 0.1, "test": 0.1}
    first = split_records(records, ratios, seed=0)
    second = split_records(records, ratios, seed=0)
    assert first == second
    ids = {name: [r["text_a"] for r in part] for name, part in first.items()}
    assert [len(ids[n]) for n in ratios] == [801, 100, 100]
    seen = set()
    for part in ids.values():
        assert not seen & set(part)
        seen |= set(part)
    assert seen == {r["text_a"] for r in records}
    # shuffled (not the file order), and a different seed gives a different split
    assert ids["train"] != [f"s{i}" for i in range(801)]
    other = split_records(records, ratios, seed=1)
    assert [r["text_a"] for r in other["dev"]] != ids["dev"]


def test_split_records_on_real_file_is_repeatable(data_root):
    spec = REGISTRY["qnli_dev"]
    a = {s: read_split(spec, s, root=data_root) for s in spec.splits}
    b = {s: read_split(spec, s, root=data_root) for s in spec.splits}
    assert a == b
    key = lambda r: (r["text_a"], r["text_b"])  # noqa: E731
    assert not {key(r) for r in a["train"]} & {key(r) for r in a["dev"]}
