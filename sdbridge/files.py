"""Atomic file writes: the one way sdbridge writes a file (checkpoints, summaries, metrics, images, videos, caches).

A file is written to a temporary sibling in the same folder (so the rename never crosses a file system), flushed
and fsynced, renamed over the target with ``os.replace`` and the folder fsynced. A reader sees the previous file or
the new one, never a part of one; a write that fails (disk full, read-only file system, a killed process) leaves the
previous file as it was, removes its temporary file and raises :class:`WriteFailed` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import IO, Any, Iterator


class WriteFailed(OSError):
    """A file could not be written; the previous version of it (if any) is unchanged and no temporary file is left."""

    def __init__(self, path: Path, reason: BaseException):
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        super().__init__(getattr(reason, "errno", None), f"could not write {path}: {text}")
        self.path = Path(path)
        self.reason = text

    def __str__(self) -> str:
        return self.args[1]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` (same suffix, so writers that choose a format by it still work); when
    the block ends it replaces ``path``. On any error the temporary file is removed, ``path`` is unchanged, and an
    ``OSError`` becomes :class:`WriteFailed`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteFailed):
            raise WriteFailed(path, err) from err
        raise


#: the name :func:`atomic_path` gives a temporary file: ``.<stem>.<pid>.tmp<suffix>``
TEMPORARY = re.compile(r"^\..*\.\d+\.tmp(\.[^.]*)?$")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of writes that never finished under ``folder`` (a process killed with ``kill -9``
    mid-write leaves one); call it only while no other process writes there (sdbridge holds the run's lock)."""
    found = [p for p in Path(folder).rglob(".*.tmp*") if p.is_file() and TEMPORARY.match(p.name)]
    for p in found:
        with contextlib.suppress(OSError):
            p.unlink()
    return found


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` only when the block ends without an error (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)
