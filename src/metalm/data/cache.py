"""A content-addressed Arrow cache: tokenise once, load in milliseconds afterwards.

The key holds everything the result depends on (input file digests, the task spec, the
tokenizer, the maximum length). A dataset is written to a temporary folder and renamed
into place only when complete, so a failure, bad input or a kill leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

CACHE_VERSION = 1
DONE = "metalm-cache.json"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_columns(key_parts: dict[str, Any], build: Callable[[], dict[str, list]],
                   cache_dir: str | Path | None) -> dict[str, list]:
    """The columns ``build()`` returns, read from the cache when present (ragged columns then as
    ``metalm.data.columns.RaggedColumn``: a sequence whose rows are Python lists, as ``build()``'s).

    Args:
        key_parts: JSON-serialisable description of everything the result depends on.
        build: computes the columns; an exception propagates and nothing is cached.
        cache_dir: where entries live; None disables caching.
    """
    if cache_dir is None:
        return build()
    import datasets

    datasets.disable_progress_bars()
    cache_dir = Path(cache_dir)
    folder = cache_dir / cache_key(key_parts)
    if (folder / DONE).exists():
        from metalm.data.columns import arrow_columns

        dataset = datasets.load_from_disk(str(folder))
        if dataset._indices is not None:  # never written so; keep the rows' order if it ever is
            dataset = dataset.flatten_indices()
        return arrow_columns(dataset.data.table)  # ragged columns stay Arrow-backed (RaggedColumn)
    columns = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    try:
        datasets.Dataset.from_dict(columns).save_to_disk(str(tmp))
        (tmp / DONE).write_text(json.dumps(key_parts, sort_keys=True, default=str, indent=1))
        if folder.exists():  # an incomplete entry left by an older version: replace it
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / DONE).exists():  # not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return columns
