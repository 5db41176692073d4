"""Cached columns read from Arrow (metalm.data.columns) equal what ``Dataset.to_dict()`` gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metalm.data.cache import cached_columns
from metalm.data.columns import RaggedColumn, arrow_columns

COLUMNS = {
    "input_ids": [[101, 7, 8, 102], [101, 102], [], [101, 5, 6, 7, 8, 9, 102]],
    "labels": [1, 0, 2, 1],
    "scores": [0.5, 1.25, -3.0, 4.0],
    "flags": [True, False, True, True],
    "tags": [[-100, 1, 2, -100], [-100, -100], [], [0, 1, 1, 1, 0, 2, -100]],
    "weights": [[0.5], [1.0, 2.0], [], [3.5]],
    "text": ["a", "b", "c", "d"],
    "nested": [[[1], [2, 3]], [], [[4]], [[5, 6]]],
}


def _saved(tmp_path: Path, columns: dict):
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"), max_shard_size="1MB")
    return datasets.load_from_disk(str(tmp_path / "ds"))


def test_arrow_columns_equal_to_dict_row_for_row(tmp_path: Path):
    dataset = _saved(tmp_path, COLUMNS)
    reference = dataset.to_dict()  # the independent reading: every row as Python objects
    got = arrow_columns(dataset.data.table)
    assert set(got) == set(reference)
    for name in ("input_ids", "tags", "weights"):
        assert isinstance(got[name], RaggedColumn), name
    for name, column in got.items():
        assert len(column) == len(reference[name])
        assert [column[i] for i in range(len(column))] == reference[name], name
        assert list(column) == reference[name], name
        for row, expected in zip(column, reference[name]):
            assert type(row) is type(expected)
            if isinstance(row, list) and row:
                assert type(row[0]) is type(expected[0]), name  # Python ints/floats, not NumPy scalars
    ids = got["input_ids"]
    assert ids[-1] == reference["input_ids"][-1] and ids[1:3] == reference["input_ids"][1:3]
    assert ids == reference["input_ids"] and reference["input_ids"] == ids  # both directions of ==
    assert ids != reference["input_ids"][:-1] and ids != [[1]] * 4
    assert list(ids.lengths()) == [4, 2, 0, 7]
    with pytest.raises(IndexError):
        ids[4]


def test_arrow_columns_over_many_record_batches(tmp_path: Path):
    """A column split into many Arrow chunks (datasets writes 1000-row record batches) reads in order."""
    import datasets

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 30000, rng.integers(0, 12)).tolist() for _ in range(2500)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": list(range(2500))})
    dataset.save_to_disk(str(tmp_path / "ds"))
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded.data.table.column("input_ids").num_chunks > 1
    got = arrow_columns(loaded.data.table)
    assert list(got["input_ids"]) == rows and got["labels"] == list(range(2500))


def test_cached_columns_read_back_as_built(tmp_path: Path):
    built = []

    def build():
        built.append(1)
        return {k: COLUMNS[k] for k in ("input_ids", "labels", "tags")}

    first = cached_columns({"k": 1}, build, tmp_path)
    again = cached_columns({"k": 1}, build, tmp_path)
    assert len(built) == 1 and isinstance(again["input_ids"], RaggedColumn)
    assert again == first and first == again
    assert again["tags"][3][:2] == [0, 1]


def test_collate_pads_arrow_backed_rows_exactly_as_lists():
    """``collate`` on RaggedColumns (NumPy padding, no Python lists) equals ``collate`` on lists."""
    import torch

    from metalm.data.batching import collate

    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 500, size=int(n)).tolist() for n in rng.integers(1, 30, size=200)]
    tags = [rng.integers(0, 5, size=len(r)).tolist() for r in rows]

    def ragged(lists):
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in lists])])
        return RaggedColumn(np.concatenate([np.asarray(r, dtype=np.int32) for r in lists]), offsets)

    column = ragged(rows)
    assert column[7] == rows[7] and column[-1] == rows[-1] and column._flat is None  # no bulk conversion
    for labels in (tags, rng.integers(0, 3, size=200).tolist()):  # per token, per sentence
        as_lists = {"input_ids": rows, "token_type_ids": [[0] * len(r) for r in rows], "labels": labels}
        as_arrow = {"input_ids": column, "token_type_ids": ragged(as_lists["token_type_ids"]),
                    "labels": ragged(labels) if isinstance(labels[0], list) else labels}
        for indices in ([3], [0, 5, 9, 199], list(rng.permutation(200)[:32])):
            a, b = collate(as_lists, indices, pad_id=0), collate(as_arrow, indices, pad_id=0)
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype == torch.long and torch.equal(a[key], b[key]), key
    longest = max(len(rows[i]) for i in (0, 5, 9))
    assert collate({"input_ids": column, "labels": tags}, [0, 5, 9], pad_id=0)["attention_mask"].sum(1).tolist() == \
        [len(rows[i]) for i in (0, 5, 9)] and longest > 0
