"""Fault injection on checkpoints: each kind of damage to the newest checkpoint falls back to the
previous one with a warning naming the file, and the resumed run still ends with the weights of an
uninterrupted one; damage to every checkpoint is refused (never a silent restart from step 0);
unfinished writes are removed; a non-finite loss stops the run naming the step and the task."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metalm.recipes import run_train
from metalm.schema import DataConfig, EncoderConfig, OptimConfig, TrainConfig, TrainSettings
from metalm.tasks.spec import TaskSpec
from metalm.train.checkpoint import CheckpointError, verify_checkpoint
from metalm.train.loop import TrainingDiverged


class Killed(Exception):
    pass


def _spec(root: Path) -> TaskSpec:
    rng = random.Random(0)
    words = ["red", "green", "blue", "tree", "house", "river", "stone", "cloud"]
    lines = ["text\tlabel"] + [f"{'good' if (y := rng.randint(0, 1)) else 'bad'} {' '.join(rng.sample(words, 3))}\t{y}"
                               for _ in range(48)]
    (root / "cue.tsv").write_text("\n".join(lines) + "\n")
    return TaskSpec(name="cue", kind="classification", columns={"text_a": "text", "label": "label"},
                    files={"train": "{root}/cue.tsv"}, labels=("0", "1"), metrics=("accuracy",))


def _config(root: Path, out: Path, lr: float = 1e-3) -> TrainConfig:
    settings = TrainSettings(tasks=(_spec(root),), steps=6, batch_size=4, checkpoint_every=2, evaluate=False,
                             optim=OptimConfig(lr=lr))
    return TrainConfig(train=settings, encoder=EncoderConfig(name="tiny", max_length=16),
                       data=DataConfig(root=str(root), cache_dir=str(root / "cache")), seed=1, output_dir=str(out))


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "encoder" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return root, _weights(run_train(_config(root, root / "run"), progress=False, tensorboard=False))


def _killed_at_6(root: Path) -> Path:
    def kill(step):
        if step == 6:  # after the step-6 checkpoint; step-4 is the one before it
            raise Killed
    out = root / "run"
    with pytest.raises(Killed):
        run_train(_config(root, out), progress=False, tensorboard=False, on_step=kill)
    return out / "checkpoints"


def _flip(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated tensors": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-100]),
                          "model.safetensors has"),
    "flipped tensor bit": (lambda c: _flip(c / "model.safetensors"), "model.safetensors differs from the checksum"),
    "flipped rng character": (lambda c: (c / "state.json").write_text((c / "state.json").read_text().replace(
        '"torch": "', '"torch": "A', 1)), "state.json"),
    "garbage state": (lambda c: (c / "state.json").write_bytes(b"\x00\xffnot json"), "state.json"),
    "deleted state": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
    "deleted optimizer": (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    "deleted manifest and state": (lambda c: ((c / "manifest.json").unlink(), (c / "state.json").unlink()),
                                   "state.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, straight, tmp_path, capsys):
    checkpoints = _killed_at_6(tmp_path)
    assert verify_checkpoint(checkpoints / "step-0000006") is None
    do, named = DAMAGE[damage]
    do(checkpoints / "step-0000006")
    assert verify_checkpoint(checkpoints / "step-0000006") is not None
    capsys.readouterr()
    final = run_train(_config(tmp_path, tmp_path / "run"), resume=True, progress=False, tensorboard=False)
    err = capsys.readouterr().err
    assert "skipped a damaged checkpoint" in err and named in err and "resuming from step-0000004" in err
    assert "from step 4" in err
    ours, theirs = _weights(final), straight[1]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("pointer", ["missing", "dangling"])
def test_a_missing_or_dangling_latest_pointer_still_resumes(pointer, straight, tmp_path, capsys):
    checkpoints = _killed_at_6(tmp_path)
    if pointer == "missing":
        (checkpoints / "latest").unlink()
    else:
        (checkpoints / "latest").write_text("step-0000099")
    capsys.readouterr()
    final = run_train(_config(tmp_path, tmp_path / "run"), resume=True, progress=False, tensorboard=False)
    err = capsys.readouterr().err
    assert "from step 6" in err
    assert ("does not exist" in err) == (pointer == "dangling")
    ours, theirs = _weights(final), straight[1]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_every_checkpoint_damaged_is_refused_not_restarted(tmp_path):
    checkpoints = _killed_at_6(tmp_path)
    _flip(checkpoints / "step-0000006" / "model.safetensors")
    (checkpoints / "step-0000004" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint can be trusted") as err:
        run_train(_config(tmp_path, tmp_path / "run"), resume=True, progress=False, tensorboard=False)
    assert "step-0000006/model.safetensors" in str(err.value) and "step-0000004/state.json" in str(err.value)


def test_unfinished_writes_are_removed_when_a_run_starts(tmp_path, capsys):
    checkpoints = _killed_at_6(tmp_path)
    stale = checkpoints / ".tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    run_train(_config(tmp_path, tmp_path / "run"), resume=True, progress=False, tensorboard=False)
    assert not stale.exists() and "removed 1 unfinished checkpoint write" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_naming_step_and_task(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss .* on task\(s\) cue"):
        run_train(_config(tmp_path, tmp_path / "run", lr=1e30), progress=False, tensorboard=False)
