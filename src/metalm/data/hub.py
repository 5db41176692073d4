"""Hugging Face Hub datasets (``datasets.load_dataset``) as records.

The same call reads a Hub dataset by name (``nyu-mll/glue``, config ``rte``) or a builder
over local files (``csv`` / ``json`` with ``data_files``); tests use the latter, since the
Hub is unreachable offline.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from metalm.data.errors import DataError
from metalm.data.readers import Record, _record_from_mapping


def read_hub(
    path: str,
    *,
    split: str,
    columns: Mapping[str, str | int],
    parse_label: Callable[[Any], Any] | None,
    name: str | None = None,
    data_files: Mapping[str, str] | None = None,
    revision: str | None = None,
) -> list[Record]:
    """Loads one split of a dataset and maps its columns to record fields.

    Integer labels of a ``ClassLabel`` column are turned into their names first, so a task's
    label list (by name) applies whatever order the dataset uses. Rows with label -1 (GLUE's
    unlabelled test sets) are an error: evaluate only on labelled splits.
    """
    import datasets  # heavy import, only when a Hub task is used

    where = f"{path}{'/' + name if name else ''}[{split}]"
    try:
        ds = datasets.load_dataset(path, name, split=split, data_files=dict(data_files) if data_files else None,
                                   revision=revision)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DataError(where, None, None, "a dataset that can be loaded", f"{type(err).__name__}: {err}") from None
    if len(ds) == 0:
        raise DataError(where, None, None, "at least one row", "an empty split")
    label_key = columns.get("label")
    class_names = None
    if label_key is not None and label_key in ds.features:
        feature = ds.features[label_key]
        class_names = getattr(feature, "names", None)
    records = []
    for row_number, row in enumerate(ds, start=1):
        if class_names is not None and parse_label is not None:
            raw = row[label_key]
            if raw == -1:
                raise DataError(where, row_number, label_key, "a labelled row (this split has label -1)", raw)
            row = {**row, label_key: class_names[raw]}
        records.append(_record_from_mapping(where, row_number, row, columns, parse_label))
    return records
