"""Length-grouped batch streams (BatchStream with lengths, metalm.data.length_grouping) and the row
lengths tasks report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metalm.data.batching import BatchStream


def grouped(lengths, batch: int, *, seed: int, pool: int | None = None) -> BatchStream:
    return BatchStream(len(lengths), batch, seed=seed, lengths=lengths, pool=pool)


def _epoch(stream, rows: int, batch: int) -> list[list[int]]:
    return [stream.next_indices() for _ in range(-(-rows // batch))]


@pytest.mark.parametrize("rows,batch,pool", [(103, 8, 3), (96, 8, 4), (5, 8, 2)])
def test_every_row_once_per_epoch_in_batches_of_one_sorted_pool(rows, batch, pool):
    lengths = np.random.default_rng(1).integers(3, 120, rows)
    stream = grouped(lengths, batch, seed=7, pool=pool)
    for epoch in range(2):
        batches = _epoch(stream, rows, batch)
        assert sorted(i for b in batches for i in b) == list(range(rows))  # each row once
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch
        # Reference: the epoch's plain permutation, cut into pools of pool * batch rows.
        base = np.random.default_rng([7, epoch]).permutation(rows)
        pool_of = {int(r): p // (pool * batch) for p, r in enumerate(base)}
        by_pool: dict[int, list[list[int]]] = {}
        for b in batches:
            assert len({pool_of[i] for i in b}) == 1, "a batch mixes pools"
            by_pool.setdefault(pool_of[b[0]], []).append(b)
        for members in by_pool.values():  # the batches of a pool cut its rows sorted by length
            members.sort(key=lambda b: lengths[b].min())
            for lo, hi in zip(members, members[1:]):
                assert lengths[lo].max() <= lengths[hi].min()


def test_less_padding_than_random_batches_and_resumes_exactly():
    lengths = np.random.default_rng(0).lognormal(3.5, 0.6, 2000).astype(int) + 3

    def fill(stream):  # real tokens / padded tokens over one epoch
        batches = _epoch(stream, 2000, 16)
        return sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    assert fill(grouped(lengths, 16, seed=0)) > 0.9 > 0.7 > fill(BatchStream(2000, 16, seed=0))
    stream = grouped(lengths, 16, seed=3)
    for _ in range(130):  # into the second epoch
        stream.next_indices()
    restored = grouped(lengths, 16, seed=3)
    restored.load_state_dict(stream.state_dict())
    assert [restored.next_indices() for _ in range(20)] == [stream.next_indices() for _ in range(20)]


@pytest.mark.parametrize("objective", ["mlm", "cse", "sop"])
def test_objective_lengths_are_the_batched_tokens(objective, tokenizer, tmp_path: Path):
    """ObjectiveTask.lengths(split)[i] equals the non-padding tokens of row i's own batch."""
    from metalm.objectives.task import load_objective

    text = ("The committee met in March. It approved the budget for the coming year without debate. "
            "Members asked about roads. A long report on the state of the national railways followed, "
            "with tables of freight, passengers and costs for every region of the country.")
    corpus = tmp_path / "docs.cor"
    corpus.write_text("\n".join([text, text.upper(), "Short one here. And another short sentence."]) + "\n")
    task = load_objective(objective, tokenizer, paths=[corpus], validation_fraction=0.0, max_length=24,
                          min_chars=5)
    lengths = task.lengths("train")
    assert len(lengths) == task.size("train") and lengths.max() == 24  # the long sentence is cut
    batched = [int(task.batch("train", [i])["attention_mask"].sum()) for i in range(task.size("train"))]
    assert lengths.tolist() == batched


def test_task_lengths_and_train_loop_streams(data_root, tokenizer, cache_dir):
    from metalm.tasks.registry import get_task_spec
    from metalm.tasks.task import load_task
    from metalm.train.loop import make_streams

    task = load_task(get_task_spec("rte"), tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"])
    again = load_task(get_task_spec("rte"), tokenizer, root=data_root, cache_dir=cache_dir, splits=["dev"])
    expected = [len(ids) for ids in task.splits["dev"]["input_ids"]]  # built lists, then cached Arrow
    assert task.lengths("dev").tolist() == expected == again.lengths("dev").tolist()
    streams = make_streams({"mlm_like": _Sized(10), "rte": _TrainAlias(again)}, batch_size=4, seed=0,
                           group_by_length=True)
    assert streams["mlm_like"].lengths is None  # lengths() gives None: plain batches
    assert streams["rte"].lengths.tolist() == expected


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def size(self, split: str = "train") -> int:
        return self.n

    def lengths(self, split: str = "train"):
        return None  # a task that does not know its row lengths


class _TrainAlias:
    """A task whose dev split stands in for train (the test loads only dev)."""

    def __init__(self, task):
        self.task = task

    def size(self, split: str = "train") -> int:
        return self.task.size("dev")

    def lengths(self, split: str = "train"):
        return self.task.lengths("dev")
