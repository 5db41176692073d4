"""Pre-training objectives: corruptions and labels against independent checks, the heads, and a
tiny training run per objective whose loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metalm.data.tokenize import IGNORE_INDEX
from metalm.models.encoder import load_encoder
from metalm.models.multitask import MultiTaskModel
from metalm.objectives.detection import delete_tokens, insert_tokens
from metalm.objectives.entities import entity_token_ids
from metalm.objectives.heads import contrastive_logits
from metalm.objectives.masking import mask_entities, mask_tokens
from metalm.objectives.pairs import next_sentence_pairs, sentence_order_pairs
from metalm.objectives.task import HEAD_KINDS, Vocabulary, load_objective

TEXT = """Barack Obama visited Paris in June. He met Emmanuel Macron at the Elysee Palace. They talked about the climate.
The Amazon river flows through Brazil and Peru. Its basin holds the largest rainforest on Earth. Many species live there.
Microsoft was founded by Bill Gates in Seattle. The company sells software worldwide. Its headquarters moved to Redmond.
The Eiffel Tower was finished in 1889. Gustave Eiffel's company built it for the World's Fair. Millions visit it each year."""


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mlm_proportions_over_many_draws():
    ids = torch.randint(1000, 2000, (200, 100), generator=g(1))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False  # [CLS] and [SEP] stand-ins
    corrupted, labels = mask_tokens(ids, maskable, mask_id=103, random_ids=torch.arange(5000, 6000), generator=g(2))
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, [0, -1]].any()
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original tokens
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # nothing else changes
    rate = chosen.sum() / maskable.sum()
    masked = (corrupted[chosen] == 103).float().mean()
    randomised = ((corrupted[chosen] >= 5000) & (corrupted[chosen] < 6000)).float().mean()
    kept = (corrupted[chosen] == ids[chosen]).float().mean()
    n = int(chosen.sum())  # ~2,940 chosen: standard errors below 0.01
    assert abs(rate - 0.15) < 0.01 and n > 2500
    assert abs(masked - 0.8) < 0.03 and abs(randomised - 0.1) < 0.02 and abs(kept - 0.1) < 0.02


def test_whole_word_masking_masks_all_pieces_of_a_word():
    ids = torch.arange(60).repeat(300, 1)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, ::3] = True  # words of three pieces
    _, labels = mask_tokens(ids, torch.ones_like(starts), mask_id=1, random_ids=torch.arange(10), generator=g(),
                            word_starts=starts)
    chosen = (labels != IGNORE_INDEX).view(300, 20, 3)
    assert torch.equal(chosen.all(-1), chosen.any(-1))  # a word is all chosen or not at all
    assert abs(chosen[..., 0].float().mean() - 0.15) < 0.01


def test_entity_masking_masks_half_of_the_entities_whole():
    entity = torch.tensor([[0, 1, 1, 0, 2, 0, 3, 3, 3, 0]]).repeat(2000, 1)
    ids = torch.arange(10).repeat(2000, 1) + 500
    corrupted, labels = mask_entities(ids, entity, mask_id=103, generator=g())
    chosen = labels != IGNORE_INDEX
    assert not chosen[entity == 0].any()
    for k in (1, 2, 3):
        cols = chosen[:, entity[0] == k]
        assert torch.equal(cols.all(1), cols.any(1))
        assert abs(cols[:, 0].float().mean() - 0.5) < 0.04
    assert (corrupted[chosen] == 103).all() and torch.equal(labels[chosen], ids[chosen])
    # word pieces overlapping a character span belong to it
    assert entity_token_ids([(0, 6), (7, 12), (13, 19), (20, 24)], [(0, 12), (20, 24)]) == [1, 1, 0, 2]


def test_atd_labels_mark_exactly_the_inserted_tokens():
    original = list(range(1000, 1400))
    ids, labels = insert_tokens(original, random_ids=torch.arange(5, 10), generator=g())
    assert [t for t, y in zip(ids, labels) if y == 0] == original
    assert all(5 <= t < 10 for t, y in zip(ids, labels) if y == 1)
    assert abs(sum(labels) / len(original) - 0.15) < 0.05


def test_dtd_labels_point_at_the_gaps():
    original = list(range(400))  # distinct increasing ids: a gap shows as a jump
    kept, gaps = delete_tokens(original, generator=g(3))
    assert len(gaps) == len(kept) + 1
    expected = [int(cur - prev > 1) for prev, cur in zip([-1] + kept, kept)] + [int(kept[-1] != 399)]
    assert gaps == expected
    assert abs(1 - len(kept) / 400 - 0.15) < 0.05
    kept, gaps = delete_tokens([7], generator=g(), delete_prob=1.0)
    assert kept == [7] and gaps == [0, 0]  # never deletes everything


def test_nsp_and_sop_labels():
    firsts, nexts = list(range(0, 4000, 2)), list(range(1, 4000, 2))
    seconds, labels = next_sentence_pairs(firsts, nexts, num_sentences=4000, generator=g())
    assert all((s == n) == bool(y) for s, n, y in zip(seconds, nexts, labels))
    assert abs(sum(labels) / len(labels) - 0.5) < 0.04
    pairs, labels = sentence_order_pairs(firsts, nexts, generator=g())
    assert all((a < b) == bool(y) for (a, b), y in zip(pairs, labels))
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in zip(firsts, nexts)}


def test_cse_positives_are_on_the_diagonal():
    torch.manual_seed(0)
    z = torch.randn(6, 8)
    logits = contrastive_logits(z, z + 0.01 * torch.randn(6, 8), temperature=0.05)
    assert torch.equal(logits.argmax(1), torch.arange(6))
    reference = F.cosine_similarity(z[:, None], z[None] + 0.0, dim=-1) / 0.05  # an independent formula
    assert torch.allclose(contrastive_logits(z, z), reference, atol=1e-4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.cor"
    path.write_text(TEXT + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return load_encoder("tiny")


def test_mlm_head_is_tied_and_projects_only_masked_positions(corpus, tiny_model, tmp_path):
    encoder, tok = tiny_model
    task = load_objective("mlm", tok, paths=[corpus], validation_fraction=0.0, max_length=32, min_chars=5)
    model = MultiTaskModel(encoder)
    model.add_task("mlm", task.kind, task.spec.num_labels)
    model.eval()
    batch = task.batch("train", [0, 1, 2])
    logits = model("mlm", batch)  # (N, V)
    chosen = batch["labels"] != IGNORE_INDEX
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).last_hidden_state
    head = model.heads["mlm"]
    full = head.transform(hidden) @ encoder.get_input_embeddings().weight.T + head.bias  # (B, T, V)
    assert torch.allclose(logits, full[chosen], atol=1e-5)
    model.loss("mlm", batch).backward()
    assert encoder.get_input_embeddings().weight.grad.abs().sum() > 0  # the decoder is the embeddings


@pytest.mark.parametrize("objective", sorted(HEAD_KINDS))
def test_objective_batches_and_a_tiny_run_lowers_its_loss(objective, corpus, tiny_model, tmp_path):
    encoder, tok = tiny_model
    task = load_objective(objective, tok, paths=[corpus], validation_fraction=0.0, max_length=32, min_chars=5,
                          cache_dir=tmp_path / "cache")
    batch = task.batch("train", list(range(min(6, task.size()))))
    assert torch.equal(task.batch("train", list(range(min(6, task.size()))))["input_ids"], batch["input_ids"])
    ids = batch["input_ids"]
    assert (ids[:, 0] == tok.cls_token_id).all()
    if objective == "emlm":  # spaCy found entities, and only entity pieces are masked
        assert (batch["labels"] != IGNORE_INDEX).any()
        assert (ids[batch["labels"] != IGNORE_INDEX] == tok.mask_token_id).all()
    torch.manual_seed(0)
    model = MultiTaskModel(load_encoder("bilstm-tiny" if objective == "bilm" else "tiny")[0])
    model.add_task(objective, task.kind, task.spec.num_labels)
    # A random encoder starts with near-identical [CLS] vectors (loss ≈ log B); CSE needs a larger step to leave it.
    # The 16-wide biLSTM starts at log V ≈ 10 and needs a larger step too.
    optimizer = torch.optim.AdamW(model.parameters(), lr={"cse": 1e-2, "bilm": 5e-2}.get(objective, 3e-3))
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = model.loss(objective, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_vocabulary_excludes_special_tokens(tokenizer):
    vocab = Vocabulary.of(tokenizer)
    assert not set(vocab.random_ids.tolist()) & set(tokenizer.all_special_ids)
    assert vocab.continuation[tokenizer.convert_tokens_to_ids("##ing")]
    assert not vocab.continuation[tokenizer.convert_tokens_to_ids("the")]
