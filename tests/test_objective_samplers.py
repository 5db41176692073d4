"""Adaptive objective samplers: MOMETAS against a hand computation of Eqs. 2-4, learning to prefer
the objective that helps, the Gb/Lb baselines, JSON state, and an exact resume through the loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from metalm.learn.objective_samplers import (MometasSampler, SignalSampler, mometas_gradient, reward,
                                             signal_probabilities, softmax)


def entropy(logits):
    p = softmax(np.asarray(logits, dtype=float))
    return -float(np.sum(p * np.log(p)))


def numeric_grad(f, x, eps=1e-6):
    x = np.asarray(x, dtype=float)
    return np.array([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in np.eye(len(x))])


def test_rewards_by_hand():
    b, a = {"x": 2.0, "y": 4.0, "z": 1.0}, {"x": 1.5, "y": 5.0, "z": 1.0}
    assert reward(b, a, kind="relative") == pytest.approx(0.5 / 2 - 1 / 4 + 0)  # Eq. 3
    assert reward(b, a, kind="hard") == 1 - 1 + 0
    assert reward(b, a, kind="overall") == pytest.approx(-7.5)
    # An objective without a finite loss (an empty validation batch) or a 0 baseline is left out.
    b2, a2 = {**b, "w": float("nan"), "v": 0.0}, {**a, "w": 3.0, "v": 0.5}
    assert reward(b2, a2, kind="relative") == pytest.approx(0.5 / 2 - 1 / 4)
    assert reward(b2, a2, kind="hard") == 1 - 1 + 0 - 1  # v rose from 0
    assert reward(b2, {**a2, "x": float("nan")}, kind="overall") == pytest.approx(-(5.0 + 1.0 + 3.0 + 0.5))


def test_mometas_update_matches_a_hand_computation_of_eqs_2_to_4():
    names = ("mlm", "cse", "dtd")
    sampler = MometasSampler(names, seed=0, update_every=4, meta_lr=0.1, entropy_weight=2.0)
    assert sampler.wants_validation(0)
    sampler.update({"validation_losses": {"mlm": 4.0, "cse": 2.0, "dtd": 1.0}})  # the first baseline
    for task in ("mlm", "mlm", "cse", "mlm"):  # a fixed trajectory τ of K = 4 steps
        assert not sampler.wants_validation(sampler.steps)
        sampler.update({"tasks": [task], "loss": 1.0})
    assert sampler.wants_validation(4)
    sampler.update({"validation_losses": {"mlm": 3.0, "cse": 2.2, "dtd": 0.9}})
    # By hand: R = (4-3)/4 + (2-2.2)/2 + (1-0.9)/1 = 0.25 - 0.1 + 0.1 = 0.25. At ψ = 0, P = 1/3 each;
    # Σ_t ∇ψ log P(T_t) = counts - K·P = (3, 1, 0) - 4/3 = (5/3, -1/3, -4/3); the entropy gradient
    # vanishes at the uniform distribution. ψ = 0.1 · 0.25 · (5/3, -1/3, -4/3).
    assert sampler.history[-1]["reward"] == pytest.approx(0.25)
    expected = 0.1 * 0.25 * np.array([5 / 3, -1 / 3, -4 / 3])
    assert np.allclose(sampler.logits, expected, atol=1e-12)
    # A second cycle from this non-uniform ψ: check the update against finite differences of
    # J(ψ) = Σ_t log softmax(ψ)[T_t]·R + λ·H(softmax(ψ)) (Eqs. 2 and 4).
    psi = sampler.logits.copy()
    for task in ("dtd", "dtd", "mlm", "cse"):
        sampler.update({"tasks": [task], "loss": 1.0})
    sampler.update({"validation_losses": {"mlm": 2.7, "cse": 2.0, "dtd": 0.95}})
    r = (3 - 2.7) / 3 + (2.2 - 2.0) / 2.2 + (0.9 - 0.95) / 0.9
    trajectory = [2, 2, 0, 1]  # indices of dtd, dtd, mlm, cse

    def objective(x):
        log_p = np.log(softmax(x))
        return sum(log_p[i] for i in trajectory) * r + 2.0 * entropy(x)

    assert np.allclose(sampler.logits, psi + 0.1 * numeric_grad(objective, psi), atol=1e-8)
    assert np.allclose(mometas_gradient(psi, np.array([1.0, 1.0, 2.0]), r, entropy_weight=2.0),
                       numeric_grad(objective, psi), atol=1e-7)


def test_reward_baseline_subtracts_the_bias_corrected_average_of_earlier_rewards():
    """With reward_baseline d, cycle t is credited R_t − b_t, b_t the bias-corrected moving average
    of R_1..R_{t-1} (0 at t = 1); the logits follow Eq. 2 with that credit, by hand."""
    names, d = ("a", "b"), 0.5
    sampler = MometasSampler(names, seed=0, update_every=2, meta_lr=1.0, reward_baseline=d)
    sampler.update({"validation_losses": {"a": 1.0, "b": 1.0}})
    losses = [{"a": 0.8, "b": 1.0}, {"a": 0.72, "b": 0.9}, {"a": 0.72, "b": 0.9}]
    trajectories = [("a", "a"), ("a", "b"), ("b", "b")]
    psi, previous, rewards = np.zeros(2), {"a": 1.0, "b": 1.0}, []
    for trajectory, after in zip(trajectories, losses):
        for task in trajectory:
            sampler.update({"tasks": [task]})
        sampler.update({"validation_losses": after})
        r = sum((previous[n] - after[n]) / previous[n] for n in names)
        if rewards:  # b = Σ (1-d) d^(t-1-i) R_i / (1 - d^(t-1))
            weights = [(1 - d) * d ** (len(rewards) - 1 - i) for i in range(len(rewards))]
            b = sum(w * x for w, x in zip(weights, rewards)) / (1 - d ** len(rewards))
        else:
            b = 0.0
        counts = np.array([trajectory.count(n) for n in names], dtype=float)
        psi = psi + (r - b) * (counts - counts.sum() * softmax(psi))
        assert sampler.history[-1]["reward"] == pytest.approx(r)
        assert sampler.history[-1]["advantage"] == pytest.approx(r - b)
        assert np.allclose(sampler.logits, psi, atol=1e-12)
        previous = after
        rewards.append(r)
    # The third cycle drew only b and earned 0 against an average of 0.2 and 0.2: b loses probability.
    assert sampler.history[-1]["advantage"] == pytest.approx(-0.2) and sampler.probabilities[1] < 0.5
    with pytest.raises(ValueError, match="reward_baseline"):
        MometasSampler(names, seed=0, reward_baseline=1.0)


def test_mometas_learns_to_prefer_the_objective_whose_validation_loss_drops():
    """A constructed case: training objective 'good' lowers its validation loss by 2% a step;
    the others' losses do not move (and 'bad' raises the others' losses a little)."""
    names = ("good", "idle", "bad")
    sampler = MometasSampler(names, seed=0, update_every=20, meta_lr=0.5, entropy_weight=0.0)
    loss = {"good": 3.0, "idle": 2.0, "bad": 1.0}
    sampler.update({"validation_losses": dict(loss)})
    rng = np.random.default_rng(0)
    for _ in range(200):  # REINFORCE is noisy: the signal grows with the cycles, the noise with their root
        for _ in range(20):
            task = sampler.sample()
            sampler.update({"tasks": [task], "loss": 0.0})
            if task == "good":
                loss["good"] *= 0.98
            elif task == "bad":
                loss["idle"] *= 1.005
        noisy = {k: v * (1 + 0.002 * rng.standard_normal()) for k, v in loss.items()}
        sampler.update({"validation_losses": noisy})
    p = dict(zip(names, sampler.probabilities))
    assert p["good"] > 0.6 and p["bad"] < 0.15, p
    # The same run at β = 0 keeps uniform sampling (the Ub reference of their Fig. 3).
    flat = MometasSampler(names, seed=0, update_every=20, meta_lr=0.0)
    flat.update({"validation_losses": dict(loss)})
    for _ in range(20):
        flat.update({"tasks": [flat.sample()]})
    flat.update({"validation_losses": {k: v / 2 for k, v in loss.items()}})
    assert np.allclose(flat.probabilities, 1 / 3) and flat.history[-1]["reward"] == pytest.approx(1.5)


def test_signal_sampler_gradient_and_loss_based_by_hand():
    grad = SignalSampler(("a", "b"), seed=0, signal="gradient", update_every=4, scaling="proportional")
    assert grad.needs_encoder_grad_norm
    for task, norm in (("a", 1.0), ("b", 6.0), ("a", 3.0), ("b", 2.0)):
        grad.update({"tasks": [task], "loss": 9.9, "encoder_grad_norm": norm})
    assert np.allclose(grad.probabilities, [2 / 6, 4 / 6])  # mean norms 2 and 4
    lossb = SignalSampler(("a", "b"), seed=0, signal="loss", update_every=2, scaling="proportional")
    for losses in ((4.0, 2.0), (2.0, 1.5)):  # inverse training rates after the second window: 1/2, 3/4
        for task, value in zip(("a", "b"), losses):
            lossb.update({"tasks": [task], "loss": value})
    assert np.allclose(lossb.probabilities, [0.5 / 1.25, 0.75 / 1.25])
    z = (np.array([1.0, 2.0, 6.0]) - 3.0) / np.std([1.0, 2.0, 6.0])
    sig = 1 / (1 + np.exp(-z))
    assert np.allclose(signal_probabilities([1.0, 2.0, 6.0], scaling="sigmoid"), sig / sig.sum())


@pytest.mark.parametrize("make", [
    lambda: MometasSampler(("a", "b", "c"), seed=3, update_every=5, meta_lr=1.0, entropy_weight=1.0),
    lambda: MometasSampler(("a", "b", "c"), seed=3, update_every=5, meta_lr=1.0, reward_baseline=0.9),
    lambda: SignalSampler(("a", "b", "c"), seed=3, signal="loss", update_every=5),
    lambda: SignalSampler(("a", "b", "c"), seed=3, signal="gradient", update_every=5, scaling="proportional"),
])
def test_state_is_json_and_restores_the_same_draws(make):
    def drive(sampler, steps, start=0):
        drawn = []
        for step in range(start, steps):
            task = sampler.sample()
            drawn.append(task)
            sampler.update({"tasks": [task], "loss": 1.0 + (step % 3), "encoder_grad_norm": 0.5 + (step % 4)})
            if sampler.request(step + 1).validation:
                sampler.update({"validation_losses": {"a": 2.0 / (step + 2), "b": 1.0, "c": 1.0 + 0.01 * step}})
        return drawn

    straight = make()
    straight.update({"validation_losses": {"a": 1.0, "b": 1.0, "c": 1.0}})
    half = make()
    half.update({"validation_losses": {"a": 1.0, "b": 1.0, "c": 1.0}})
    first = drive(half, 12)
    restored = make()
    restored.load_state_dict(json.loads(json.dumps(half.state_dict())))
    assert first + drive(restored, 30, start=12) == drive(straight, 30)
    assert math.isclose(restored.probabilities.sum(), 1.0)


def test_mometas_run_resumes_bit_exactly(tmp_path: Path, data_root: Path):
    """Corpus objectives + MOMETAS through `run_train`: kill after a checkpoint, resume, same weights."""
    import torch
    from safetensors.torch import load_file

    from metalm.recipes import run_train
    from metalm.schema import (CorpusConfig, DataConfig, EncoderConfig, ObjectiveConfig, SamplerConfig,
                               TrainConfig, TrainSettings)

    corpus = CorpusConfig(paths=("{root}/corpus/lee_background.cor",), max_sentences=120)
    objectives = tuple(ObjectiveConfig(objective=o, corpus=corpus) for o in ("mlm", "cse", "dtd"))

    def config(out):
        settings = TrainSettings(objectives=objectives, steps=8, batch_size=4, checkpoint_every=4,
                                 sampler=SamplerConfig(kind="mometas", update_every=2, meta_lr=5.0))
        return TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=32),
                           data=DataConfig(root=str(data_root), cache_dir=str(tmp_path / "cache")), seed=1,
                           output_dir=str(out))

    straight = run_train(config(tmp_path / "a"), progress=False, tensorboard=False)

    def kill(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(config(tmp_path / "b"), progress=False, tensorboard=False, on_step=kill)
    resumed = run_train(config(tmp_path / "b"), resume=True, progress=False, tensorboard=False)
    a, b = load_file(str(straight / "encoder" / "model.safetensors")), load_file(str(resumed / "encoder" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    history_a = json.loads((tmp_path / "a" / "sampler.json").read_text())["history"]
    history_b = json.loads((tmp_path / "b" / "sampler.json").read_text())["history"]
    assert history_a == history_b and len(history_a) == 5  # baseline + a meta-test every 2 of 8 steps
    # The whole sampler state (generator, ψ, baseline losses of the sampled, dropout-seeded meta-test).
    final_a = json.loads((tmp_path / "a" / "checkpoints" / "step-0000008" / "state.json").read_text())["sampler"]
    final_b = json.loads((tmp_path / "b" / "checkpoints" / "step-0000008" / "state.json").read_text())["sampler"]
    assert final_a == final_b
    assert history_a[-1]["new_probabilities"] != history_a[0]["new_probabilities"]


def test_pair_matching_task_pretrains_beside_a_corpus_objective(tmp_path: Path, data_root: Path):
    """Lv §4.2 / Wu: a labelled pair task (Quora) listed in `train.tasks` trains beside MLM on a
    corpus, under the same sampler; both heads are saved, and the pair head learned (its dev loss
    fell below the loss of the same head before the stage)."""
    import torch

    from metalm.builders import build_model, build_tasks
    from metalm.recipes import run_train
    from metalm.schema import (CorpusConfig, DataConfig, EncoderConfig, ObjectiveConfig, SamplerConfig,
                               TrainConfig, TrainSettings)
    from metalm.tasks.registry import get_task_spec
    from metalm.train.evaluate import evaluate
    from metalm.train.logging import read_log

    corpus = CorpusConfig(paths=("{root}/corpus/lee_background.cor",), max_sentences=200)
    data = DataConfig(root=str(data_root), cache_dir=str(tmp_path / "cache"))
    encoder = EncoderConfig(name="tiny", max_length=32, pair_max_length=32)
    settings = TrainSettings(tasks=("quora",), objectives=(ObjectiveConfig(objective="mlm", corpus=corpus),),
                             steps=60, batch_size=16, log_every=1, sampler=SamplerConfig(kind="uniform"))
    final = run_train(TrainConfig(train=settings, encoder=encoder, data=data, seed=0, output_dir=str(tmp_path / "run")),
                      progress=False, tensorboard=False)
    trained = {r["task"] for r in read_log(tmp_path / "run") if r.get("event") == "train"}
    assert trained == {"quora", "mlm"}
    heads = json.loads((final / "heads.json").read_text())["tasks"]
    assert heads["quora"]["kind"] == "pair_classification" and heads["mlm"]["kind"] == "mlm"

    model, tok = build_model(encoder, seed=0, init=str(final))
    quora = build_tasks([get_task_spec("quora")], tok, data=data, max_length=32)["quora"]
    after = evaluate(model, quora, "dev")["loss"]
    torch.manual_seed(0)
    fresh, _ = build_model(encoder, seed=0)
    fresh.add_task("quora", quora.kind, quora.spec.num_labels)
    before = evaluate(fresh, quora, "dev")["loss"]
    assert after < before - 0.02, (before, after)
