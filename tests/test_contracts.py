"""The spine's contracts (``metalm.contracts``): every shipped algorithm and sampler satisfies its
Protocol, feedback requests combine as documented, and the loop's communication seam is wired
(what a Communicator does to the gradients and the meta-test losses is what the model and the
sampler see)."""

from __future__ import annotations

import pytest
import torch

from metalm.contracts import NO_FEEDBACK, Algorithm, FeedbackRequest, LocalCommunicator, Sampler
from metalm.learn.algorithms import ALGORITHMS, build_algorithm
from tests.test_meta_algorithms import B, StubTask, tiny_model

SAMPLER_KINDS = ["uniform", "proportional", "temperature", "weights", "mixed", "gradient", "loss", "mometas"]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_satisfies_the_protocol(name):
    algorithm = build_algorithm(name)
    assert isinstance(algorithm, Algorithm)
    assert isinstance(algorithm.support_steps("t"), int) and algorithm.support_steps("t") >= 0
    algorithm.at_step(0)  # callable at any step


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_every_sampler_kind_satisfies_the_protocol(kind):
    from metalm.builders import build_sampler
    from metalm.schema import SamplerConfig

    tasks = {"t": StubTask(2), "u": StubTask(3)}
    extra = {"weights": {"t": 1.0, "u": 3.0}} if kind == "weights" else {"target": "u"} if kind == "mixed" else {}
    sampler = build_sampler(SamplerConfig(kind=kind, **extra), tasks, seed=0)
    assert isinstance(sampler, Sampler)
    assert set(sampler.names) == {"t", "u"} and sampler.sample() in tasks
    assert isinstance(sampler.request(0), FeedbackRequest)
    adaptive = kind in ("gradient", "loss", "mometas")
    assert (sampler.history is not None) == adaptive  # only learned distributions have a history to save
    if not adaptive:
        assert all(sampler.request(done) == NO_FEEDBACK for done in range(5))


def test_shens_pretraining_parts_satisfy_the_protocols():
    from metalm.contracts import EpisodeSource
    from metalm.teacher.algorithm import TeacherStudentStep
    from metalm.teacher.pretrain import PretrainEpisodes, TaskChoice, masking_scheme

    g = torch.Generator().manual_seed(0)
    algorithm = TeacherStudentStep("hard", masking_scheme(), g)
    assert isinstance(algorithm, Algorithm) and algorithm.support_steps("task0") == 1
    choice = TaskChoice(2, mlm_task=True, generator=g)
    assert isinstance(choice, Sampler) and choice.sample() in choice.names and choice.history is None
    assert all(choice.request(done) == NO_FEEDBACK for done in range(3))
    state = choice.state_dict()
    drawn = [choice.sample() for _ in range(5)]
    choice.load_state_dict(state)  # the generator's state round-trips through JSON-able text
    assert [choice.sample() for _ in range(5)] == drawn
    source = PretrainEpisodes(torch.ones(4, 3, dtype=torch.long), None, batch_size=2, generator=g)
    assert isinstance(source, EpisodeSource) and len(source.next_episodes(0, 0)) == 1


def test_feedback_requests_combine():
    small = FeedbackRequest(validation=True, validation_batch_size=8)
    large = FeedbackRequest(validation=True, validation_batch_size=64)
    norm = FeedbackRequest(encoder_grad_norm=True)
    assert small | large == large | small == FeedbackRequest(validation=True, validation_batch_size=64)
    # a request that does not validate does not bring its (default) batch size along
    assert small | norm == FeedbackRequest(validation=True, validation_batch_size=8, encoder_grad_norm=True)
    assert norm | NO_FEEDBACK == norm
    assert NO_FEEDBACK | NO_FEEDBACK == NO_FEEDBACK


class _ZeroGradients(LocalCommunicator):
    """A seam that replaces every gradient by zero: under plain SGD nothing may move."""

    def __init__(self):
        self.calls = 0

    def reduce_gradients(self, params, weight=1.0):
        self.calls += 1
        for p in params:
            p.grad.zero_()


class _ShiftLosses(LocalCommunicator):
    """A seam that adds 1 to every meta-test loss and remembers what it returned."""

    def __init__(self):
        self.returned: list[dict] = []

    def reduce_mean(self, values, weight=None):
        self.returned.append({k: v + 1.0 for k, v in values.items()})
        return dict(self.returned[-1])


def _run(tmp_path, *, sampler, comm, algorithm="multitask", steps=3, optimizer=None, model=None):
    from metalm.train.loop import train_loop

    model = model or tiny_model(dtype=torch.float32)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return train_loop(model=model, tasks={"t": StubTask(2), "u": StubTask(3)}, algorithm=build_algorithm(algorithm),
                      sampler=sampler, optimizer=optimizer, scheduler=scheduler, steps=steps, batch_size=B, seed=0,
                      run_dir=tmp_path, log_every=1, progress=False, tensorboard=False, comm=comm)


@pytest.mark.parametrize("algorithm", ["multitask", "reptile"])
def test_the_loop_steps_on_the_gradients_the_communicator_leaves(tmp_path, algorithm):
    from metalm.learn.samplers import CategoricalSampler

    model = tiny_model(dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    comm = _ZeroGradients()
    _run(tmp_path / "zero", model=model, sampler=CategoricalSampler({"t": 0.5, "u": 0.5}, seed=0), comm=comm,
         algorithm=algorithm, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    assert comm.calls == 3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the same run through the local seam does move the encoder, so the check above can fail
    moved = tiny_model(dtype=torch.float32)
    _run(tmp_path / "local", model=moved, sampler=CategoricalSampler({"t": 0.5, "u": 0.5}, seed=0),
         comm=LocalCommunicator(), algorithm=algorithm, optimizer=torch.optim.SGD(moved.parameters(), lr=0.5))
    key = "encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(moved.get_parameter(key), before[key])


def test_a_learned_sampler_sees_the_losses_the_communicator_returns(tmp_path):
    from metalm.learn.objective_samplers import MometasSampler

    sampler = MometasSampler(["t", "u"], seed=0, update_every=2, validation_batch_size=B)
    comm = _ShiftLosses()
    _run(tmp_path, sampler=sampler, comm=comm, steps=4)
    seen = [record["losses"] for record in sampler.history]
    assert len(seen) == 3  # before training, after step 2 and after step 4
    assert seen == comm.returned
