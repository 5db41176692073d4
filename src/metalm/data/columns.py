"""Cached columns read straight from Arrow, without converting every row to Python lists.

A cached split is a handful of columns: ragged ones (``input_ids``, token labels, ...: one list of
ints per row) and flat ones (sentence labels, ``next``). ``Dataset.to_dict()`` turned every row of
every ragged column into a Python list on load (0.5 s of SST-2's 67k sentences, half the cached
load). Here a ragged column stays two NumPy arrays over the memory-mapped Arrow buffers (all
values, and each row's offsets) behind ``RaggedColumn``: ``collate`` pads a batch's rows straight
from them (``padded``), a single row read is a small slice made a list, and only iterating the
whole column converts it in bulk. Flat numeric columns become Python lists through NumPy (fast).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Iterator

import numpy as np


class RaggedColumn(Sequence):
    """A read-only column of variable-length int rows: ``column[i]`` is row i as a Python list.

    Args:
        values: (N_total,) every row's values, back to back.
        offsets: (rows + 1,) row i is ``values[offsets[i]:offsets[i + 1]]``.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) < 1:
            raise ValueError("offsets must be a non-empty 1-d array")
        self.values, self.offsets = values, offsets
        self._flat: list | None = None  # values and offsets as Python lists, made when the column is iterated
        self._bounds: list[int] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {index} out of range for a column of {n} rows")
        if self._flat is not None:  # the whole column was already made lists (iteration)
            return self._flat[self._bounds[i]:self._bounds[i + 1]]
        return self.values[self.offsets[i]:self.offsets[i + 1]].tolist()

    def padded(self, indices: Sequence[int], pad: int | float) -> tuple[np.ndarray, np.ndarray]:
        """The rows ``indices`` padded with ``pad`` to the longest of them, in NumPy (no Python lists).

        Returns:
            (B, T) the padded rows, and (B,) their lengths.
        """
        rows = np.asarray(indices, dtype=np.int64)  # (B,)
        starts = self.offsets[rows]  # (B,)
        lengths = self.offsets[rows + 1] - starts  # (B,)
        longest = int(lengths.max()) if len(rows) else 0
        out = np.full((len(rows), longest), pad, dtype=self.values.dtype)  # (B, T)
        inside = np.arange(longest)[None, :] < lengths[:, None]  # (B, T)
        out[inside] = self.values[(starts[:, None] + np.arange(longest)[None, :])[inside]]
        return out, lengths

    def _lists(self) -> tuple[list, list[int]]:
        """Values and offsets as Python lists, for reading the whole column (one bulk conversion; a
        NumPy slice + ``tolist`` per row was ~2x slower over a whole column)."""
        if self._flat is None:
            self._flat, self._bounds = self.values.tolist(), self.offsets.tolist()
        return self._flat, self._bounds

    def __iter__(self) -> Iterator[list]:
        flat, bounds = self._lists()
        for i in range(len(self)):
            yield flat[bounds[i]:bounds[i + 1]]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RaggedColumn):
            return (len(self) == len(other) and np.array_equal(self.lengths(), other.lengths())
                    and np.array_equal(self.values[self.offsets[0]:self.offsets[-1]],
                                       other.values[other.offsets[0]:other.offsets[-1]]))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # mutable-looking container semantics, as list

    def lengths(self) -> np.ndarray:
        """(rows,) the length of every row."""
        return np.diff(self.offsets)

    def tolist(self) -> list[list]:
        return list(self)

    def __repr__(self) -> str:
        return f"RaggedColumn({len(self)} rows, {len(self.values)} values)"


def arrow_columns(table) -> dict[str, Sequence]:
    """The columns of a ``pyarrow.Table`` (e.g. ``datasets.Dataset.data.table``): list columns of ints
    or floats as ``RaggedColumn`` (zero-copy where Arrow allows), numeric columns as Python lists,
    anything else (strings, nested lists, nulls) as ``to_pylist()``."""
    import pyarrow as pa

    out: dict[str, Sequence] = {}
    for name in table.column_names:
        column = table.column(name)
        array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        kind = array.type
        if array.null_count:
            out[name] = array.to_pylist()
        elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _numeric(kind.value_type) \
                and not array.values.null_count:
            out[name] = RaggedColumn(array.values.to_numpy(zero_copy_only=False), array.offsets.to_numpy())
        elif _numeric(kind):
            out[name] = array.to_numpy(zero_copy_only=False).tolist()
        else:
            out[name] = array.to_pylist()
    return out


def _numeric(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def row_lengths(column: Sequence) -> np.ndarray:
    """(rows,) the length of every row of a ragged column (a ``RaggedColumn`` or a list of lists)."""
    if isinstance(column, RaggedColumn):
        return column.lengths()
    return np.fromiter((len(row) for row in column), dtype=np.int64, count=len(column))
