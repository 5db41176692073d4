"""MAML, FOMAML and Reptile against reference computations.

MAML's meta-gradient is checked against central finite differences of the meta-objective
F(θ) = L_query(adapt(θ, support)) in float64; FOMAML and Reptile against inner loops done by
hand on a plain copy of the module with ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from metalm.learn.algorithms import ALGORITHMS, Episode, build_algorithm
from metalm.learn.functional import adapt, task_loss_fn, trainable_params
from metalm.learn.maml import MAML, maml_grads
from metalm.learn.reptile import Reptile
from metalm.models.multitask import MultiTaskModel

VOCAB, B, T = 100, 4, 6


def tiny_model(*, dtype=torch.float64, attn: str | None = None, seed: int = 0, dropout: float = 0.0) -> MultiTaskModel:
    """A 1-layer BERT (hidden 8) with two classification heads, in eval mode (the encoder's hidden
    dropout is ``dropout``, none by default; the heads keep theirs, which eval mode turns off)."""
    from transformers import AutoModel, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    extra = {} if attn is None else {"attn_implementation": attn}
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False, **extra))
    model.add_task("t", "classification", 2)
    model.add_task("u", "classification", 3)
    return model.to(dtype).eval()


def make_batch(seed: int, *, num_labels: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 2:] = 0  # one padded row, so the attention mask matters
    return {"input_ids": torch.randint(1, VOCAB, (B, T), generator=g) * mask,
            "attention_mask": mask,
            "token_type_ids": torch.zeros(B, T, dtype=torch.long),
            "labels": torch.randint(0, num_labels, (B,), generator=g)}


def make_episode(seed: int, k: int, task: str = "t") -> Episode:
    n = 2 if task == "t" else 3
    return Episode(task=task, support=tuple(make_batch(seed * 10 + i, num_labels=n) for i in range(k)),
                   query=make_batch(seed * 10 + 9, num_labels=n))


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hand_adapt(model: MultiTaskModel, episode: Episode, lr: float) -> MultiTaskModel:
    """θ_j = θ_{j-1} − α ∇L(θ_{j-1}; b_j) on a plain copy of the module (the reference)."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    for batch in episode.support:
        grads = torch.autograd.grad(ref.loss(episode.task, batch), params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= lr * g
    return ref


def flat(grads: dict[str, torch.Tensor], model) -> torch.Tensor:
    return torch.cat([grads.get(n, torch.zeros_like(p)).reshape(-1) for n, p in model.named_parameters()])


# (a) second-order MAML against finite differences --------------------------------------------------

@pytest.mark.parametrize("k", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(k):
    model = tiny_model()  # default attention (sdpa): MAML must make it double-differentiable
    episode = make_episode(1, k)
    alpha, eps = 0.5, 1e-6
    grads, _ = maml_grads(model, [episode], inner_lr=alpha, first_order=False)

    theta = {n: p.detach() for n, p in trainable_params(model).items()}
    loss_fn = task_loss_fn(model, "t")

    def meta_objective(params) -> float:
        params = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        return loss_fn(adapt(loss_fn, params, episode.support, lr=alpha, first_order=True), episode.query).item()

    gen = torch.Generator().manual_seed(k)
    errors = []
    for _ in range(3):
        v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in theta.items()}
        plus = meta_objective({n: theta[n] + eps * v[n] for n in theta})
        minus = meta_objective({n: theta[n] - eps * v[n] for n in theta})
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((grads[n] * v[n]).sum().item() for n in grads)
        errors.append(abs(numeric - analytic) / max(abs(numeric), abs(analytic)))
    assert max(errors) < 1e-4, errors


def test_second_order_switches_sdpa_to_eager(caplog):
    model = tiny_model(attn="sdpa")
    with caplog.at_level(logging.INFO, logger="metalm.learn.maml"):
        MAML(inner_lr=0.1, inner_steps=1).step(model, [make_episode(1, 1)])
    assert model.encoder.config._attn_implementation == "eager"
    assert "eager" in caplog.text

    first_order = tiny_model(attn="sdpa")  # FOMAML needs no double backward: left alone
    MAML(inner_lr=0.1, inner_steps=1, first_order=True).step(first_order, [make_episode(1, 1)])
    assert first_order.encoder.config._attn_implementation == "sdpa"


# (b) FOMAML ----------------------------------------------------------------------------------------

def test_fomaml_is_query_gradient_at_adapted_params_and_differs_from_maml():
    model = tiny_model()
    episode, alpha = make_episode(2, 2), 0.5
    first, _ = maml_grads(model, [episode], inner_lr=alpha, first_order=True)
    second, _ = maml_grads(model, [episode], inner_lr=alpha, first_order=False)

    ref = hand_adapt(model, episode, alpha)
    names = [n for n, _ in ref.named_parameters()]
    expected = torch.autograd.grad(ref.loss("t", episode.query), list(ref.parameters()), allow_unused=True)
    expected = {n: g for n, g in zip(names, expected) if g is not None}
    assert first.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(first[name], expected[name], rtol=0, atol=1e-12)

    gap = (flat(second, model) - flat(first, model)).norm() / flat(second, model).norm()
    assert gap > 0.05, f"second-order MAML is within {gap:.2e} of FOMAML: second derivatives missing?"


# (c) Reptile against a hand-computed update --------------------------------------------------------

def test_reptile_writes_theta_minus_adapted_and_sgd_gives_the_paper_update():
    model = tiny_model()
    alpha, beta = 0.3, 0.7
    episodes = [make_episode(3, 2), make_episode(4, 2)]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = [dict(hand_adapt(model, e, alpha).named_parameters()) for e in episodes]

    Reptile(inner_lr=alpha, inner_steps=2).step(model, episodes[:1])
    single = grads_of(model)
    assert single.keys() == {n for n in theta if not n.startswith("heads.u.")}  # unused head: no grad
    for name, grad in single.items():
        torch.testing.assert_close(grad, theta[name] - adapted[0][name].detach(), rtol=0, atol=1e-10)

    model.zero_grad(set_to_none=True)
    Reptile(inner_lr=alpha, inner_steps=2).step(model, episodes)
    mean_delta = {n: (adapted[0][n] + adapted[1][n]).detach() / 2 - theta[n] for n in single}
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(grad, -mean_delta[name], rtol=0, atol=1e-10)

    torch.optim.SGD(model.parameters(), lr=beta).step()
    for name, p in model.named_parameters():
        expected = theta[name] + beta * mean_delta[name] if name in mean_delta else theta[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-10)


def test_outer_sgd_from_config_is_the_paper_update_with_no_weight_decay_by_default():
    """Reptile's meta-step through the loop's builder: SGD's default adds no decay to θ + β·mean(θ_i − θ)."""
    from metalm.builders import build_optimization
    from metalm.schema import OptimConfig

    model = tiny_model()
    beta = 0.7
    episodes = [make_episode(3, 2), make_episode(4, 2)]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = [dict(hand_adapt(model, e, 0.3).named_parameters()) for e in episodes]
    optimizer, _ = build_optimization(model, OptimConfig(name="sgd", lr=beta, warmup_ratio=0.0, clip_norm=0.0),
                                      steps=10)
    Reptile(inner_lr=0.3, inner_steps=2).step(model, episodes)
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith("heads.u."):
            continue
        mean_delta = (adapted[0][name] + adapted[1][name]).detach() / 2 - theta[name]
        torch.testing.assert_close(p.detach(), theta[name] + beta * mean_delta, rtol=0, atol=1e-10)

    adamw, _ = build_optimization(model, OptimConfig(), steps=10)
    assert max(group["weight_decay"] for group in adamw.param_groups) == 0.01  # AdamW keeps its default


def test_outer_sgd_with_weight_decay_at_a_meta_learning_rate_warns_how_much_it_shrinks(caplog):
    from metalm.builders import build_optimization
    from metalm.schema import OptimConfig

    steps = 40
    kept = math.prod(1 - 1.0 * (steps - t) / steps * 0.01 for t in range(steps))  # linear decay from lr 1
    assert 0.80 < kept < 0.83
    with caplog.at_level(logging.WARNING, logger="metalm.builders"):
        build_optimization(tiny_model(), OptimConfig(name="sgd", lr=1.0, weight_decay=0.01, warmup_ratio=0.0),
                           steps=steps)
    assert f"by {kept:.3f} over {steps} steps" in caplog.text and "weight_decay: 0" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metalm.builders"):
        build_optimization(tiny_model(), OptimConfig(name="sgd", lr=1.0, warmup_ratio=0.0), steps=steps)
        build_optimization(tiny_model(), OptimConfig(lr=1e-4, weight_decay=0.01), steps=steps)
    assert caplog.text == ""


# (d) the meta-batch ----------------------------------------------------------------------------------

@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_batch_is_mean_over_episodes(first_order):
    model = tiny_model()
    episodes = [make_episode(5, 2, "t"), make_episode(6, 2, "u")]  # two tasks: heads only get their own
    algorithm = MAML(inner_lr=0.2, inner_steps=2, first_order=first_order)
    singles = []
    for episode in episodes:
        model.zero_grad(set_to_none=True)
        algorithm.step(model, [episode])
        singles.append(grads_of(model))
    model.zero_grad(set_to_none=True)
    stats = algorithm.step(model, episodes)
    both = grads_of(model)
    assert both.keys() == singles[0].keys() | singles[1].keys()
    for name, grad in both.items():
        expected = sum(s[name] for s in singles if name in s) / 2
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert set(stats) == {"loss", "support_loss"}


# (e) purity: the model is read, never written or copied --------------------------------------------

@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
def test_step_writes_only_grads_and_never_deep_copies(name, monkeypatch):
    model = tiny_model(attn="eager")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    existing = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = existing[n].clone()

    def no_copies(*args, **kwargs):
        raise AssertionError("the algorithm deep-copied something")

    monkeypatch.setattr(copy, "deepcopy", no_copies)
    algorithm = build_algorithm(name, inner_lr=0.1, inner_steps=2)
    algorithm.step(model, [make_episode(7, 2)])
    monkeypatch.undo()

    for n, value in model.state_dict().items():
        assert torch.equal(value, before[n]), n
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.grad, existing[n])]
    assert changed and not any(n.startswith("heads.u.") for n in changed)  # accumulated, untouched head kept


# (f) every registered algorithm -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_steps_a_tiny_model(name):
    model = tiny_model(dtype=torch.float32).train()  # float32, default attention, dropout on: as in training
    algorithm = build_algorithm(name)
    episodes = [make_episode(8, algorithm.support_batches), make_episode(9, algorithm.support_batches, "u")]
    stats = algorithm.step(model, episodes)
    assert stats and all(math.isfinite(v) for v in stats.values()), stats
    grads = grads_of(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


# the functional core and the registry ---------------------------------------------------------------

def test_adapt_passes_unused_params_through_and_leaves_inputs_alone():
    model = tiny_model()
    params = trainable_params(model)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    episode = make_episode(10, 3)
    adapted = adapt(task_loss_fn(model, "t"), params, episode.support, lr=0.1, first_order=False)
    assert adapted["heads.u.1.weight"] is params["heads.u.1.weight"]
    assert not torch.equal(adapted["heads.t.1.weight"], params["heads.t.1.weight"])
    assert all(torch.equal(p, snapshot[n]) for n, p in params.items())
    cycled = adapt(task_loss_fn(model, "t"), params, episode.support[:1], lr=0.1, first_order=True, steps=2)
    twice = adapt(task_loss_fn(model, "t"), params, episode.support[:1] * 2, lr=0.1, first_order=True)
    torch.testing.assert_close(cycled["heads.t.1.weight"], twice["heads.t.1.weight"], rtol=0, atol=0)


def test_build_algorithm_settings():
    assert build_algorithm("fomaml").first_order and not build_algorithm("maml").first_order
    assert build_algorithm("reptile", inner_steps=3).support_batches == 3
    assert build_algorithm("multitask").support_batches == 0
    with pytest.raises(ValueError, match="inner_lrr"):
        build_algorithm("maml", inner_lrr=0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        build_algorithm("multitask", inner_lr=0.1)


class StubTask:
    """Just what the training loop reads from a task (``metalm.contracts.Task``): a size and batches by index."""

    fingerprint = rows_read = None

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    def size(self, split: str = "train") -> int:
        return 32

    def batch(self, split: str, indices) -> dict[str, torch.Tensor]:
        return make_batch(sum(indices), num_labels=self.num_labels)

    def held_out_split(self) -> str:
        return "train"  # a stub has one split; a meta-test over it reads training batches


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile"])
def test_train_loop_runs_meta_algorithms(name, tmp_path):
    from metalm.learn.samplers import CategoricalSampler
    from metalm.train.logging import read_log
    from metalm.train.loop import train_loop

    model = tiny_model(dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_loop(model=model, tasks={"t": StubTask(2), "u": StubTask(3)},
                        algorithm=build_algorithm(name, inner_lr=0.1, inner_steps=2),
                        sampler=CategoricalSampler({"t": 0.5, "u": 0.5}, seed=0), optimizer=optimizer,
                        scheduler=scheduler, steps=3, batch_size=B, seed=0, run_dir=tmp_path, tasks_per_step=2,
                        log_every=1, progress=False, tensorboard=False)
    assert result.step == 3 and math.isfinite(result.last_loss)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    key = "encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(model.get_parameter(key), before[key])  # the outer optimiser stepped


def test_gradient_checkpointing_is_refused_for_functional_losses():
    """HF checkpointing recomputes with the module's own weights, not the adapted ones."""
    from transformers import AutoModel, BertConfig

    from metalm.learn.functional import task_loss_fn
    from metalm.models.multitask import MultiTaskModel

    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False))
    model.add_task("t", "classification", 2)
    enable = getattr(model.encoder, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    (enable or model.encoder.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        task_loss_fn(model, "t")


@pytest.mark.parametrize("cross_task", [False, True])
def test_recomputed_inner_steps_give_the_same_meta_gradient(cross_task):
    """Checkpointed inner steps (explicit parameter inputs) must not change the second-order gradient."""
    from transformers import AutoModel, BertConfig

    from metalm.learn.algorithms import Episode
    from metalm.learn.maml import maml_grads
    from metalm.models.multitask import MultiTaskModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = MultiTaskModel(AutoModel.from_config(config, add_pooling_layer=False))
    model.add_task("a", "classification", 2)
    model.add_task("b", "regression", 1)
    model.double().eval()

    def batch(seed, regression=False):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randn(3, generator=g, dtype=torch.float64) if regression else torch.randint(0, 2, (3,), generator=g)
        return {"input_ids": torch.randint(0, 60, (3, 7), generator=g),
                "attention_mask": torch.ones(3, 7, dtype=torch.long), "labels": labels}

    tasks = ("a", "b", "a") if cross_task else ()
    support = tuple(batch(i, regression=(t == "b")) for i, t in enumerate(tasks or ("a", "a", "a")))
    episodes = [Episode("a", support, batch(9), support_tasks=tasks)]
    plain, _ = maml_grads(model, episodes, inner_lr=0.3, first_order=False)
    recomputed, _ = maml_grads(model, episodes, inner_lr=0.3, first_order=False, recompute=True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)
    first, _ = maml_grads(model, episodes, inner_lr=0.3, first_order=True)
    # First order differs (and gives the support-only head no gradient at all): the check can fail.
    assert max((first[n] - plain[n]).abs().max().item() for n in first) > 1e-4
