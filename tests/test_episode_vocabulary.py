"""The compact episode vocabulary (``metalm.learn.functional.episode_vocabulary``) against the dense path.

The dense path is the reference (itself checked against finite differences in
tests/test_meta_algorithms.py): the same meta-gradient must come out, float64, for MAML, FOMAML
and recomputed inner steps, with padding tokens in the batches and a padding row that is not 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metalm.learn.algorithms import Episode
from metalm.learn.functional import episode_vocabulary, task_loss_fn, trainable_params
from metalm.learn.maml import maml_grads
from metalm.models.multitask import MultiTaskModel

VOCAB, B, T = 50, 3, 6


def model_with_pad(pad: int) -> MultiTaskModel:
    from transformers import AutoModel, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=pad, attn_implementation="eager")
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False))
    model.add_task("a", "classification", 2)
    model.add_task("r", "regression", 1)
    return model.double().eval()


def batch(seed: int, pad: int, *, regression: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 2:] = 0
    ids[mask == 0] = pad  # padded positions hold the padding id
    labels = torch.randn(B, generator=g, dtype=torch.float64) if regression else torch.randint(0, 2, (B,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("first_order,recompute", [(False, False), (True, False), (False, True)])
def test_compact_vocabulary_gives_the_dense_meta_gradient(pad, first_order, recompute):
    model = model_with_pad(pad)
    tasks = ("a", "r", "a")
    support = tuple(batch(i, pad, regression=t == "r") for i, t in enumerate(tasks))
    episodes = [Episode("a", support, batch(9, pad), support_tasks=tasks), Episode("a", support[:1], batch(8, pad))]
    kwargs = dict(inner_lr=0.4, first_order=first_order, recompute=recompute)
    dense, dense_stats = maml_grads(model, episodes, compact_vocabulary=False, **kwargs)
    compact, stats = maml_grads(model, episodes, compact_vocabulary=True, **kwargs)
    assert dense.keys() == compact.keys()
    for name in dense:
        torch.testing.assert_close(compact[name], dense[name], rtol=1e-10, atol=1e-12, msg=name)
    assert stats == pytest.approx(dense_stats, rel=1e-12)
    # the embedding gradient is non-zero exactly on rows the episodes use (except the padding row);
    # first order: on rows the queries use (the gradient at the adapted parameters)
    used = torch.unique(torch.cat([b["input_ids"].reshape(-1) for e in episodes
                                   for b in ((e.query,) if first_order else (*e.support, e.query))]))
    emb_name = "encoder.embeddings.word_embeddings.weight"
    nonzero = set(torch.nonzero(compact[emb_name].abs().sum(1)).reshape(-1).tolist())
    assert nonzero == set(used.tolist()) - {pad}


def test_compact_vocabulary_renumbers_ids_into_the_used_rows():
    pad = 3
    model = model_with_pad(pad)
    params = trainable_params(model)
    batches = [batch(1, pad), batch(2, pad)]
    new_params, new_batches = episode_vocabulary(model, params, batches, ["a"])
    emb = new_params["encoder.embeddings.word_embeddings.weight"]
    used = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
    assert emb.shape == (len(used), 8)
    for old, new in zip(batches, new_batches):
        # row new_ids of E_c is row old_ids of E; the padding row keeps index `pad`
        torch.testing.assert_close(emb[new["input_ids"]], params["encoder.embeddings.word_embeddings.weight"][old["input_ids"]])
        assert (new["input_ids"][old["input_ids"] == pad] == pad).all()
    loss = task_loss_fn(model, "a")
    torch.testing.assert_close(loss(new_params, new_batches[0]), loss(params, batches[0]))


def test_compact_vocabulary_stays_off_where_it_would_not_be_exact():
    model = model_with_pad(0)
    params = trainable_params(model)
    batches = [batch(1, 0)]
    model.kinds["m"] = "masked_lm"  # a kind that may read the embeddings (a tied vocabulary projection)
    assert episode_vocabulary(model, params, batches, ["a", "m"])[0] is params
    model.heads["tied"] = nn.Linear(8, VOCAB, bias=False)
    model.heads["tied"].weight = model.encoder.get_input_embeddings().weight
    assert episode_vocabulary(model, trainable_params(model), batches, ["a"])[0]["encoder.embeddings.word_embeddings.weight"] \
        is model.encoder.get_input_embeddings().weight
