"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint folder ``step-0000100`` holds ``model.safetensors``, ``optimizer.safetensors``
(the optimiser's tensors) and ``state.json`` (step, optimiser groups and scalar state,
scheduler, sampler, batch streams, RNG states, anything the caller adds). It is written to a
temporary folder and renamed into place; ``latest`` names the newest complete one. Nothing
is unpickled on load.

``manifest.json``, written last, gives each file's size and SHA-256. On resume the newest
checkpoint that verifies is used; one that does not (a file missing, truncated, changed, or
unreadable JSON) is skipped with a warning naming the file, and a run folder whose checkpoints all
fail is refused rather than silently restarted from step 0. A checkpoint from before manifests
is accepted when its files are present and its JSON parses, with a warning.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from metalm.config import ConfigError
from metalm.files import write_text_atomic

LATEST = "latest"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(ConfigError):
    """A run folder's checkpoints cannot be trusted (a user-facing error: exit code 2)."""


def derived_seed(*parts: int) -> int:
    """A torch seed drawn from the integers ``parts`` (e.g. seed, step, index): the same parts give
    the same seed in any process, and different parts independent ones."""
    return int(np.random.default_rng(list(parts)).integers(2**62))


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _scheduler_state(scheduler) -> dict:
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def save_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int = 2, more: Sequence[tuple[str, Any, Any]] = ()) -> Path:
    """Writes checkpoint ``step`` under ``run_dir/checkpoints`` and points ``latest`` at it.

    ``more``: (name, optimizer, scheduler) of further optimiser groups; their tensors go into
    ``optimizer.safetensors`` under ``<name>/``, their JSON state under ``groups`` (the first
    group keeps the one-optimiser layout)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
        full = {"step": step, "optimizer": opt_meta, "scheduler": _scheduler_state(scheduler), "rng": rng_state(),
                **state}
        if more:
            full["groups"] = {}
            for name, other, other_scheduler in more:
                tensors, meta = _split_optimizer(other.state_dict())
                opt_tensors.update({f"{name}/{k}": v for k, v in tensors.items()})
                full["groups"][name] = {"optimizer": meta, "scheduler": _scheduler_state(other_scheduler)}
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(full))
        (tmp / MANIFEST).write_text(json.dumps({name: _describe(tmp / name) for name in FILES}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_text_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _describe(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when ``folder`` is a complete, unchanged checkpoint; otherwise what is wrong with it."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.exists():  # written before manifests existed: check what can be checked
        for name in FILES:
            if not (folder / name).is_file():
                return f"{folder / name} is missing"
        try:
            json.loads((folder / "state.json").read_text())
        except (ValueError, UnicodeDecodeError) as err:
            return f"{folder / 'state.json'} is not valid JSON ({err})"
        return None
    try:
        expected = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{manifest} is not valid JSON ({err})"
    for name in FILES:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if name not in expected:
            return f"{manifest} does not list {name}"
        if path.stat().st_size != expected[name]["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected[name]['size']} (truncated?)"
        if _describe(path)["sha256"] != expected[name]["sha256"]:
            return f"{path} differs from the checksum in its manifest (changed or corrupted)"
    return None


def remove_stale_temporaries(run_dir: str | Path) -> int:
    """Deletes ``checkpoints/.tmp-*`` folders that a killed write left behind; returns how many."""
    root = Path(run_dir) / "checkpoints"
    stale = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def latest_checkpoint(run_dir: str | Path, *, warn=None) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies (``latest`` first, then by step).

    Returns None when the run has no checkpoint. Calls ``warn(message)`` for each newer one it
    skips; raises CheckpointError when checkpoints exist but none verifies.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        elif pointer.read_text().strip():
            (warn or (lambda m: None))(f"{pointer} names {pointer.read_text().strip()!r}, which does not exist")
    problems = []
    for folder in candidates:
        problem = verify_checkpoint(folder)
        if problem is None:
            for earlier in problems:
                (warn or (lambda m: None))(f"skipped a damaged checkpoint: {earlier}; resuming from {folder.name}")
            return folder
        problems.append(problem)
    if problems:
        raise CheckpointError(f"{root}: no checkpoint can be trusted ({'; '.join(problems)}); delete the folder "
                              f"to start over, or restore a checkpoint")
    return None


def load_checkpoint(folder: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, more: Sequence[tuple[str, Any, Any]] = ()) -> dict:
    """Restores model, optimiser, scheduler and RNG states (and those of the further groups
    ``more``, as ``save_checkpoint`` wrote them); returns the JSON state."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / 'state.json'}: cannot be read ({err})") from err
    device = next(model.parameters()).device
    load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
    opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    saved = state.get("groups", {})
    wanted = [name for name, _, _ in more]
    if sorted(saved) != sorted(wanted):
        raise CheckpointError(f"{folder}: the checkpoint has optimiser groups {sorted(saved)} besides the first, "
                              f"this run has {sorted(wanted)}")
    own = {k: v for k, v in opt_tensors.items() if "/" not in k}
    optimizer.load_state_dict(_join_optimizer(own, state["optimizer"]))
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    for name, other, other_scheduler in more:
        prefix = f"{name}/"
        tensors = {k[len(prefix):]: v for k, v in opt_tensors.items() if k.startswith(prefix)}
        other.load_state_dict(_join_optimizer(tensors, saved[name]["optimizer"]))
        other_scheduler.load_state_dict({**other_scheduler.state_dict(), **saved[name]["scheduler"]})
    set_rng_state(state["rng"])
    return state
