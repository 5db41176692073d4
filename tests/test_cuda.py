"""CUDA paths: second-order MAML on the GPU against finite differences and against the CPU, the
switch away from fused SDPA kernels (no double backward), bfloat16 autocast, and a fine-tune
through the recipes with ``device: auto``. CI has no GPU: these run where one is present
(the session notes say when they last ran on one)."""

from __future__ import annotations

import math

import pytest
import torch

from metalm.learn.algorithms import Episode
from metalm.learn.functional import adapt, task_loss_fn, trainable_params
from metalm.learn.maml import maml_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB, B, T = 100, 4, 6


def tiny(device, dtype=torch.float64, attn="sdpa"):
    from transformers import AutoModel, BertConfig

    from metalm.models.multitask import MultiTaskModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False, attn_implementation=attn))
    model.add_task("t", "classification", 2)
    return model.to(device=device, dtype=dtype).eval()


def episode(device, k=2):
    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T - 2:] = 0
        out = {"input_ids": torch.randint(1, VOCAB, (B, T), generator=g) * mask, "attention_mask": mask,
               "labels": torch.randint(0, 2, (B,), generator=g)}
        return {k: v.to(device) for k, v in out.items()}
    return Episode("t", tuple(batch(i) for i in range(k)), batch(9))


def test_second_order_maml_on_cuda_matches_finite_differences_and_the_cpu():
    model = tiny("cuda")  # SDPA: MAML must switch it to eager for the double backward
    ep = episode("cuda")
    alpha, eps = 0.5, 1e-6
    grads, _ = maml_grads(model, [ep], inner_lr=alpha, first_order=False)
    assert model.encoder.config._attn_implementation == "eager"
    assert all(g.is_cuda for g in grads.values())

    theta = {n: p.detach() for n, p in trainable_params(model).items()}
    loss_fn = task_loss_fn(model, "t")

    def meta_objective(params) -> float:
        params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        return loss_fn(adapt(loss_fn, params, ep.support, lr=alpha, first_order=True), ep.query).item()

    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype).cuda() for n, p in theta.items()}
        numeric = (meta_objective({n: theta[n] + eps * v[n] for n in theta})
                   - meta_objective({n: theta[n] - eps * v[n] for n in theta})) / (2 * eps)
        analytic = sum((grads[n] * v[n]).sum().item() for n in grads)
        assert abs(numeric - analytic) / max(abs(numeric), abs(analytic)) < 1e-4

    cpu_model = tiny("cpu")
    cpu, _ = maml_grads(cpu_model, [episode("cpu")], inner_lr=alpha, first_order=False)
    for name in cpu:
        torch.testing.assert_close(grads[name].cpu(), cpu[name], rtol=1e-7, atol=1e-10, msg=name)


def test_bf16_meta_gradients_on_cuda_match_fp32():
    from test_precision import check_meta_gradients

    check_meta_gradients("cuda")


def test_bf16_second_order_with_sdpa_model_in_float32():
    """A float32 SDPA model under bf16 autocast: the fused kernels would be picked without the
    switch; the meta-gradient must come out finite and close to the float32 one."""
    model = tiny("cuda", dtype=torch.float32)
    ep = episode("cuda", k=3)
    fp32, _ = maml_grads(model, [ep], inner_lr=0.1, first_order=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16, _ = maml_grads(model, [ep], inner_lr=0.1, first_order=False)
    a = torch.cat([bf16[n].reshape(-1) for n in sorted(bf16)])
    b = torch.cat([fp32[n].reshape(-1) for n in sorted(fp32)])
    assert torch.isfinite(a).all()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.98


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_on_cuda_through_the_recipe(tmp_path, data_root, precision):
    from metalm.config import load
    from metalm.recipes import run_finetune
    from metalm.schema import FinetuneConfig

    cfg = load(FinetuneConfig, None, [
        "task=rte", "encoder.name=tiny", "encoder.max_length=64", "encoder.pair_max_length=64",
        "fraction=0.1", "finetune.epochs=2",
        f"data.root={data_root}", f"output_dir={tmp_path}/ft", f"precision={precision}"])  # device: auto
    result = run_finetune(cfg, progress=False, tensorboard=False)
    assert all(math.isfinite(v) for v in result.scores["dev"].values())
