"""Evaluation: predictions of a task head over a split, scored with the task's metrics."""

from __future__ import annotations

import numpy as np
import torch

from metalm.data.batching import to_device
from metalm.tasks.kinds import predict, task_loss
from metalm.tasks.task import Task, gather_tokens


@torch.no_grad()
def predict_split(model, task: Task, split: str, *, batch_size: int = 64) -> tuple[list, list, float]:
    """(predictions, references, mean loss) over a split, in file order.

    Rows are scored in batches of similar length (shortest first) when the task knows its row
    lengths, so that little of each batch is padding; the results go back to file order.
    """
    was_training = model.training
    model.eval()
    n = task.size(split)
    order = _length_order(task, split, n)
    preds, refs = [None] * n, [None] * n
    loss_sum = 0.0
    device = next(model.parameters()).device
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        batch = to_device(task.batch(split, rows), device)
        logits = model(task.name, batch).float()  # bfloat16 under autocast: score in float32
        loss_sum += task_loss(task.kind, logits, batch["labels"]).item() * len(rows)
        p = predict(task.kind, logits).cpu().numpy()
        y = batch["labels"].cpu().numpy()
        if task.kind == "token_classification":
            p, y = gather_tokens(p, y)
        else:
            p, y = p.tolist(), y.tolist()
        for row, p_row, y_row in zip(rows, p, y):
            preds[row], refs[row] = p_row, y_row
    model.train(was_training)
    return preds, refs, loss_sum / max(n, 1)


def _length_order(task: Task, split: str, n: int) -> list[int]:
    """Row indices sorted by token count (stable), or file order for tasks without lengths."""
    if not hasattr(task, "lengths"):
        return list(range(n))
    return np.argsort(np.asarray(task.lengths(split)), kind="stable").tolist()


CONSTANT = "constant_predictions"
"""The key ``evaluate(..., flag_constant=True)`` adds: 1.0 when every prediction was the same."""


def evaluate(model, task: Task, split: str, *, batch_size: int = 64, flag_constant: bool = False) -> dict[str, float]:
    """The task's metrics on ``split`` plus its mean ``loss`` (and ``CONSTANT`` with ``flag_constant``)."""
    preds, refs, loss = predict_split(model, task, split, batch_size=batch_size)
    scores = task.score(preds, refs)
    out = {**{k: float(v) for k, v in scores.items()}, "loss": loss}
    if flag_constant:
        out[CONSTANT] = float(is_constant(preds))
    return out


def is_constant(predictions: list) -> bool:
    """Whether a model predicted one class (one tag everywhere) or one score for every row: a
    degenerate run, whatever its metric says. Scores closer than float32 resolution count as one."""
    flat = [p for row in predictions for p in row] if predictions and isinstance(predictions[0], list) \
        else list(predictions)
    if not flat:
        return False
    values = np.asarray(flat, dtype=float)
    return bool(np.ptp(values) <= 1e-6 * max(1.0, float(np.abs(values).max())))
