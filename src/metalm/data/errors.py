"""The one error type for bad input data, naming where it is and what was expected."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: which file, which line, which column, what was expected, what was found.

    Args:
        path: the file (or dataset name) being read.
        line: 1-based physical line number, or None when the problem is the whole file.
        column: the column (header name or index), or None.
        expected: what a valid value looks like.
        got: what was found instead (shortened when long).
    """

    def __init__(self, path, line: int | None, column, expected: str, got=None):
        self.path, self.line, self.column, self.expected, self.got = path, line, column, expected, got
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        message = f"{where}: expected {expected}"
        if got is not None:
            shown = repr(got)
            message += f", got {shown[:80] + '…' if len(shown) > 80 else shown}"
        super().__init__(message)
