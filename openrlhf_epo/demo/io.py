"""Crash-safe file writes for the demo's metrics, run files, plots and summaries.

Every function writes a temporary file beside the target (same directory, so the rename stays on
one filesystem), flushes and fsyncs it, then renames it over the target with os.replace. A reader
therefore sees either the old file or the new one, never a half-written one. A crash between the
write and the rename leaves the old file untouched and a stray `.<name>.tmp-*` file beside it,
which nothing reads. Concurrent writers to one path are not coordinated: the last rename wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; some platforms cannot open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace `path` with `data`."""
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    # O_EXCL: never write into someone else's file; mode 0o666 lets the umask decide, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replace `path` with `text`, UTF-8 encoded."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON (sorted keys, a final newline).

    NaN and infinity are written as Python's json writes them (NaN, Infinity); json.load reads them back.
    """
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
