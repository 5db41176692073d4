"""Fault injection on checkpoints: each kind of damage to the newest checkpoint falls back to the
previous one with a warning naming the file, and the resumed run still ends with the weights of an
uninterrupted one; damage to every checkpoint is refused (never a silent restart from step 0);
unfinished writes are removed; a non-finite loss stops the run naming the step and the task."""

from __future__ import annotations

import json
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


def test_a_resume_after_the_task_file_changed_is_refused(tmp_path):
    """Labels swapped in the task's file between the run and its resume: the fingerprint recorded
    in the checkpoint no longer matches, and the resume stops naming the task."""
    _killed_at_6(tmp_path)
    config = _config(tmp_path, tmp_path / "run")  # (writes cue.tsv afresh)
    data = tmp_path / "cue.tsv"
    header, *rows = data.read_text().splitlines()
    data.write_text("\n".join([header] + [r[:-1] + str(1 - int(r[-1])) for r in rows]) + "\n")
    with pytest.raises(CheckpointError, match=r"the inputs changed .*: cue \(spec, files or tokenizer\)"):
        run_train(config, resume=True, progress=False, tensorboard=False)


def _poison_clip(monkeypatch, bad_calls):
    """Gradient clipping sees NaN gradients at the given (1-based) steps, as a NaN in a batch gives."""
    import metalm.train.loop as loop

    monkeypatch.undo()  # one poisoning at a time
    real, calls = loop._clip, []

    def clip(params, clip_norm):
        calls.append(1)
        if len(calls) in bad_calls:
            for p in params:
                p.grad.fill_(float("nan"))
        return real(params, clip_norm)

    monkeypatch.setattr(loop, "_clip", clip)


def test_skip_nonfinite_skips_a_poisoned_step_without_touching_the_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file as load

    _poison_clip(monkeypatch, {3})
    cfg = _config(tmp_path, tmp_path / "run")
    cfg = TrainConfig(**{**cfg.__dict__, "train": TrainSettings(**{**cfg.train.__dict__, "skip_nonfinite": 1,
                                                                    "checkpoint_every": 1})})
    final = run_train(cfg, progress=False, tensorboard=False)
    assert all(torch.isfinite(v).all() for v in _weights(final).values())
    # Only the newest checkpoints are kept: compare steps 2 and 3 from a second run stopped at 3.
    _poison_clip(monkeypatch, {3})

    def stop_at(step):
        if step == 3:
            raise Killed
    again = tmp_path / "again"
    with pytest.raises(Killed):
        run_train(TrainConfig(**{**cfg.__dict__, "output_dir": str(again)}), progress=False, tensorboard=False,
                  on_step=stop_at)
    before, after = (load(str(again / "checkpoints" / f"step-000000{s}" / "model.safetensors")) for s in (2, 3))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed no weight
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [skipped] = [e for e in events if e.get("event") == "skipped"]
    assert skipped["step"] == 3 and skipped["tasks"] == ["cue"] and skipped["skipped"] == 1
    # A second poisoned step is one too many.
    _poison_clip(monkeypatch, {2, 4})
    with pytest.raises(TrainingDiverged, match=r"step 4: .* after 1 skipped step\(s\) \(train.skip_nonfinite: 1\)"):
        run_train(TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "third")}), progress=False,
                  tensorboard=False)


KILL_SCRIPT = r"""
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import metalm.train.checkpoint as checkpoint
sys.path.insert(0, sys.argv[3])
from test_checkpoint_damage import _config
from metalm.recipes import run_train

root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
real, calls = checkpoint.save_file, []

def save_file(tensors, path, *args, **kwargs):
    real(tensors, path, *args, **kwargs)
    calls.append(path)
    if len(calls) == kill_at:  # the model and these tensors are written; state and manifest are not
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.save_file = save_file
run_train(_config(root, root / "run"), resume=(root / "run").exists(), progress=False, tensorboard=False)
"""


def test_kill_9_inside_checkpoint_writes_leaves_no_temporary_and_resumes_exactly(straight, tmp_path):
    """Three real SIGKILLs, each in the middle of a checkpoint write (after its optimizer tensors,
    before its state and manifest), then a clean start: no ``.tmp-*`` folder survives the next
    start, and the finished run's weights equal an uninterrupted run's."""
    import subprocess
    import sys

    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    here = str(Path(__file__).parent)
    # Kill during the 1st write (step 2) of the first run (nothing complete: the restart begins at
    # step 0), the 2nd (step 4) of the restart, then the 1st (step 4 again) of the resume from step
    # 2; the last start resumes from step 2 and runs to the end.
    for kill_at in (1, 2, 1, 0):
        done = subprocess.run([sys.executable, str(script), str(tmp_path), str(kill_at), here], env=env,
                              capture_output=True, text=True, timeout=300)
        checkpoints = tmp_path / "run" / "checkpoints"
        if kill_at:
            assert done.returncode == -9, done.stderr[-2000:]
            assert list(checkpoints.glob(".tmp-*")), "the kill was inside a write: its folder is left"
        else:
            assert done.returncode == 0, done.stderr[-2000:]
    assert not list(checkpoints.glob(".tmp-*"))
    ours, theirs = _weights(tmp_path / "run" / "final"), straight[1]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
