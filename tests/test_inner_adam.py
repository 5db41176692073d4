"""The differentiable inner Adam(W) (``inner_optimizer: adam``) against references: Reptile's
inner loop against ``torch.optim.AdamW`` stepping a copy of the module, second-order MAML
against central finite differences, FOMAML against the query gradient at the AdamW-adapted
weights, and the compact-vocabulary path against the dense one."""

from __future__ import annotations

import copy

import pytest
import torch

from metalm.learn.algorithms import Episode, build_algorithm
from metalm.learn.functional import adapt_with_losses, task_loss_fn, trainable_params
from metalm.learn.inner_optim import InnerAdam, build_inner_optimizer
from metalm.learn.maml import maml_grads
from metalm.learn.reptile import reptile_grads

VOCAB, B, T = 50, 4, 6


def tiny_model(seed: int = 0):
    from transformers import AutoModel, BertConfig

    from metalm.models.multitask import MultiTaskModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False))
    model.add_task("t", "classification", 2)
    model.add_task("u", "classification", 3)
    return model.double().eval()


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 2:] = 0  # padded positions: token 0, whose embedding row gets no gradient
    return {"input_ids": torch.randint(1, VOCAB, (B, T), generator=g) * mask, "attention_mask": mask,
            "labels": torch.randint(0, 2, (B,), generator=g)}


def episode(k: int, seed: int = 0) -> Episode:
    return Episode("t", tuple(batch(seed * 10 + i) for i in range(k)), batch(seed * 10 + 9))


def torch_adamw_adapt(model, ep: Episode, *, lr, weight_decay):
    """The reference: torch.optim.AdamW stepping a deep copy of the module on the support batches."""
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    for b in ep.support:
        opt.zero_grad(set_to_none=True)
        ref.loss("t", b).backward()
        opt.step()
    return ref


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_reptile_with_inner_adamw_matches_torch_adamw(weight_decay):
    model, ep = tiny_model(), episode(3)
    lr = 0.01
    grads, _ = reptile_grads(model, [ep], inner_lr=lr,
                             inner_optimizer=InnerAdam(lr=lr, weight_decay=weight_decay))
    ref = dict(torch_adamw_adapt(model, ep, lr=lr, weight_decay=weight_decay).named_parameters())
    theta = trainable_params(model)
    for name, g in grads.items():
        torch.testing.assert_close(g, theta[name].detach() - ref[name].detach(), rtol=1e-9, atol=1e-13, msg=name)
    # AdamW moves every parameter that got a gradient; head "u" got none and is left out
    assert not any(n.startswith("heads.u") for n in grads)
    assert {n for n in grads} == {n for n, p in ref.items() if not torch.equal(p, theta[n])}


def test_second_order_maml_through_adam_steps_matches_finite_differences():
    model, ep = tiny_model(), episode(2, seed=1)
    opt = build_inner_optimizer("adam", lr=0.05, second_order=True)
    grads, _ = maml_grads(model, [ep], inner_lr=0.05, first_order=False, inner_optimizer=opt)
    assert all(torch.isfinite(g).all() for g in grads.values())  # eps_root keeps the padding row finite
    theta = {n: p.detach() for n, p in trainable_params(model).items()}
    loss_fn = task_loss_fn(model, "t")

    def meta_objective(params) -> float:
        params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        adapted, _ = adapt_with_losses(loss_fn, params, ep.support, lr=0.05, first_order=True, optimizer=opt)
        return loss_fn(adapted, ep.query).item()

    gen = torch.Generator().manual_seed(3)
    eps = 1e-6
    errors = []
    for _ in range(3):
        v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in theta.items()}
        numeric = (meta_objective({n: theta[n] + eps * v[n] for n in theta})
                   - meta_objective({n: theta[n] - eps * v[n] for n in theta})) / (2 * eps)
        analytic = sum((grads[n] * v[n]).sum().item() for n in grads)
        errors.append(abs(numeric - analytic) / max(abs(numeric), abs(analytic)))
    assert max(errors) < 1e-4, errors

    first, _ = maml_grads(model, [ep], inner_lr=0.05, first_order=True, inner_optimizer=opt)
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in sorted(g)])  # noqa: E731
    assert (flat(grads) - flat(first)).norm() / flat(grads).norm() > 0.05  # Adam's Jacobian is not I


def test_fomaml_with_inner_adamw_is_the_query_gradient_at_the_adapted_weights():
    model, ep = tiny_model(), episode(2, seed=2)
    opt = InnerAdam(lr=0.02, weight_decay=0.01)
    grads, _ = maml_grads(model, [ep], inner_lr=0.02, first_order=True, inner_optimizer=opt)
    ref = torch_adamw_adapt(model, ep, lr=0.02, weight_decay=0.01)
    names = [n for n, _ in ref.named_parameters()]
    expected = torch.autograd.grad(ref.loss("t", ep.query), list(ref.parameters()), allow_unused=True)
    # first order: each of the k=2 inner steps contributes d(theta')/d(theta) = (1 - lr * wd) I (the decay)
    scale = (1 - 0.02 * 0.01) ** 2
    assert {n for n, g in zip(names, expected) if g is not None} == set(grads)
    for name, g in zip(names, expected):
        if g is not None:
            torch.testing.assert_close(grads[name], g * scale, rtol=1e-9, atol=1e-13, msg=name)


def test_compact_vocabulary_gives_the_same_meta_gradient_with_inner_adam():
    model, ep = tiny_model(), episode(3, seed=4)
    opt = build_inner_optimizer("adam", lr=0.05, second_order=True)
    compact, _ = maml_grads(model, [ep], inner_lr=0.05, first_order=False, inner_optimizer=opt)
    dense, _ = maml_grads(model, [ep], inner_lr=0.05, first_order=False, inner_optimizer=opt,
                          compact_vocabulary=False)
    assert compact.keys() == dense.keys()
    for name in dense:
        torch.testing.assert_close(compact[name], dense[name], rtol=1e-8, atol=1e-12, msg=name)


def test_inner_optimizer_settings_are_checked():
    with pytest.raises(ValueError, match="inner_optimizer: expected one of sgd, adam"):
        build_algorithm("reptile", inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="SGD inner loop only"):
        build_algorithm("maml", inner_optimizer="adam", recompute_inner_steps=True)
    with pytest.raises(ValueError, match="adam only"):
        build_algorithm("fomaml", inner_weight_decay=0.1)
    assert build_algorithm("fomaml", inner_optimizer="adam", inner_lr=0.1).inner_optimizer.lr == 0.1
