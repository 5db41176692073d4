"""Samplers over pre-training objectives that adapt to training (Wu et al. 2022, §3.3-3.4).

All follow the ``Sampler`` protocol of ``metalm.learn.samplers`` and hold only numbers: the
training loop computes their feedback and passes it to ``update`` as a dict, so no sampler
sees the model. Feedback keys:

- every step: ``tasks`` (the step's objectives), ``loss`` and, when ``request`` asks for it,
  ``encoder_grad_norm`` (L2 norm of the encoder's gradients);
- after step ``s`` where ``request(s).validation`` (and at step 0): ``validation_losses``,
  objective -> loss on a validation batch (the meta-test). ``metalm.contracts`` has the types.

``SignalSampler`` is the gradient-based (Gb) and loss-based (Lb) baseline; ``MometasSampler``
is the meta-learned sampler (Algorithm 1). Their state (including the history of sampling
weights and rewards behind Figs. 2-3) is JSON-serialisable and goes into checkpoints.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import numpy as np

from metalm.contracts import FeedbackRequest
from metalm.learn.samplers import draw

Reward = Literal["relative", "overall", "hard"]


def reward(before: Mapping[str, float], after: Mapping[str, float], *, kind: Reward = "relative") -> float:
    """R(τ) from the previous (b) and current (a) meta-test losses.

    ``relative``: Σᵢ (bᵢ − aᵢ)/bᵢ (Eq. 3); ``hard``: Σᵢ sign(bᵢ − aᵢ) (±1 per objective);
    ``overall``: −Σᵢ aᵢ, the opposite of the summed loss (their Table 3 "overall").

    An objective whose loss is not finite in either meta-test (a sampled validation batch with no
    prediction position, e.g. EMLM rows without entities) or, for ``relative``, whose baseline is
    0, carries no signal this time and is left out of the sum.
    """
    names = [n for n in after if np.isfinite(after[n]) and (kind == "overall" or np.isfinite(before[n]))
             and (kind != "relative" or before[n] != 0)]
    if kind == "relative":
        return float(sum((before[n] - after[n]) / before[n] for n in names))
    if kind == "hard":
        return float(sum(np.sign(before[n] - after[n]) for n in names))
    if kind == "overall":
        return float(-sum(after[n] for n in names))
    raise ValueError(f"unknown reward {kind!r} (relative, overall, hard)")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def mometas_gradient(logits: np.ndarray, counts: np.ndarray, reward_value: float, *,
                     entropy_weight: float) -> np.ndarray:
    """∇ψ of Σₜ log P(Tₜ; ψ)·R + λ·H(ψ) for P = softmax(ψ) (Eqs. 2 and 4).

    Args:
        logits: ψ, (m,).
        counts: how often each objective was drawn in the trajectory τ, (m,).
        reward_value: R(τ).
        entropy_weight: λ.

    With P = softmax(ψ), ∇ψ log P(j) = e_j − P, so Σₜ ∇ log P(Tₜ) = counts − K·P; and
    ∇ψ H = −P ⊙ (log P + H).
    """
    p = softmax(logits)
    score = counts - counts.sum() * p  # (m,)
    entropy = -float(np.sum(p * np.log(p)))
    entropy_grad = -p * (np.log(p) + entropy)  # (m,)
    return reward_value * score + entropy_weight * entropy_grad


class MometasSampler:
    """MOMETAS (Wu et al. 2022, Algorithm 1): a learned categorical distribution over objectives.

    Meta-train: K steps, one objective drawn per step from P = softmax(ψ) (ψ = 0: uniform).
    Meta-test: the loop evaluates every objective on a validation batch; the reward R(τ)
    compares these losses with the previous meta-test's, and
    ψ ← ψ + β [Σₜ ∇ψ log P(Tₜ; ψ) R(τ) + λ ∇ψ H(ψ)] (Eqs. 2-4).

    Args:
        names: the objectives (task names).
        seed: the sampler's generator.
        update_every: K, the meta length.
        meta_lr: β, the meta step size (0 keeps the uniform distribution but still tracks rewards:
            the Ub curve of their Fig. 3).
        entropy_weight: λ.
        reward_kind: ``relative`` (Eq. 3), ``overall`` or ``hard`` (their Table 3).
        validation_batch_size: examples per objective in each meta-test.
        reward_names: the tasks whose meta-test losses make R(τ) (default: every task in ``names``);
            e.g. only a target's held-out rows, the loss that matters, while the sampler draws others.
        reward_baseline: None for the paper's update; a decay d in [0, 1) subtracts from each R(τ)
            the bias-corrected moving average b of the earlier rewards (b ← d·b + (1 − d)·R, the
            REINFORCE baseline of Williams 1992; not in Wu et al.). The expected update is unchanged;
            a trajectory is then credited for being better than usual, not merely for a positive R,
            which every trajectory gets while all losses still fall.
    """

    def __init__(self, names: Sequence[str], *, seed: int, update_every: int = 100, meta_lr: float = 0.1,
                 entropy_weight: float = 0.0, reward_kind: Reward = "relative", validation_batch_size: int = 32,
                 reward_names: Sequence[str] | None = None, reward_baseline: float | None = None):
        if update_every < 1:
            raise ValueError(f"update_every (K) must be >= 1, got {update_every}")
        if reward_names is not None and (not reward_names or set(reward_names) - set(names)):
            raise ValueError(f"sampler.reward_tasks must be a non-empty subset of the tasks {list(names)}, "
                             f"got {list(reward_names)}")
        self.reward_names = tuple(reward_names) if reward_names is not None else tuple(names)
        reward({}, {}, kind=reward_kind)  # fails early on an unknown kind
        if reward_baseline is not None and not 0.0 <= reward_baseline < 1.0:
            raise ValueError(f"sampler.reward_baseline must be a decay in [0, 1) (or null), got {reward_baseline}")
        self.reward_baseline = reward_baseline
        self.reward_average, self.rewards_seen = 0.0, 0  # the baseline's moving average, before bias correction
        self.names = tuple(names)
        self.update_every, self.meta_lr, self.entropy_weight = update_every, meta_lr, entropy_weight
        self.reward_kind, self.validation_batch_size = reward_kind, validation_batch_size
        self.rng = np.random.default_rng(seed)
        self.logits = np.zeros(len(self.names))
        self.counts = np.zeros(len(self.names))
        self.steps = 0
        self.baseline: dict[str, float] | None = None
        self.history: list[dict] = []

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    def sample(self) -> str:
        return draw(self.rng, self.names, self.probabilities)

    def wants_validation(self, step: int) -> bool:
        """A meta-test after every K steps (and before training, for the first baseline)."""
        return step % self.update_every == 0 and (step > 0 or self.baseline is None)

    def request(self, done: int) -> FeedbackRequest:
        return FeedbackRequest(validation=self.wants_validation(done), validation_batch_size=self.validation_batch_size)

    def update(self, feedback: Mapping) -> None:
        if feedback.get("tasks"):
            self.steps += 1
        for name in feedback.get("tasks", ()):
            self.counts[self.names.index(name)] += 1
        if "validation_losses" not in feedback:
            return
        losses = {n: float(feedback["validation_losses"][n]) for n in self.names}
        record = {"step": self.steps, "probabilities": self.probabilities.tolist(), "losses": losses}
        if self.baseline is not None:
            value = reward(self.baseline, {n: losses[n] for n in self.reward_names}, kind=self.reward_kind)
            credit = value - self.expected_reward()
            grad = mometas_gradient(self.logits, self.counts, credit, entropy_weight=self.entropy_weight)
            self.logits = self.logits + self.meta_lr * grad
            record.update(reward=value, trajectory=self.counts.tolist())
            if self.reward_baseline is not None:
                record["advantage"] = credit
                d = self.reward_baseline
                self.reward_average, self.rewards_seen = d * self.reward_average + (1 - d) * value, self.rewards_seen + 1
        self.baseline = losses
        self.counts = np.zeros(len(self.names))
        record["new_probabilities"] = self.probabilities.tolist()
        self.history.append(record)

    def expected_reward(self) -> float:
        """The reward baseline b: 0 without ``reward_baseline`` or before any reward."""
        if self.reward_baseline is None or not self.rewards_seen:
            return 0.0
        return self.reward_average / (1.0 - self.reward_baseline ** self.rewards_seen)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "logits": self.logits.tolist(), "counts": self.counts.tolist(),
                "steps": self.steps, "baseline": self.baseline, "history": self.history,
                "reward_average": self.reward_average, "rewards_seen": self.rewards_seen}

    def load_state_dict(self, state: Mapping) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.logits = np.array(state["logits"], dtype=float)
        self.counts = np.array(state["counts"], dtype=float)
        self.steps = int(state["steps"])
        self.baseline = dict(state["baseline"]) if state["baseline"] is not None else None
        self.history = list(state["history"])
        self.reward_average = float(state.get("reward_average", 0.0))
        self.rewards_seen = int(state.get("rewards_seen", 0))


def signal_probabilities(values: np.ndarray, *, scaling: Literal["proportional", "sigmoid"]) -> np.ndarray:
    """Sampling weights from per-objective signals (Wu §4.3).

    ``proportional``: p ∝ v. ``sigmoid``: p ∝ σ((v − mean)/std), the signals standardised first so
    that one large value (a big early gradient) cannot push the others' probabilities to zero.
    """
    values = np.asarray(values, dtype=float)
    if scaling == "proportional":
        raw = np.clip(values, 1e-12, None)
    elif scaling == "sigmoid":
        spread = values.std()
        z = (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)
        raw = 1.0 / (1.0 + np.exp(-z))
    else:
        raise ValueError(f"unknown scaling {scaling!r} (proportional, sigmoid)")
    return raw / raw.sum()


class SignalSampler:
    """Gradient-based (Gb) and loss-based (Lb) sampling (Wu §3.3, §4.3).

    Every K steps the distribution is reset from each objective's mean signal over those steps:
    the L2 norm of the encoder's gradients (``gradient``), or the inverse training rate, the mean
    loss over the mean loss of the first K-step window in which the objective was drawn (``loss``).
    Objectives not drawn in a window keep their last value. Uniform until the first update.

    Args:
        names: the objectives.
        seed: the sampler's generator.
        signal: ``gradient`` or ``loss``.
        update_every: K.
        scaling: ``proportional`` or ``sigmoid`` (see ``signal_probabilities``).
    """

    def __init__(self, names: Sequence[str], *, seed: int, signal: Literal["gradient", "loss"],
                 update_every: int = 100, scaling: Literal["proportional", "sigmoid"] = "sigmoid"):
        if signal not in ("gradient", "loss"):
            raise ValueError(f"signal must be 'gradient' or 'loss', got {signal!r}")
        signal_probabilities(np.ones(1), scaling=scaling)
        self.names, self.signal, self.update_every, self.scaling = tuple(names), signal, update_every, scaling
        self.rng = np.random.default_rng(seed)
        m = len(self.names)
        self.probabilities = np.full(m, 1.0 / m)
        self.sums, self.counts = np.zeros(m), np.zeros(m)
        self.values = np.ones(m)
        self.initial: list[float | None] = [None] * m
        self.steps = 0
        self.history: list[dict] = []

    def sample(self) -> str:
        return draw(self.rng, self.names, self.probabilities)

    @property
    def needs_encoder_grad_norm(self) -> bool:
        return self.signal == "gradient"

    def request(self, done: int) -> FeedbackRequest:
        return FeedbackRequest(encoder_grad_norm=self.needs_encoder_grad_norm)

    def update(self, feedback: Mapping) -> None:
        key = "encoder_grad_norm" if self.signal == "gradient" else "loss"
        if feedback.get("tasks"):
            self.steps += 1
        for name in feedback.get("tasks", ()):  # with several tasks per step, each gets the step's value
            i = self.names.index(name)
            self.sums[i] += float(feedback[key])
            self.counts[i] += 1
        if not feedback.get("tasks") or self.steps % self.update_every:
            return
        for i in np.flatnonzero(self.counts):
            mean = self.sums[i] / self.counts[i]
            if self.signal == "loss":
                if self.initial[i] is None:
                    self.initial[i] = mean
                mean = mean / self.initial[i] if self.initial[i] else 1.0
            self.values[i] = mean
        self.probabilities = signal_probabilities(self.values, scaling=self.scaling)
        self.sums[:], self.counts[:] = 0.0, 0.0
        self.history.append({"step": self.steps, "values": self.values.tolist(),
                             "new_probabilities": self.probabilities.tolist()})

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "probabilities": self.probabilities.tolist(),
                "sums": self.sums.tolist(), "counts": self.counts.tolist(), "values": self.values.tolist(),
                "initial": self.initial, "steps": self.steps, "history": self.history}

    def load_state_dict(self, state: Mapping) -> None:
        self.rng.bit_generator.state = state["rng"]
        for key in ("probabilities", "sums", "counts", "values"):
            setattr(self, key, np.array(state[key], dtype=float))
        self.initial = list(state["initial"])
        self.steps = int(state["steps"])
        self.history = list(state["history"])

