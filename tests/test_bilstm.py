"""The ELMo-style biLSTM (Lv et al. §4.4) through the functional inner loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metalm.learn.functional import adapt
from metalm.models.bilstm import BiLSTMEncoder, bilm_loss, reverse_padded


def _batch(seed: int, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 6), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a shorter row: the backward LSTM must start at its last real token
    return {"input_ids": ids * mask, "attention_mask": mask}


def _model() -> BiLSTMEncoder:
    torch.manual_seed(0)
    return BiLSTMEncoder(vocab_size=11, direction_size=4, dropout=0.0).double()


def _bilm(model, params, batch):
    """ELMo's loss with ``params`` substituted through functional_call (an independent spelling of bilm_loss)."""
    hidden = torch.func.functional_call(model, params, (batch["input_ids"], batch["attention_mask"])).last_hidden_state
    forward, backward = hidden.chunk(2, dim=-1)
    weight = params["embeddings.weight"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    nxt = F.cross_entropy((forward[:, :-1] @ weight.T).flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    prv = F.cross_entropy((backward[:, 1:] @ weight.T).flatten(0, 1), labels[:, :-1].flatten(), ignore_index=-100)
    return (nxt + prv) / 2


def test_backward_direction_reads_each_row_right_to_left():
    model = _model()
    batch = _batch(0)
    hidden = model(**batch).last_hidden_state  # (B, T, 8)
    row = batch["input_ids"][1, :4].flip(0)[None]  # the short row, reversed, unpadded
    reference, _ = model.backward_lstm(model.embeddings(row))  # (1, 4, 4)
    assert torch.allclose(hidden[1, :4, 4:], reference[0].flip(0), atol=1e-10)
    assert torch.equal(reverse_padded(reverse_padded(hidden, torch.tensor([6, 4, 6])), torch.tensor([6, 4, 6])),
                       hidden)
    # The functional loss is the module's own ELMo loss.
    params = dict(model.named_parameters())
    assert torch.allclose(_bilm(model, params, batch), bilm_loss(model, **batch), atol=1e-12)


def test_second_order_maml_meta_gradient_through_lstm_matches_finite_differences():
    model = _model()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    support, query = [_batch(1), _batch(2)], _batch(3)

    def meta_loss(p):  # k = 2 second-order SGD inner steps, then the query loss (MAML)
        return _bilm(model, adapt(_bilm_fn(model), p, support, lr=0.5, first_order=False), query)

    grads = torch.autograd.grad(meta_loss(params), list(params.values()))
    g = torch.Generator().manual_seed(4)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    eps = 1e-6

    def shifted(sign):  # leaves that require grad: the inner steps differentiate the support loss
        return {n: (p.detach() + sign * eps * direction[n]).requires_grad_(True) for n, p in params.items()}
    numeric = (meta_loss(shifted(1)).detach() - meta_loss(shifted(-1)).detach()) / (2 * eps)
    analytic = sum((gr * direction[n]).sum() for gr, n in zip(grads, params))
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-8), (analytic, numeric)
    # First order drops the second-order term: a different value, so the test sees it.
    first = torch.autograd.grad(_bilm(model, adapt(_bilm_fn(model), params, support, lr=0.5, first_order=True),
                                      query), list(params.values()), allow_unused=True)
    analytic_first = sum((gr * direction[n]).sum() for gr, n in zip(first, params) if gr is not None)
    assert not torch.allclose(analytic_first, numeric, rtol=1e-4)


def _bilm_fn(model):
    return lambda params, batch: _bilm(model, params, batch)


def test_bilm_objective_through_the_model_is_the_elmo_loss_and_the_encoder_round_trips(tmp_path):
    from metalm.learn.functional import task_loss_fn, trainable_params
    from metalm.models.encoder import load_encoder
    from metalm.models.multitask import MultiTaskModel

    torch.manual_seed(0)
    encoder, tok = load_encoder("bilstm-tiny", dropout=0.0)
    model = MultiTaskModel(encoder)
    model.add_task("bilm", "bilm", len(tok))
    batch = _batch(5, vocab=len(tok) - 1)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = task_loss_fn(model, "bilm")(trainable_params(model), {**batch, "labels": labels})
    assert torch.allclose(loss, bilm_loss(encoder, **batch), atol=1e-6)
    model.save_pretrained(tmp_path / "m", tok)
    again, _ = load_encoder(str(tmp_path / "m" / "encoder"), dropout=0.0)
    assert torch.equal(again(**batch).last_hidden_state, encoder(**batch).last_hidden_state)
