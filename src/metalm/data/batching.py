"""Dynamic padding and resumable, seeded batch streams."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from metalm.contracts import Batch  # noqa: F401  (defined with the other contracts, re-exported)
from metalm.data.tokenize import IGNORE_INDEX


def collate(columns: Mapping[str, Sequence], indices: Sequence[int], *, pad_id: int) -> Batch:
    """Pads the selected rows to the longest of them.

    Columns are lists of rows, or ``RaggedColumn``s (cached, Arrow-backed), whose rows are padded
    in NumPy without becoming Python lists.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T), ``token_type_ids`` (B, T) when the
        tokenizer has them, and ``labels``: (B,) per sentence or (B, T) per token.
    """
    ids, lengths = _padded(columns["input_ids"], indices, pad_id)  # (B, T), (B,)
    longest = ids.shape[1]
    batch = {
        "input_ids": torch.as_tensor(ids, dtype=torch.long),  # (B, T)
        "attention_mask": (torch.arange(longest)[None, :] < torch.as_tensor(lengths)[:, None]).long(),  # (B, T)
    }
    if "token_type_ids" in columns:
        batch["token_type_ids"] = torch.as_tensor(_padded(columns["token_type_ids"], indices, 0)[0],
                                                  dtype=torch.long)  # (B, T)
    if "input_ids_b" in columns:  # bi-encoded pairs: the second texts, padded on their own
        ids_b, lengths_b = _padded(columns["input_ids_b"], indices, pad_id)  # (B, T_b), (B,)
        batch["input_ids_b"] = torch.as_tensor(ids_b, dtype=torch.long)
        batch["attention_mask_b"] = (torch.arange(ids_b.shape[1])[None, :]
                                     < torch.as_tensor(lengths_b)[:, None]).long()  # (B, T_b)
        if "token_type_ids_b" in columns:
            batch["token_type_ids_b"] = torch.as_tensor(_padded(columns["token_type_ids_b"], indices, 0)[0],
                                                        dtype=torch.long)  # (B, T_b)
    labels = columns["labels"]
    if hasattr(labels, "padded") or isinstance(labels[indices[0]], list):
        batch["labels"] = torch.as_tensor(_padded(labels, indices, IGNORE_INDEX)[0], dtype=torch.long)  # (B, T)
    else:
        batch["labels"] = torch.tensor([labels[i] for i in indices])  # (B,)
    return batch


def _padded(column: Sequence, indices: Sequence[int], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) rows padded with ``pad`` to the longest, and (B,) lengths, from a list or ``RaggedColumn``."""
    if hasattr(column, "padded"):
        return column.padded(indices, pad)
    rows = [column[i] for i in indices]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lengths.max())
    return np.array([r + [pad] * (longest - len(r)) for r in rows], dtype=np.int64), lengths


def to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class BatchStream:
    """Endless shuffled batches of row indices; its whole state is (epoch, position).

    Epoch ``e`` uses the permutation drawn from ``seed`` and ``e``, so a stream restored
    from its state continues with exactly the batches it would have produced. With ``lengths``
    ((size,) tokens per row), each epoch's batches hold rows of similar length
    (``metalm.data.length_grouping.length_grouped_order``, ``pool`` batches per sorted pool).
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int = 0, position: int = 0,
                 lengths: Sequence[int] | None = None, pool: int | None = None):
        if size < 1:
            raise ValueError("cannot stream an empty dataset")
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"lengths has {len(lengths)} rows for a stream of {size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.lengths, self.pool = (None if lengths is None else np.asarray(lengths)), pool
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size)
        if self.lengths is None:
            return order
        from metalm.data.length_grouping import POOL_BATCHES, length_grouped_order

        return length_grouped_order(order, self.lengths, batch_size=self.batch_size, rng=rng,
                                    pool=self.pool or POOL_BATCHES)

    def next_indices(self) -> list[int]:
        """The next batch; the last batch of an epoch may be smaller."""
        if self.position >= self.size:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        chunk = self._order[self.position:self.position + self.batch_size]
        self.position += len(chunk)
        return chunk.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
