"""Evaluation: predictions of a task head over a split, scored with the task's metrics."""

from __future__ import annotations

import torch

from metalm.data.batching import to_device
from metalm.tasks.kinds import predict, task_loss
from metalm.tasks.task import Task, gather_tokens


@torch.no_grad()
def predict_split(model, task: Task, split: str, *, batch_size: int = 64) -> tuple[list, list, float]:
    """(predictions, references, mean loss) over a split, in file order."""
    was_training = model.training
    model.eval()
    preds, refs, loss_sum = [], [], 0.0
    device = next(model.parameters()).device
    n = task.size(split)
    for start in range(0, n, batch_size):
        batch = to_device(task.batch(split, range(start, min(n, start + batch_size))), device)
        logits = model(task.name, batch).float()  # bfloat16 under autocast: score in float32
        loss_sum += task_loss(task.kind, logits, batch["labels"]).item() * len(batch["input_ids"])
        p = predict(task.kind, logits).cpu().numpy()
        y = batch["labels"].cpu().numpy()
        if task.kind == "token_classification":
            p_seq, y_seq = gather_tokens(p, y)
            preds.extend(p_seq)
            refs.extend(y_seq)
        else:
            preds.extend(p.tolist())
            refs.extend(y.tolist())
    model.train(was_training)
    return preds, refs, loss_sum / max(n, 1)


def evaluate(model, task: Task, split: str, *, batch_size: int = 64) -> dict[str, float]:
    """The task's metrics on ``split`` plus its mean ``loss``."""
    preds, refs, loss = predict_split(model, task, split, batch_size=batch_size)
    scores = task.score(preds, refs)
    return {**{k: float(v) for k, v in scores.items()}, "loss": loss}
