"""The contracts between metalm's parts, in one place.

The training loop (``metalm.train.loop``) sees tasks, an algorithm, a sampler and a communication
seam only through the Protocols below; nothing it calls is probed for with ``getattr``. What an
implementation must provide:

- ``Task``: tokenised splits that give batches by row index (``metalm.tasks.task.Task`` for
  labelled tasks, ``metalm.objectives.task.ObjectiveTask`` for pre-training objectives).
- ``Algorithm``: turns a meta-batch of ``Episode`` s into ``.grad`` on the parameters it trains
  and returns ``StepStats`` (``metalm.learn.algorithms``: multitask, MAML / FOMAML, Reptile,
  meta-pretraining).
- ``Sampler``: picks each episode's task and learns from ``Feedback``; it says through
  ``request`` which feedback it needs, and the loop computes only that
  (``metalm.learn.samplers``, ``metalm.learn.objective_samplers``).
- ``EpisodeSource``: episodes the loop takes as they come instead of building them from tasks and
  batch streams (``metalm.teacher.pretrain``).
- ``InnerOptimizer``: a differentiable update of the inner loop (``metalm.learn.inner_optim``);
  plain SGD is the ``None`` optimiser, handled by the inner loop itself.
- ``Communicator``: what the loop exchanges between processes — the outer gradients after the
  algorithm's step and the statistics a learned sampler decides on. ``LocalCommunicator`` is the
  single-process implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, TypedDict, runtime_checkable

import numpy as np
from torch import Tensor, nn

Params = dict[str, Tensor]
"""Parameter name -> tensor (``torch.func.functional_call``'s view of a model)."""

Batch = dict[str, Tensor]
"""Model inputs and labels of one batch (``input_ids``, ``attention_mask``, ``labels``, ...)."""


@dataclass(frozen=True)
class Episode:
    """One task's data for one meta-step: ``support`` batches (inner-loop data, empty for plain
    multi-task training) and one ``query`` batch."""

    task: str
    """The task of the query batch (and of the support batches unless ``support_tasks`` says otherwise)."""
    support: tuple[Batch, ...]
    query: Batch
    support_tasks: tuple[str, ...] = ()
    """Task of each support batch when they differ (Lv et al.: inner batches drawn across tasks)."""

    def support_task(self, i: int) -> str:
        return self.support_tasks[i] if self.support_tasks else self.task


class StepStats(TypedDict, total=False):
    """What an algorithm's step returns (scalars, logged each ``log_every`` steps)."""

    loss: float
    """The outer (query) loss, averaged over the meta-batch."""
    support_loss: float
    """The mean inner (support) loss, for algorithms with an inner loop."""
    encoder_grad_norm: float
    """Added by the loop when the sampler requests it (``FeedbackRequest.encoder_grad_norm``)."""


class Feedback(TypedDict, total=False):
    """What a sampler's ``update`` receives: after each step the step's ``tasks`` and
    ``StepStats``; after a meta-test the ``validation_losses`` alone."""

    tasks: list[str]
    loss: float
    support_loss: float
    encoder_grad_norm: float
    validation_losses: dict[str, float]
    """Task -> its loss on a validation batch (train mode, seeded: ``metalm.train.feedback``)."""


@dataclass(frozen=True)
class FeedbackRequest:
    """What a sampler needs after a given number of steps."""

    validation: bool = False
    """Run a meta-test: every task's validation loss."""
    validation_batch_size: int = 32
    """Rows per task in that meta-test."""
    encoder_grad_norm: bool = False
    """The L2 norm of the encoder's gradients at this step (before clipping)."""

    def __or__(self, other: "FeedbackRequest") -> "FeedbackRequest":
        """Both requests (for a sampler made of two): the larger validation batch of those that validate."""
        sizes = [r.validation_batch_size for r in (self, other) if r.validation]
        return FeedbackRequest(validation=bool(sizes), validation_batch_size=max(sizes, default=32),
                               encoder_grad_norm=self.encoder_grad_norm or other.encoder_grad_norm)


NO_FEEDBACK = FeedbackRequest()
"""What a fixed distribution needs: nothing beyond the step's tasks."""


@runtime_checkable
class Task(Protocol):
    """A task ready for training."""

    fingerprint: str | None
    """A digest of what its tokens came from (a resume refuses a changed one); None when not tracked."""
    rows_read: dict | None
    """When its training split is restricted to a cell's rows: {rows, of, indices_sha256}."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    def size(self, split: str = "train") -> int: ...
    def batch(self, split: str, indices: Sequence[int]) -> Batch: ...
    def lengths(self, split: str = "train") -> np.ndarray | None:
        """(rows,) tokens per row, for length-grouped batches; None: the task cannot tell (plain batches)."""
        ...

    def held_out_split(self) -> str:
        """The split a meta-test (a learned sampler's reward) reads: rows the task does not train on,
        or ``train`` when it has none (a stage that needs held-out rows then refuses the task)."""
        ...


@runtime_checkable
class Algorithm(Protocol):
    """Writes ``.grad`` on the parameters it trains; the loop applies them."""

    support_batches: int
    """Support batches per episode (k; 0 for plain multi-task training)."""
    cross_task_support: bool
    """Each support batch's task is drawn from the sampler, not the episode's task (Lv et al.)."""
    reduction: str
    """How ``step`` combines its episodes' gradients and losses: ``mean`` or ``sum`` (the loop weighs
    each process's share of a split meta-batch by it)."""

    def support_steps(self, task: str) -> int:
        """Support batches for an episode of ``task`` (``support_batches`` unless a task has its own k)."""
        ...

    def at_step(self, step: int) -> None:
        """Called before step ``step`` (0-based, also after a resume): schedules of the algorithm's own."""
        ...

    def step(self, model: nn.Module, episodes: Sequence[Episode]) -> StepStats: ...


@runtime_checkable
class Sampler(Protocol):
    """Draws each episode's task from its own seeded generator; JSON-serialisable state."""

    names: tuple[str, ...]
    history: list[dict] | None
    """Adaptive samplers: their weights (and rewards) over time; None for fixed distributions."""

    def sample(self) -> str: ...

    def request(self, done: int) -> FeedbackRequest:
        """The feedback wanted with the update after ``done`` steps (0: before the first step)."""
        ...

    def update(self, feedback: Feedback) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: Mapping) -> None: ...


@runtime_checkable
class EpisodeSource(Protocol):
    """Episodes made outside the loop's tasks and batch streams (Shen's teacher-student batches:
    unlabelled rows and labelled tasks drawn together); the loop calls ``next_episodes`` once per
    algorithm step (``step``: optimiser steps done, ``index``: the micro-batch of that step, below
    ``grad_accum``) and keeps ``state_dict`` in its checkpoints.

    ``seekable`` declares whether the episodes (and every random draw the algorithm makes on them)
    depend only on ``(step, index)``: then several processes can split a step's micro-batches, each
    calling it only for its own. A source that is not seekable draws in call order, on one process."""

    seekable: bool

    def next_episodes(self, step: int, index: int) -> list[Episode]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: Mapping) -> None: ...


class InnerOptimizer(Protocol):
    """A differentiable inner-loop update: moments as parameter dicts threaded through the steps."""

    lr: float

    def init(self) -> tuple[Params, Params]: ...

    def update(self, params: Params, grads: dict[str, Tensor | None], state: tuple[Params, Params],
               step: int) -> tuple[Params, tuple[Params, Params]]: ...


class Communicator(Protocol):
    """The loop's seam to other processes training the same model (``metalm.train.distributed``
    has the ``torch.distributed`` one)."""

    rank: int
    world_size: int

    def reduce_gradients(self, params: Sequence[Tensor], weight: float = 1.0) -> None:
        """Replaces each ``.grad`` by the sum over processes of ``weight × .grad`` (in place; a
        missing gradient counts as zero). ``weight`` is this process's share of the step."""
        ...

    def reduce_mean(self, values: Mapping[str, float], weight: float | None = None) -> dict[str, float]:
        """The mean of each value over the processes (a learned sampler's statistics); with
        ``weight``, the sum of ``weight × value``."""
        ...

    def broadcast_module(self, module: nn.Module) -> None:
        """Copies rank 0's parameters and buffers to every process."""
        ...

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` (picklable) on every process."""
        ...

    def gather_object(self, obj: object) -> list | None:
        """Every process's ``obj`` in rank order on rank 0; ``None`` on the others."""
        ...

    def barrier(self) -> None:
        """Waits until every process gets here."""
        ...


class LocalCommunicator:
    """One process: nothing to exchange."""

    rank = 0
    world_size = 1

    def reduce_gradients(self, params: Sequence[Tensor], weight: float = 1.0) -> None:
        return None

    def reduce_mean(self, values: Mapping[str, float], weight: float | None = None) -> dict[str, float]:
        return dict(values)

    def broadcast_module(self, module: nn.Module) -> None:
        return None

    def broadcast_object(self, obj: object) -> object:
        return obj

    def gather_object(self, obj: object) -> list | None:
        return [obj]

    def barrier(self) -> None:
        return None


__all__ = ["Algorithm", "Batch", "Communicator", "Episode", "EpisodeSource", "Feedback", "FeedbackRequest", "InnerOptimizer",
           "LocalCommunicator", "NO_FEEDBACK", "Params", "Sampler", "StepStats", "Task"]
