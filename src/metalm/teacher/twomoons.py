"""Two Moons as text (Shen, §4.2): points scaled and floored to integers in [0, 64), one token each.

Unlabelled data are sequences of 16 points sorted by (x, y), written
``[CLS0] x1 y1 x2 y2 ... x16 y16 [SEP]`` (34 tokens, the model's ``max_positions``). A labelled
example is one point ``[CLS2] x y [SEP]`` whose output is its label token repeated over the
input (§4.3), so one LM head serves every task. The MLM task is marked by ``[CLS1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

GRID = 64  # coordinates are integers in [0, GRID)
POINTS_PER_SEQUENCE = 16
# Affine maps of the raw moons (x in about [-1.2, 2.2], y in [-0.7, 1.2] at noise 0.1) onto [0, 64).
X_RANGE = (-1.5, 2.5)
Y_RANGE = (-1.0, 1.5)


@dataclass(frozen=True)
class Vocab:
    """Token ids: specials, task tokens, label tokens, then one token per coordinate value."""

    pad: int = 0
    sep: int = 1
    mask: int = 2
    cls_unlabelled: int = 3  # [CLS0]: the unlabelled text x_u
    cls_mlm: int = 4  # [CLS1]: the MLM task
    cls_moons: int = 5  # [CLS2]: the labelled Two Moons task
    label0: int = 6
    label1: int = 7
    first_coordinate: int = 8

    @property
    def size(self) -> int:
        return self.first_coordinate + GRID

    @property
    def content_ids(self) -> tuple[int, int]:
        """[low, high) of the ids MLM may put at a randomly replaced position."""
        return self.first_coordinate, self.size

    def names(self) -> list[str]:
        special = ["[PAD]", "[SEP]", "[MASK]", "[CLS0]", "[CLS1]", "[CLS2]", "[L0]", "[L1]"]
        return special + [str(c) for c in range(GRID)]

    def decode(self, ids) -> str:
        names = self.names()
        return " ".join(names[int(i)] for i in ids)


VOCAB = Vocab()


def make_moons(n_samples: int, *, noise: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``make_moons(n_samples, shuffle=True, noise, random_state=seed)``, same numbers.

    Written out from its formula so the study needs no scikit-learn at run time (a test checks
    equality against scikit-learn).

    Returns:
        (points (n, 2) float64, labels (n,) int64).
    """
    rng = np.random.RandomState(seed)
    n_out = n_samples // 2
    n_in = n_samples - n_out
    outer = np.stack([np.cos(np.linspace(0, np.pi, n_out)), np.sin(np.linspace(0, np.pi, n_out))], axis=1)
    inner = np.stack([1 - np.cos(np.linspace(0, np.pi, n_in)), 1 - np.sin(np.linspace(0, np.pi, n_in)) - 0.5], axis=1)
    points = np.concatenate([outer, inner])  # (n, 2)
    labels = np.concatenate([np.zeros(n_out, dtype=np.int64), np.ones(n_in, dtype=np.int64)])
    order = np.arange(n_samples)
    rng.shuffle(order)  # sklearn.utils.shuffle draws this permutation first
    points, labels = points[order], labels[order]
    if noise is not None:
        points = points + rng.normal(scale=noise, size=points.shape)
    return points, labels


def to_grid(points: np.ndarray) -> np.ndarray:
    """Scale and floor raw moons to integer coordinates in [0, 64): (n, 2) float -> (n, 2) int64."""
    lo = np.array([X_RANGE[0], Y_RANGE[0]])
    hi = np.array([X_RANGE[1], Y_RANGE[1]])
    scaled = np.floor((points - lo) / (hi - lo) * GRID)
    return np.clip(scaled, 0, GRID - 1).astype(np.int64)


def encode_sequence(grid_points: np.ndarray, *, vocab: Vocab = VOCAB) -> np.ndarray:
    """Points (16, 2) -> ``[CLS0] x1 y1 ... [SEP]`` ids (34,), points sorted by (x, y)."""
    order = np.lexsort((grid_points[:, 1], grid_points[:, 0]))
    coords = grid_points[order].reshape(-1) + vocab.first_coordinate  # (32,)
    return np.concatenate([[vocab.cls_unlabelled], coords, [vocab.sep]]).astype(np.int64)


def decode_sequence(ids, *, vocab: Vocab = VOCAB) -> np.ndarray:
    """The inverse of ``encode_sequence``: ids (34,) -> points (16, 2), in sorted order."""
    ids = np.asarray(ids)
    if ids[0] != vocab.cls_unlabelled or ids[-1] != vocab.sep:
        raise ValueError(f"not an unlabelled Two Moons sequence: {vocab.decode(ids)}")
    coords = ids[1:-1] - vocab.first_coordinate
    if coords.min() < 0 or coords.max() >= GRID:
        raise ValueError(f"non-coordinate token inside a Two Moons sequence: {vocab.decode(ids)}")
    return coords.reshape(-1, 2)


def encode_points(grid_points: np.ndarray, *, vocab: Vocab = VOCAB) -> np.ndarray:
    """Labelled inputs: points (n, 2) -> ids (n, 4) ``[CLS2] x y [SEP]``."""
    n = len(grid_points)
    return np.concatenate([np.full((n, 1), vocab.cls_moons), grid_points + vocab.first_coordinate,
                           np.full((n, 1), vocab.sep)], axis=1).astype(np.int64)


def decode_points(ids, *, vocab: Vocab = VOCAB) -> np.ndarray:
    """The inverse of ``encode_points``: ids (n, 4) -> points (n, 2)."""
    return np.asarray(ids)[:, 1:3] - vocab.first_coordinate


def label_targets(labels: np.ndarray, length: int, *, vocab: Vocab = VOCAB) -> np.ndarray:
    """The label token repeated over the input (§4.3): labels (n,) -> ids (n, length)."""
    return np.repeat((labels + vocab.label0)[:, None], length, axis=1).astype(np.int64)


def unlabelled_sequences(n_sequences: int, *, noise: float, seed: int) -> Tensor:
    """``n_sequences`` sequences of 16 sorted points: (n, 34) int64."""
    points, _ = make_moons(n_sequences * POINTS_PER_SEQUENCE, noise=noise, seed=seed)
    grid = to_grid(points).reshape(n_sequences, POINTS_PER_SEQUENCE, 2)
    return torch.from_numpy(np.stack([encode_sequence(g) for g in grid]))


@dataclass(frozen=True)
class LabelledSet:
    """Labelled Two Moons points as model inputs."""

    inputs: Tensor  # (n, 4) ids
    labels: Tensor  # (n,) 0/1
    points: Tensor  # (n, 2) grid coordinates
    label_ids: tuple[int, ...] = (VOCAB.label0, VOCAB.label1)

    def __len__(self) -> int:
        return len(self.labels)

    def targets(self) -> Tensor:
        """(n, 4) label tokens repeated over the input."""
        return torch.from_numpy(label_targets(self.labels.numpy(), self.inputs.shape[1]))


def labelled_set(n: int, *, noise: float, seed: int) -> LabelledSet:
    points, labels = make_moons(n, noise=noise, seed=seed)
    grid = to_grid(points)
    return LabelledSet(torch.from_numpy(encode_points(grid)), torch.from_numpy(labels), torch.from_numpy(grid))


def all_grid_inputs() -> Tensor:
    """Every possible input, (4096, 4) ids, row-major over (x, y)."""
    xs, ys = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    return torch.from_numpy(encode_points(np.stack([xs.ravel(), ys.ravel()], axis=1)))
