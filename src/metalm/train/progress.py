"""Progress that works everywhere: a tqdm bar on a terminal, plain log lines elsewhere.

Redirected to a file or run under a scheduler, a tqdm bar either prints nothing (``disable=None``)
or fills the log with carriage returns. ``Progress`` draws the bar when stderr is a terminal and
otherwise writes one line every ``interval`` seconds (``$METALM_PROGRESS_SECONDS``, default 30) and
one at the end: position, rate, ETA and the latest postfix (the loss, the cell being run).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TextIO

from tqdm.auto import tqdm


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def quiet_libraries() -> None:
    """Silences transformers' load reports and bars (metalm reports progress itself); the CLI and
    each worker process of a sweep call it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def note(message: str, *, stream: TextIO | None = None) -> None:
    """One line of run status (a resume, a skipped cell) on stderr, whatever the terminal."""
    stream = stream or sys.stderr
    print(f"metalm: {message}", file=stream, flush=True)


class Progress:
    """Iterates ``iterable`` and reports progress.

    Args:
        enabled: False reports nothing (tests, nested runs).
        interval: seconds between log lines when stderr is not a terminal.
        stream: where the log lines go (default stderr); a given stream is never treated as a terminal.
    """

    def __init__(self, iterable: Iterable, *, desc: str, total: int | None = None, initial: int = 0,
                 enabled: bool = True, interval: float | None = None, stream: TextIO | None = None):
        self.iterable, self.desc, self.initial = iterable, desc, initial
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        if self.total is not None and hasattr(iterable, "__len__") and total is None:
            self.total += initial
        self.enabled = enabled
        self.interval = float(os.environ.get("METALM_PROGRESS_SECONDS", 30) if interval is None else interval)
        self.stream = stream or sys.stderr
        self.terminal = stream is None and enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.postfix = ""
        self.done = initial
        self.bar = tqdm(total=self.total, initial=initial, desc=desc, dynamic_ncols=True) if self.terminal else None
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.done += 1
                if self.bar is not None:
                    self.bar.update(1)
                elif self.enabled and time.monotonic() - self.last >= self.interval:
                    self._line()
        finally:
            self.close()

    def set_postfix(self, **values) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        elapsed = now - self.start
        ran = self.done - self.initial
        rate = ran / elapsed if elapsed > 0 else 0.0
        where = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        if self.total:
            where += f" ({100 * self.done / self.total:.0f}%)"
        parts = [f"{self.desc} {where}", f"{rate:.2f} it/s" if rate >= 0.1 else f"{1 / rate:.1f} s/it" if rate else ""]
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print("metalm: " + ", ".join(p for p in parts if p), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done > self.initial and self.last is not None:
            self._line(final=True)
        self.enabled = False
