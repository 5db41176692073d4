"""Run logs: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from metalm.files import write_text_atomic


class RunLogger:
    """Appends records to ``run_dir/metrics.jsonl`` and mirrors numbers to TensorBoard.

    Args:
        run_dir: the run folder.
        resume_step: when resuming, records logged after this step (by the killed run) are
            dropped so the log matches an uninterrupted run.
        tensorboard: whether to write TensorBoard event files under ``run_dir/tb``.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.writer = None

    def log(self, record: Mapping) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
        if self.writer is not None and "step" in record:
            prefix = record.get("event", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
