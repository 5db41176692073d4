"""Lv et al. §4.1 / BERT: MLM and NSP losses summed on the same batch (objective ``mlm_nsp``)."""

from __future__ import annotations

import torch

from metalm.data.tokenize import IGNORE_INDEX
from metalm.learn.functional import task_loss_fn, trainable_params
from metalm.models.encoder import load_encoder
from metalm.models.multitask import MultiTaskModel
from metalm.objectives.task import load_objective
from metalm.tasks.kinds import mlm_token_labels

TEXT = "\n\n".join(
    " ".join(f"Sentence {d}.{s} tells of river {d * 7 + s} and the town beside it." for s in range(6))
    for d in range(4))


def test_summed_step_gradient_is_the_sum_of_single_objective_gradients(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text(TEXT + "\n")
    torch.manual_seed(0)
    encoder, tok = load_encoder("tiny")
    task = load_objective("mlm_nsp", tok, paths=[corpus], validation_fraction=0.0, max_length=32,
                          min_chars=5, cache_dir=tmp_path / "cache")
    model = MultiTaskModel(encoder)
    model.add_task("mlm_nsp", task.kind, task.spec.num_labels)
    model.add_task("mlm", "mlm", task.spec.num_labels)
    model.add_task("nsp", "pair_classification", 2)
    model.heads["mlm"].load_state_dict(model.heads["mlm_nsp"]["mlm"].state_dict())
    model.heads["nsp"].load_state_dict(model.heads["mlm_nsp"]["pair"].state_dict())
    model.eval()  # no dropout: the three passes see the same network
    batch = task.batch("train", list(range(min(6, task.size()))))  # one masking seed for all
    tokens, pairs = mlm_token_labels(batch["labels"]), batch["labels"][:, 0]
    assert (tokens != IGNORE_INDEX).any() and set(pairs.tolist()) <= {0, 1}
    assert (batch["input_ids"] == tok.mask_token_id).any()

    params = trainable_params(model)
    enc = [n for n in params if n.startswith("encoder.")]
    summed = torch.autograd.grad(task_loss_fn(model, "mlm_nsp")(params, batch), [params[n] for n in enc])
    mlm = torch.autograd.grad(task_loss_fn(model, "mlm")(params, {**batch, "labels": tokens}),
                              [params[n] for n in enc])
    nsp = torch.autograd.grad(task_loss_fn(model, "nsp")(params, {**batch, "labels": pairs}),
                              [params[n] for n in enc], allow_unused=True)
    for name, s, a, b in zip(enc, summed, mlm, nsp):
        reference = a + (torch.zeros_like(a) if b is None else b)
        assert torch.allclose(s, reference, atol=1e-6, rtol=1e-5), name
    assert any(b is not None and b.abs().sum() > 0 for b in nsp)  # NSP reaches the encoder
