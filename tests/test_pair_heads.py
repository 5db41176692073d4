"""Bi-encoder pair heads and the MLP head (Xue §4.1) against independent computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metalm.config import ConfigError
from metalm.learn.algorithms import Episode
from metalm.learn.functional import adapt, task_loss_fn, trainable_params
from metalm.learn.maml import maml_grads
from metalm.models.multitask import MultiTaskModel, load_heads
from metalm.tasks.spec import TaskSpec

VOCAB, B, T = 100, 4, 6


def bi_model(seed: int = 0) -> MultiTaskModel:
    from transformers import AutoModel, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False), pooling="mean")
    model.add_task("sts", "regression", 1, pair="bi", cosine_scale=5.0)
    model.add_task("para", "pair_classification", 2, pair="bi", head="mlp")
    model.add_task("sst", "classification", 5, head="mlp")
    return model.double().eval()


def pair_batch(seed: int, *, labels: str = "regression") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask, mask_b = torch.ones(B, T, dtype=torch.long), torch.ones(B, T - 1, dtype=torch.long)
    mask[0, T - 2:] = 0
    mask_b[1, T - 3:] = 0
    label = torch.rand(B, generator=g, dtype=torch.float64) * 5 if labels == "regression" \
        else torch.randint(0, 2, (B,), generator=g)
    return {"input_ids": torch.randint(1, VOCAB, (B, T), generator=g) * mask, "attention_mask": mask,
            "input_ids_b": torch.randint(1, VOCAB, (B, T - 1), generator=g) * mask_b, "attention_mask_b": mask_b,
            "labels": label}


def mean_pool_by_hand(model, ids, mask):
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    return torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(ids))])  # (B, H)


def test_bi_encoder_regression_is_5_relu_cos_of_separately_pooled_texts():
    model, batch = bi_model(), pair_batch(1)
    out = model("sts", batch)
    assert out.shape == (B,)
    proj = model.heads["sts"].proj
    u = mean_pool_by_hand(model, batch["input_ids"], batch["attention_mask"])
    v = mean_pool_by_hand(model, batch["input_ids_b"], batch["attention_mask_b"])
    expected = 5.0 * torch.relu(F.cosine_similarity(proj(u), proj(v), dim=-1))
    torch.testing.assert_close(out, expected)
    assert (out > 0).all()  # so the relu is not hiding the comparison


def test_bi_encoder_classification_reads_u_v_through_a_gelu_mlp_and_gradients_flow():
    model, batch = bi_model(), pair_batch(2, labels="classification")
    logits = model("para", batch)
    assert logits.shape == (B, 2)
    body = model.heads["para"].body
    assert [type(m) for m in body] == [torch.nn.Dropout, torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert body[1].in_features == 16  # [u, v]
    u = mean_pool_by_hand(model, batch["input_ids"], batch["attention_mask"])
    v = mean_pool_by_hand(model, batch["input_ids_b"], batch["attention_mask_b"])
    torch.testing.assert_close(logits, body(torch.cat([u, v], -1)))
    model.loss("para", batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("heads.para") for n in grads) and any(n.startswith("encoder.") for n in grads)
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith("heads.para"))
    sst = model("sst", {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert sst.shape == (B, 5)


def test_maml_meta_gradient_with_a_bi_encoder_head_matches_finite_differences():
    model = bi_model()
    episode = Episode(task="sts", support=(pair_batch(3), pair_batch(4)), query=pair_batch(5))
    grads, _ = maml_grads(model, [episode], inner_lr=0.1, first_order=False)
    theta = {n: p.detach() for n, p in trainable_params(model).items()}
    loss_fn = task_loss_fn(model, "sts")

    def meta_objective(params):
        params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        return loss_fn(adapt(loss_fn, params, episode.support, lr=0.1, first_order=True), episode.query).item()

    g = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in theta.items()}
    eps = 1e-6  # the error of a central difference falls as eps²: 9e-5 relative at 1e-5, 9e-7 here
    plus = meta_objective({n: p + eps * direction[n] for n, p in theta.items()})
    minus = meta_objective({n: p - eps * direction[n] for n, p in theta.items()})
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float((grads[n] * direction[n]).sum()) for n in grads)
    assert analytic == pytest.approx(numeric, rel=1e-5)
    assert any(n.startswith("heads.sts") for n in grads) and any(n.startswith("encoder.") for n in grads)


def test_head_options_survive_save_and_load(tmp_path):
    model, batch = bi_model(), pair_batch(6)
    model.save_pretrained(tmp_path)
    fresh = bi_model(seed=1)
    for name in list(fresh.heads):
        fresh.remove_task(name)
    load_heads(fresh, tmp_path)
    fresh.encoder.load_state_dict(model.encoder.state_dict())
    assert fresh.head_options == model.head_options
    torch.testing.assert_close(fresh.double()("sts", batch), model("sts", batch))


def test_bi_encoded_task_tokenises_each_text_alone(tmp_path):
    from metalm.builders import build_model, build_tasks
    from metalm.schema import DataConfig, EncoderConfig
    from metalm.tasks.registry import get_task_spec
    from metalm.tasks.spec import read_split

    simlex = get_task_spec("simlex")
    spec = TaskSpec(**{**{f: getattr(simlex, f) for f in simlex.__dataclass_fields__}, "pair_encoding": "bi"})
    _, tokenizer = build_model(EncoderConfig(name="tiny", max_length=32), seed=0)
    task = build_tasks([spec], tokenizer, data=DataConfig(cache_dir=str(tmp_path)), max_length=32)["simlex"]
    batch = task.batch("train", [0, 1])
    record = read_split(spec, "train", root=DataConfig().root, glue=None, source="files")[1]
    ids_b = tokenizer(record["text_b"])["input_ids"]
    assert batch["input_ids_b"][1, :len(ids_b)].tolist() == ids_b
    assert batch["input_ids"][1, :len(tokenizer(record["text_a"])["input_ids"])].tolist() == \
        tokenizer(record["text_a"])["input_ids"]
    assert "input_ids_b" not in build_tasks([simlex], tokenizer, data=DataConfig(cache_dir=str(tmp_path)),
                                            max_length=32)["simlex"].batch("train", [0])


def test_bad_head_options_are_config_errors():
    with pytest.raises(ConfigError, match="pair_encoding bi"):
        TaskSpec(name="x", kind="classification", columns={"text_a": 0, "label": 1}, labels=("a", "b"),
                 pair_encoding="bi")
    with pytest.raises(ConfigError, match="cosine_scale"):
        TaskSpec(name="x", kind="regression", columns={"text_a": 0, "text_b": 1, "label": 2}, pair_encoding="bi",
                 cosine_scale=0.0)
