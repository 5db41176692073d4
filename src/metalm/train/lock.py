"""One writer per run folder.

``run_lock(folder)`` creates ``folder/.lock`` atomically (``O_CREAT | O_EXCL``) holding the pid,
host and start time of the process, and removes it on exit. A second run in the same folder is
refused with a message naming the holder. A lock whose holder is dead (same host, no such pid) is
taken over, with a note; a lock from another host is never taken over, since its pid cannot be
checked from here. ``check_writable`` fails early, before any data is loaded, when the folder
cannot be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from metalm.config import ConfigError

LOCK = ".lock"


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


def check_writable(folder: str | Path) -> None:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {folder} is not writable ({err.strerror or err})") from err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return True


@contextlib.contextmanager
def run_lock(folder: str | Path, *, note=None) -> Iterator[Path]:
    """Holds ``folder/.lock`` for the duration of the ``with`` block."""
    folder = Path(folder)
    created = not folder.exists()
    check_writable(folder)
    path = folder / LOCK
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        if _try_create(path, record):
            break
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = None
        if holder is None:  # unreadable or being written: a crashed writer left it, or a race
            time.sleep(0.05)
            if path.exists():
                try:
                    holder = json.loads(path.read_text())
                except (OSError, ValueError):
                    path.unlink(missing_ok=True)
                    continue
            else:
                continue
        same_host = holder.get("host") == record["host"]
        if holder.get("pid") == record["pid"] and same_host:
            raise RunFolderBusy(f"{folder} is already in use by this process (a run inside another run's folder?)")
        if same_host and not _alive(int(holder.get("pid", -1))):
            if note is not None:
                note(f"took over the lock of {folder} from process {holder.get('pid')}, which is no longer running")
            path.unlink(missing_ok=True)
            continue
        raise RunFolderBusy(f"{folder} is in use by process {holder.get('pid')} on {holder.get('host')} "
                            f"(since {holder.get('started')}); wait for it to finish, or use another output_dir")
    else:
        raise RunFolderBusy(f"{folder}: could not take the lock {path}")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == record["pid"]:
                path.unlink()
        if created:  # a run that failed before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


__all__ = ["run_lock", "check_writable", "RunFolderBusy", "LOCK"]
