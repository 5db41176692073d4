"""``train.grad_accum`` in a config: with the mean reduction, one episode per algorithm step and 2
accumulated steps end a `metalm train` run at the parameters of 2 episodes per step (the same
episodes, drawn in the same order); a bad value is refused when the config is parsed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from metalm.recipes import run_train
from metalm.schema import DataConfig, EncoderConfig, OptimConfig, SamplerConfig, TrainConfig, TrainSettings


def _weights(final) -> dict[str, torch.Tensor]:
    weights = load_file(str(final / "encoder" / "model.safetensors"))
    weights.update({f"heads.{k}": v for k, v in load_file(str(final / "heads.safetensors")).items()})
    return weights


def _run(out, *, algorithm: str, tasks_per_step: int, grad_accum: int):
    extra = {} if algorithm == "multitask" else {"inner_steps": 2, "inner_lr": 1e-2}
    settings = TrainSettings(tasks=("polarity", "twomoons"), algorithm=algorithm, steps=3, batch_size=4,
                             tasks_per_step=tasks_per_step, grad_accum=grad_accum, sampler=SamplerConfig(kind="uniform"),
                             optim=OptimConfig(lr=1e-3), checkpoint_every=0, log_every=1, evaluate=False, **extra)
    cfg = TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=16, dropout=0.0),
                      data=DataConfig(cache_dir=None), seed=5, output_dir=str(out))
    return _weights(run_train(cfg, progress=False, tensorboard=False))


@pytest.mark.parametrize("algorithm", ["multitask", "reptile"])
def test_accumulated_steps_equal_a_larger_meta_batch(tmp_path, algorithm):
    batch = _run(tmp_path / "batch", algorithm=algorithm, tasks_per_step=2, grad_accum=1)
    accumulated = _run(tmp_path / "accum", algorithm=algorithm, tasks_per_step=1, grad_accum=2)
    single = _run(tmp_path / "single", algorithm=algorithm, tasks_per_step=1, grad_accum=1)
    assert batch.keys() == accumulated.keys()
    for name in batch:
        torch.testing.assert_close(accumulated[name], batch[name], rtol=1e-5, atol=1e-6, msg=name)
    # the comparison can fail: one episode per step and no accumulation trains to other parameters
    assert max(float((single[n] - batch[n]).abs().max()) for n in batch) > 1e-4


def test_grad_accum_below_one_is_refused_at_parse_time(capsys):
    from metalm.cli import main

    assert main(["check", "train_glue", "train.grad_accum=0"]) == 2
    assert capsys.readouterr().err.strip() == "metalm: error: train_glue.train: grad_accum: expected a positive number, got 0"
