"""Readers that turn files into records, checking every row as they go.

A record is a plain dict: ``{"text_a": str, "text_b": str (pairs only), "label": int | float}``
for sentence tasks, ``{"tokens": [str], "tags": [int]}`` for token tasks. Readers know
nothing about tokenisers or models; they raise ``DataError`` naming file, line and column.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from collections import Counter
from typing import Any, Callable, Collection, Iterator, Mapping

from metalm.data.errors import DataError

Record = dict[str, Any]
TEXT_FIELDS = ("text_a", "text_b")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def label_parser(kind: str, labels: tuple[str, ...] | None) -> Callable[[Any], int | float]:
    """A function raw value -> label, raising ValueError(expected) on a bad value.

    Args:
        kind: ``"score"`` for a real number, ``"class"`` for one of ``labels``.
        labels: the label names in index order (class labels only). ``"0.0"`` is accepted
            for a label named ``"0"``, as some files write integers as floats.
    """
    if kind == "score":

        def parse_score(raw: Any) -> float:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError("a number (similarity score)") from None
            if not math.isfinite(value):
                raise ValueError("a finite number (similarity score)")
            return value

        return parse_score
    if not labels:
        raise ValueError("a classification task needs its list of labels")
    index = {name: i for i, name in enumerate(labels)}
    expected = f"one of {list(labels)}"

    def parse_class(raw: Any) -> int:
        text = raw.strip() if isinstance(raw, str) else str(raw)
        if text in index:
            return index[text]
        try:
            number = float(text)
        except ValueError:
            raise ValueError(expected) from None
        if number.is_integer() and str(int(number)) in index:
            return index[str(int(number))]
        raise ValueError(expected)

    return parse_class


def read_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, text) pairs; a line that does not decode is a DataError naming it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode(encoding)
            except UnicodeDecodeError as err:
                context = raw[max(0, err.start - 20):err.end + 20]
                raise DataError(path, number, None, f"{encoding} text (set the task's encoding)", context) from None


def _check_nonempty(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, None, "an existing file", "no such file")
    if path.stat().st_size == 0:
        raise DataError(path, None, None, "a non-empty file", "an empty file")


def read_delimited(
    path: str | Path,
    *,
    columns: Mapping[str, str | int],
    parse_label: Callable[[Any], Any] | None,
    delimiter: str = "\t",
    header: bool = True,
    quoting: str = "none",
    comment_prefix: str | None = None,
    encoding: str = "utf-8",
    skip_unlabelled: bool = False,
    allow_empty_text: bool = True,
    allow_extra_fields: bool = True,
    keep: Mapping[str | int, Collection[str]] | None = None,
) -> list[Record]:
    """Reads a TSV/CSV file whose columns are named (with a header) or indexed (without).

    Args:
        path: the file.
        columns: maps record fields (``text_a``, ``text_b``, ``label``) to a header name or a
            0-based column index.
        parse_label: converts the label column; None reads no label (an unlabelled split).
        delimiter: field separator.
        header: whether the first non-comment line is a header.
        quoting: ``"none"`` (GLUE tsv: quotes are text) or ``"csv"`` (standard CSV quoting).
        comment_prefix: lines starting with it are skipped (e.g. ``#`` in SimLex).
        encoding: text encoding of the file.
        skip_unlabelled: drop rows whose label field is empty instead of failing on them.
        allow_empty_text: accept an empty text field (False: an error naming the line and column).
        allow_extra_fields: accept rows with more fields than the header (False: an error).
        keep: column (header name or index) -> allowed values; other rows are skipped before
            their fields are read (an unlabelled test part of the file is never parsed).
    """
    path = Path(path)
    _check_nonempty(path)
    records: list[Record] = []
    lines = _without_comments(read_lines(path, encoding), comment_prefix)
    mode = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines.iter(), delimiter=delimiter, quoting=mode)
    wanted = {f: c for f, c in columns.items() if f != "label" or parse_label is not None}
    positions: dict[str, int] = {}
    if header:
        names = next(reader, None)
        if names is None:
            raise DataError(path, None, None, "a header line and at least one row", "only comments")
        names = [n.strip() for n in names]
        _check_first_line(path, lines.line, names, quoting=quoting, encoding=encoding)
        for field, col in wanted.items():
            positions[field] = _header_position(path, lines.line, names, field, col)
        filters = {_header_position(path, lines.line, names, "filter", col): set(v) for col, v in (keep or {}).items()}
    else:
        filters = {_filter_index(path, col): set(v) for col, v in (keep or {}).items()}
        positions = {field: col for field, col in wanted.items() if isinstance(col, int)}
        named = [c for c in wanted.values() if not isinstance(c, int)]
        if named:
            raise DataError(path, None, named[0], "a column index (the file has no header)", named[0])
    width = max([*positions.values(), *filters], default=-1) + 1
    seen: Counter = Counter()  # the filtered columns' values, for the message when none is kept
    for row in reader:
        line = lines.line
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) < width:
            raise DataError(
                path, line, None,
                f"a row with at least {width} {_sep_name(delimiter)}-separated fields", f"{len(row)} field(s)",
            )
        if filters and not all(row[pos].strip() in allowed for pos, allowed in filters.items()):
            seen.update(row[pos].strip() for pos in filters)
            continue
        if skip_unlabelled and "label" in positions and not row[positions["label"]].strip():
            continue  # an unlabelled row in a labelled file, dropped on request
        if header and not allow_extra_fields and len(row) > len(names):
            raise DataError(path, line, None, f"at most {len(names)} {_sep_name(delimiter)}-separated fields, as the "
                            "header (set the task's allow_extra_fields: true to accept more"
                            + (", or quoting: csv if fields are quoted" if quoting == "none" else "") + ")",
                            f"{len(row)} fields")
        record = _make_record(path, line, row, positions, columns, parse_label)
        if not allow_empty_text:
            for field in ("text_a", "text_b"):
                if field in record and not record[field]:
                    raise DataError(path, line, columns[field], "a non-empty text (set the task's "
                                    "allow_empty_text: true to accept empty ones)", "an empty field")
        records.append(record)
    if not records:
        if seen:
            raise _filtered_out(path, keep, seen)
        raise DataError(path, None, None, "at least one data row", "no rows")
    return records


def _filter_index(path: Path, col: str | int) -> int:
    if isinstance(col, int):
        return col
    raise DataError(path, None, col, "a column index in the filter (the file has no header)", col)


def _filtered_out(path: Path, keep: Mapping, seen: Counter) -> DataError:
    wanted = "; ".join(f"{col} in {sorted(v)}" for col, v in keep.items())
    common = ", ".join(f"{v!r} ({n})" for v, n in seen.most_common(8))
    return DataError(path, None, None, f"at least one row with {wanted} (the task's filter)",
                     f"none; the filtered columns hold {common}")


def _check_first_line(path: Path, line: int, names: list[str], *, quoting: str, encoding: str) -> None:
    """A header that shows the file was read with the wrong settings: say which setting to use."""
    if names and names[0].startswith("\ufeff"):
        raise DataError(path, line, None, "a header without a byte-order mark (set the task's encoding: utf-8-sig)",
                        f"header {names}")
    quoted = [n for n in names if len(n) >= 2 and n[0] == n[-1] == '"']
    if quoting == "none" and quoted:
        raise DataError(path, line, None, "header names without quotes (the file is CSV-quoted: set the task's "
                        "quoting: csv)", f"header {names}")


def _sep_name(delimiter: str) -> str:
    return {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))


def _header_position(path: Path, line: int, names: list[str], field: str, col: str | int) -> int:
    if isinstance(col, int):
        if col >= len(names):
            raise DataError(path, line, col, f"a header with at least {col + 1} columns", names)
        return col
    if col not in names:
        raise DataError(path, line, col, f"a header column named {col!r} (for {field})", f"header {names}")
    return names.index(col)


def _make_record(path, line, row, positions, columns, parse_label) -> Record:
    record: Record = {}
    for field, pos in positions.items():
        raw = row[pos]
        if field == "label":
            try:
                record["label"] = parse_label(raw)
            except ValueError as err:
                raise DataError(path, line, columns[field], str(err), raw) from None
        else:
            record[field] = raw.strip()
    return record


class _without_comments:
    """Feeds lines to csv.reader, skipping comments and keeping the physical line number."""

    def __init__(self, numbered_lines: Iterator[tuple[int, str]], prefix: str | None):
        self.numbered_lines, self.prefix, self.line = numbered_lines, prefix, 0

    def iter(self) -> Iterator[str]:
        for self.line, text in self.numbered_lines:
            if self.prefix and text.startswith(self.prefix):
                continue
            yield text


def read_jsonl(
    path: str | Path, *, columns: Mapping[str, str | int], parse_label: Callable[[Any], Any] | None,
    encoding: str = "utf-8", keep: Mapping[str | int, Collection[str]] | None = None,
) -> list[Record]:
    """Reads one JSON object per line; ``columns`` maps record fields to object keys; ``keep``
    (key -> allowed values) skips the objects that do not match."""
    path = Path(path)
    _check_nonempty(path)
    records = []
    seen: Counter = Counter()
    for line, text in read_lines(path, encoding):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, line, None, f"a JSON object ({err.msg})", text.strip()) from None
        if not isinstance(obj, dict):
            raise DataError(path, line, None, "a JSON object", obj)
        if keep:
            values = {key: obj.get(str(key)) for key in keep}
            if not all(isinstance(v, str) and v.strip() in keep[k] for k, v in values.items()):
                seen.update(str(v) for v in values.values())
                continue
        records.append(_record_from_mapping(path, line, obj, columns, parse_label))
    if not records:
        if seen:
            raise _filtered_out(path, keep, seen)
        raise DataError(path, None, None, "at least one JSON line", "no rows")
    return records


def _record_from_mapping(path, line, obj: Mapping, columns, parse_label) -> Record:
    record: Record = {}
    for field, key in columns.items():
        if field == "label" and parse_label is None:
            continue
        if key not in obj:
            raise DataError(path, line, key, f"a field named {key!r} (for {field})", f"keys {sorted(obj)}")
        raw = obj[key]
        if field == "label":
            try:
                record["label"] = parse_label(raw)
            except ValueError as err:
                raise DataError(path, line, key, str(err), raw) from None
        else:
            if not isinstance(raw, str):
                raise DataError(path, line, key, "a string", raw)
            record[field] = raw.strip()
    return record


def read_conll(path: str | Path, *, parse_label: Callable[[Any], Any], delimiter: str = "\t",
               encoding: str = "utf-8") -> list[Record]:
    """Reads ``token<TAB>tag`` lines, one sentence per blank-line-separated block."""
    path = Path(path)
    _check_nonempty(path)
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[int] = []
    for line, text in read_lines(path, encoding):
        text = text.rstrip("\n").rstrip("\r")
        if not text.strip():
            if tokens:
                records.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        parts = text.split(delimiter)
        if len(parts) < 2 or not parts[0]:
            raise DataError(path, line, None, "a line 'token<TAB>tag'", text)
        try:
            tags.append(parse_label(parts[-1].strip()))
        except ValueError as err:
            raise DataError(path, line, 1, str(err), parts[-1]) from None
        tokens.append(parts[0])
    if tokens:
        records.append({"tokens": tokens, "tags": tags})
    if not records:
        raise DataError(path, None, None, "at least one sentence", "no tokens")
    return records


def read_fasttext(path: str | Path, *, parse_label: Callable[[Any], Any], prefix: str = "__label__",
                  encoding: str = "utf-8") -> list[Record]:
    """Reads fastText lines ``__label__X text``."""
    path = Path(path)
    _check_nonempty(path)
    records = []
    for line, text in read_lines(path, encoding):
        if not text.strip():
            continue
        head, _, body = text.strip().partition(" ")
        if not head.startswith(prefix) or not body.strip():
            raise DataError(path, line, None, f"'{prefix}LABEL text'", text.strip())
        try:
            label = parse_label(head[len(prefix):])
        except ValueError as err:
            raise DataError(path, line, "label", str(err), head[len(prefix):]) from None
        records.append({"text_a": body.strip(), "label": label})
    if not records:
        raise DataError(path, None, None, "at least one line", "no rows")
    return records


def read_analogy(path: str | Path, *, parse_label: Callable[[Any], Any], encoding: str = "utf-8") -> list[Record]:
    """Word pairs labelled with their relation, from word2vec's ``questions-words.txt`` format.

    Sections start with ``: category``; each line ``a b c d`` holds two pairs of that
    category, (a, b) and (c, d). Every distinct pair becomes one record, in file order.
    """
    path = Path(path)
    _check_nonempty(path)
    records, seen, category = [], set(), None
    for line, text in read_lines(path, encoding):
        text = text.strip()
        if not text:
            continue
        if text.startswith(":"):
            name = text[1:].strip()
            try:
                category = parse_label(name)
            except ValueError as err:
                raise DataError(path, line, "category", str(err), name) from None
            continue
        words = text.split()
        if category is None or len(words) != 4:
            raise DataError(path, line, None, "': category' then lines of four words", text)
        for a, b in ((words[0], words[1]), (words[2], words[3])):
            if (a, b, category) not in seen:
                seen.add((a, b, category))
                records.append({"text_a": a, "text_b": b, "label": category})
    if not records:
        raise DataError(path, None, None, "at least one analogy line", "none")
    return records


TWOMOONS_KEYS = {"points": int, "noise": float, "seed": int}


def parse_twomoons_recipe(recipe: str) -> dict[str, Any]:
    """``"points=1000 noise=0.1 seed=21"`` -> {points: 1000, noise: 0.1, seed: 21}; ValueError(what is wrong)."""
    values: dict[str, Any] = {}
    for part in recipe.split():
        key, sep, raw = part.partition("=")
        if not sep or key not in TWOMOONS_KEYS:
            raise ValueError(f"{part!r} is not one of {', '.join(k + '=...' for k in TWOMOONS_KEYS)}")
        try:
            values[key] = TWOMOONS_KEYS[key](raw)
        except ValueError:
            raise ValueError(f"{key} must be {'an integer' if TWOMOONS_KEYS[key] is int else 'a number'}, "
                             f"got {raw!r}") from None
    missing = [k for k in TWOMOONS_KEYS if k not in values]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (e.g. 'points=1000 noise=0.1 seed=21')")
    if values["points"] < 2 or values["noise"] < 0 or values["seed"] < 0:
        raise ValueError(f"points must be >= 2, noise >= 0 and seed >= 0, got {recipe!r}")
    return values


def read_twomoons(recipe: str, *, parse_label: Callable[[Any], Any]) -> list[Record]:
    """Two Moons points (Shen, §4.2) generated from a recipe ``points=N noise=S seed=R`` instead of a
    file: scikit-learn's ``make_moons`` numbers, scaled and floored to the 64 x 64 grid of Shen's
    codec, each point one record whose text is its two coordinates (``"17 40"``) and whose label is
    its moon (``"0"`` or ``"1"``)."""
    from metalm.teacher import twomoons as tm

    try:
        values = parse_twomoons_recipe(recipe)
    except ValueError as err:
        raise DataError(f"twomoons:{recipe}", None, None, str(err), recipe) from None
    points, labels = tm.make_moons(values["points"], noise=values["noise"], seed=values["seed"])
    grid = tm.to_grid(points)
    return [{"text_a": f"{x} {y}", "label": parse_label(str(label))} for (x, y), label in zip(grid.tolist(), labels.tolist())]
