"""Reference scores computed from the data, drawn beside every study's methods.

A method is only worth reporting if it beats what needs no training at all: always answering
the most frequent class of the scored split (classification), always answering one score
(regression: every correlation of a constant is 0), and, for tasks that score the similarity of
two texts, the cosine between the encoder's pooled embeddings of each text, used zero-shot.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from metalm.tasks import metrics
from metalm.tasks.spec import TaskSpec, read_split

MAJORITY, CONSTANT_MEAN, ZERO_SHOT = "majority class", "constant mean", "zero-shot cosine"


def majority_reference(spec: TaskSpec, split: str, labels: Sequence) -> list[dict]:
    """Every metric of the spec for the constant prediction of the split's most frequent class
    (the best a one-class predictor can do on accuracy; MRPC's F1 of 81.6 on dev is this)."""
    if not len(labels):
        return []
    majority = Counter(labels).most_common(1)[0][0]
    scores = metrics.compute(spec.metrics, [majority] * len(labels), list(labels))
    return [_row(MAJORITY, spec, split, metric, value) for metric, value in scores.items()]


def constant_reference(spec: TaskSpec, split: str, labels: Sequence, *, train_labels: Sequence) -> list[dict]:
    """Every metric for predicting the mean training score on every row of ``split``."""
    if not len(labels):
        return []
    constant = float(np.mean(train_labels)) if len(train_labels) else 0.0
    scores = metrics.compute(spec.metrics, [constant] * len(labels), list(labels))
    return [_row(CONSTANT_MEAN, spec, split, metric, value) for metric, value in scores.items()]


@torch.no_grad()
def zero_shot_cosine(model, tokenizer, spec: TaskSpec, records: Sequence[dict], split: str, *,
                     max_length: int, batch_size: int = 64) -> list[dict]:
    """Every metric of the spec for cos(embed(text_a), embed(text_b)) with the encoder as loaded."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        sides = []
        for field in ("text_a", "text_b"):
            vectors = []
            texts = [r[field] for r in records]
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], max_length=max_length, truncation=True,
                                  padding=True, return_tensors="pt")
                vectors.append(model.embed({k: v.to(device) for k, v in batch.items()}).float())  # (B, H)
            sides.append(torch.cat(vectors))  # (N, H)
        cosine = torch.nn.functional.cosine_similarity(sides[0], sides[1], dim=-1)  # (N,)
    finally:
        model.train(was_training)
    scores = metrics.compute(spec.metrics, cosine.cpu().tolist(), [r["label"] for r in records])
    return [_row(ZERO_SHOT, spec, split, metric, value) for metric, value in scores.items()]


def has_text_pairs(spec: TaskSpec) -> bool:
    return spec.kind == "regression" and "text_b" in spec.columns


def task_references(spec: TaskSpec, splits: Sequence[str], *, data, model=None, tokenizer=None,
                    max_length: int = 128) -> list[dict]:
    """The references for each reported split of a target (token tasks have none)."""
    if spec.kind == "token_classification":
        return []
    read = lambda split: read_split(spec, split, root=data.root, glue=data.glue, source=data.source)  # noqa: E731
    out = []
    train_labels = [r["label"] for r in read("train")] if spec.kind == "regression" else []
    for split in splits:
        records = read(split)
        labels = [r["label"] for r in records]
        if spec.kind == "regression":
            out += constant_reference(spec, split, labels, train_labels=train_labels)
            if model is not None and has_text_pairs(spec):
                out += zero_shot_cosine(model, tokenizer, spec, records, split, max_length=max_length)
        else:
            out += majority_reference(spec, split, labels)
    return out


def _row(name: str, spec: TaskSpec, split: str, metric: str, value: float) -> dict:
    return {"reference": name, "target": spec.name, "split": split, "metric": metric, "value": float(value)}
