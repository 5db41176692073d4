"""Fine-tuning and scoring of a pre-trained Two Moons student (Shen, §4.2, Table 6)."""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import Tensor

from metalm.learn.functional import trainable_params
from metalm.teacher import objective as obj
from metalm.teacher import twomoons as tm
from metalm.teacher.model import Encoder
from metalm.teacher.pretrain import PAD, adamw, labelled_batch, schedule
from metalm.train.groups import OptimGroup, apply_groups

# Table 6: the batch size grows with the labelled set (10, 20, 40, 80, 160 -> 1, 2, 4, 8, 16).
FINETUNE_BATCH = {10: 1, 20: 2, 40: 4, 80: 8, 160: 16}


def finetune_batch_size(n: int) -> int:
    """Table 6's batch size for ``n`` labelled points; other sizes keep its ratio n/10, within [1, 16]."""
    return FINETUNE_BATCH.get(n, min(16, max(1, n // 10)))


class Labelled(Protocol):
    """A labelled set: ``inputs`` (n, T) ids, ``labels`` (n,), ``label_ids`` (the label tokens),
    ``targets()`` (n, T) the label token repeated over the input."""

    inputs: Tensor
    labels: Tensor
    label_ids: tuple[int, ...]

    def targets(self) -> Tensor: ...


@torch.no_grad()
def predict(student: Encoder, inputs: Tensor, *, label_ids: tuple[int, ...] = (tm.VOCAB.label0, tm.VOCAB.label1),
            chunk: int = 1024) -> Tensor:
    """Labels from the LM head: the label token with the largest logit summed over non-pad positions.

    Args:
        inputs: (n, T) ids, e.g. ``[CLS2] x y [SEP]``.
        label_ids: the label tokens, in label order.

    Returns:
        (n,) int64 label indices.
    """
    was_training = student.training
    student.eval()
    out = []
    for start in range(0, len(inputs), chunk):
        x = inputs[start:start + chunk]
        keep = x != PAD  # (n, T)
        logits = student(x, keep)["output"]  # (n, T, V)
        scores = (logits[..., list(label_ids)] * keep[..., None]).sum(1)  # (n, labels)
        out.append(scores.argmax(-1))
    student.train(was_training)
    return torch.cat(out)


def accuracy(student: Encoder, data: Labelled) -> float:
    return float((predict(student, data.inputs, label_ids=data.label_ids) == data.labels).float().mean())


def finetune(student: Encoder, train: Labelled, val: Labelled, *, epochs: int = 100,
             batch_size: int | None = None, peak_lr: float = 0.04 / 10 ** 0.5, warmup: int = 10,
             weight_decay: float = 0.01, clip: float = 5.0, seed: int = 0) -> dict:
    """Fine-tunes ``student`` in place on ``train`` and leaves it at its best validation accuracy.

    Returns:
        ``{"val_accuracy", "best_epoch", "val_curve"}``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout: the same pre-trained weights fine-tune the same way
    batch_size = batch_size or finetune_batch_size(len(train))
    targets = train.targets()
    params = trainable_params(student)
    loss_fn = obj.student_loss_fn(student)
    optimizer = adamw(student, 1.0, weight_decay)  # lr 1: the schedule's factor is the learning rate
    group = OptimGroup("student", tuple(student.parameters()), optimizer,
                       schedule(optimizer, peak_lr=peak_lr, warmup=warmup), clip)
    best = (-1.0, 0, copy.deepcopy(student.state_dict()))
    curve = []
    student.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=g)
        for start in range(0, len(train), batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(params, labelled_batch(train.inputs[idx], targets[idx]))
            loss.backward()
            apply_groups([group])
        score = accuracy(student, val)
        curve.append(score)
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(student.state_dict()))
    student.load_state_dict(best[2])
    return {"val_accuracy": best[0], "best_epoch": best[1], "val_curve": curve}
