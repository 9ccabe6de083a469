"""Every output file is written one way: atomically, and a failure is one clear
error naming the file (checkpoints, log records, tables, JSON, plots, predictions)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Callable

from . import cli


class OutputError(cli.RunError):
    """An output file could not be written; the message names it and why (a command
    ends with it as one `error:` line, exit 1)."""


def write_atomic(path: str | os.PathLike, content: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write `content` (bytes, text, or a function writing to a binary file) to `path`:
    a temporary file in the same folder, flushed to disk, then renamed over `path`. A
    crash leaves the old file or the new one, never half of one; a failed write (full
    disk, quota, permissions, a serializer error) removes the temporary file, leaves
    the old file as it was and raises `OutputError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a short write as RuntimeError
        try:
            tmp.unlink()
        except OSError:
            pass
        why = cli.describe_os_error(err) if isinstance(err, OSError) else first_line(err)
        raise OutputError(f"cannot write {path} ({why})") from None
    return path


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    """`obj` as JSON (NaN and infinities as null), atomically."""
    return write_atomic(path, json.dumps(cli.json_safe(obj), indent=indent, allow_nan=False))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    if "file write failed" in text or "unexpected pos" in text:
        return "the disk is full or the file size limit was reached"
    return (text.splitlines() or [type(err).__name__])[0][:200]


class FolderLock:
    """One run per output folder: an exclusive `flock` on `<folder>/.ncl_fast.lock`,
    held while the run lasts. The kernel drops it when the process ends however it
    ends (a kill included), so it never goes stale. `acquire()` returns None, or the
    holder's description when another process holds it."""

    NAME = ".ncl_fast.lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME
        self._file = None

    def acquire(self) -> str | None:
        import fcntl
        import socket

        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return holder
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
