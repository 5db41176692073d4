"""Data layer: readers, tokenisation with an Arrow cache, subsampling, batching."""

from metalm.data.errors import DataError

__all__ = ["DataError"]
