"""The MOMETAS meta-test (Wu et al. 2022, §3.4): each objective's validation loss measured as it is
trained (dropout on, seeded), on validation rows sampled afresh at every meta-test; and MLM with
all-[MASK] corruption as the paper uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metalm.data.tokenize import IGNORE_INDEX
from metalm.models.encoder import load_encoder
from metalm.models.multitask import MultiTaskModel
from metalm.objectives.masking import mask_tokens
from metalm.objectives.task import load_objective
from metalm.train.feedback import validation_losses, validation_rows

TEXT = """Barack Obama visited Paris in June. He met Emmanuel Macron at the Elysee Palace. They talked about the climate.
The Amazon river flows through Brazil and Peru. Its basin holds the largest rainforest on Earth. Many species live there.
Microsoft was founded by Bill Gates in Seattle. The company sells software worldwide. Its headquarters moved to Redmond.
The Eiffel Tower was finished in 1889. Gustave Eiffel's company built it for the World's Fair. Millions visit it each year."""


@pytest.fixture(scope="module")
def cse(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.cor"
    path.write_text(TEXT + "\n")
    torch.manual_seed(0)
    encoder, tok = load_encoder("tiny")
    task = load_objective("cse", tok, paths=[path], validation_fraction=0.0, max_length=32, min_chars=5)
    model = MultiTaskModel(encoder)
    model.add_task("cse", task.kind, task.spec.num_labels)
    model.train()
    return model, task


def test_cse_meta_test_runs_with_dropout_seeded_by_step(cse):
    model, task = cse
    tasks = {"cse": task}
    rows = validation_rows(task.size("train"), 8, seed=0, step=0, task_index=0)
    batch = task.batch("train", rows)
    model.eval()
    with torch.no_grad():
        eval_loss = float(model.loss("cse", batch))
    model.train()
    before = torch.get_rng_state()
    a = validation_losses(model, tasks, batch_size=8, seed=0, step=0)["cse"]
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG stream is untouched
    assert model.training
    assert validation_losses(model, tasks, batch_size=8, seed=0, step=0)["cse"] == a  # seeded: exact repeat
    other_seed = validation_losses(model, tasks, batch_size=8, seed=1, step=0)["cse"]
    assert other_seed != a  # another dropout seed (and rows) gives another loss
    # Same rows, two dropout seeds: only dropout differs; both views differ, so it is not the eval loss.
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        train_a = float(model.loss("cse", batch))
        torch.manual_seed(456)
        train_b = float(model.loss("cse", batch))
    assert train_a != train_b
    assert abs(a - eval_loss) > 1e-4 and abs(train_a - eval_loss) > 1e-4


def test_validation_rows_are_sampled_per_meta_test_and_reproducible():
    first = validation_rows(1000, 16, seed=3, step=20, task_index=1)
    second = validation_rows(1000, 16, seed=3, step=40, task_index=1)
    assert first != second  # a fresh V at each meta-test (Wu §3.4)
    assert first == validation_rows(1000, 16, seed=3, step=20, task_index=1)  # a resumed run draws the same
    assert first != validation_rows(1000, 16, seed=3, step=20, task_index=2)  # tasks draw independently
    assert len(set(first)) == 16 and all(0 <= i < 1000 for i in first)
    assert validation_rows(5, 16, seed=3, step=20, task_index=1) == [0, 1, 2, 3, 4]  # small split: all rows


def test_all_mask_corruption_masks_every_chosen_position(tokenizer, tmp_path: Path):
    ids = torch.randint(1000, 2000, (64, 40), generator=torch.Generator().manual_seed(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    corrupted, labels = mask_tokens(ids, maskable, mask_id=103, random_ids=torch.arange(1000, 2000),
                                    generator=torch.Generator().manual_seed(1), mask_prob=0.15,
                                    mask_fraction=1.0, random_fraction=0.0)
    chosen = labels != IGNORE_INDEX
    assert 0.1 < chosen.float().mean() < 0.2
    assert (corrupted[chosen] == 103).all() and torch.equal(corrupted[~chosen], ids[~chosen])
    # Through the objective option: every labelled position is [MASK]; BERT's 80/10/10 leaves some not.
    path = tmp_path / "docs.cor"
    path.write_text(TEXT + "\n")
    rows = list(range(12))
    for all_mask in (True, False):
        task = load_objective("mlm", tokenizer, paths=[path], validation_fraction=0.0, max_length=32, min_chars=5,
                              mask_prob=0.5, all_mask=all_mask)
        batch = task.batch("train", rows)
        picked = batch["input_ids"][batch["labels"] != IGNORE_INDEX]
        assert picked.numel() > 20
        assert (picked == tokenizer.mask_token_id).all() == all_mask
