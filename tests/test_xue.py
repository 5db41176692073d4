"""Xue's protocol pieces: joint steps over every task (Eq. 1), the inner-lr step decay."""

from __future__ import annotations

import copy

import pytest
import torch

from metalm.config import ConfigError
from metalm.learn.algorithms import MultiTask
from metalm.schema import TrainSettings
from metalm.train.loop import train_loop
from tests.test_meta_algorithms import grads_of, make_batch, tiny_model

from metalm.learn.algorithms import Episode


@pytest.mark.parametrize("reduction,scale", [("sum", 1.0), ("mean", 0.5)])
def test_joint_step_over_all_tasks_is_the_sum_of_single_task_gradients(reduction, scale):
    model = tiny_model()
    batches = {"t": make_batch(1, num_labels=2), "u": make_batch(2, num_labels=3)}
    MultiTask(reduction=reduction).step(model, [Episode(task=n, support=(), query=b) for n, b in batches.items()])
    joint = grads_of(model)
    reference = {}
    for name, batch in batches.items():  # each task's gradient alone, on its own copy
        alone = copy.deepcopy(model)
        alone.zero_grad(set_to_none=True)
        alone.loss(name, batch).backward()
        for n, g in grads_of(alone).items():
            reference[n] = reference.get(n, 0) + g
    assert joint.keys() == reference.keys()
    assert any(n.startswith("heads.t") for n in joint) and any(n.startswith("heads.u") for n in joint)
    for n in joint:
        torch.testing.assert_close(joint[n], scale * reference[n])


class _Rows:
    def __init__(self, name):
        self.name = name

    def size(self, split):
        return 8

    def batch(self, split, indices):
        return {"rows": torch.as_tensor(list(indices))}


class _NoDraw:
    def sample(self):
        raise AssertionError("all_tasks must not draw tasks from the sampler")

    def update(self, feedback):
        self.seen = getattr(self, "seen", []) + [feedback["tasks"]]


class _Record:
    support_batches = 0

    def __init__(self):
        self.steps = []

    def step(self, model, episodes):
        self.steps.append([e.task for e in episodes])
        return {"loss": 0.0}


def test_loop_all_tasks_gives_one_episode_of_every_task_each_step(tmp_path):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    algorithm, sampler = _Record(), _NoDraw()
    train_loop(model=model, tasks={"a": _Rows("a"), "b": _Rows("b"), "c": _Rows("c")}, algorithm=algorithm,
               sampler=sampler, optimizer=optimizer, scheduler=scheduler, steps=3, batch_size=2, seed=0,
               run_dir=tmp_path, progress=False, tensorboard=False, all_tasks=True)
    assert algorithm.steps == [["a", "b", "c"]] * 3
    assert sampler.seen == [["a", "b", "c"]] * 3


def test_step_tasks_settings_are_validated():
    with pytest.raises(ConfigError, match="tasks_per_step"):
        TrainSettings(step_tasks="all", tasks_per_step=2)
    with pytest.raises(ConfigError, match="loss_reduction"):
        TrainSettings(algorithm="reptile", loss_reduction="sum")
    with pytest.raises(ValueError, match="reduction"):
        MultiTask(reduction="max")
