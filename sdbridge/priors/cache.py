"""Checksums for the files the built-in priors cache on disk (the exact world, the tiny random SD).

A cache file is trusted only when its size and SHA-256 match what was recorded when it was written: a truncated,
garbled or half-copied file is then found before it is loaded (a garbled tensor would otherwise load without error
and give wrong numbers), and the caller rebuilds it with a one-line warning. Hashing costs ~10 ms per 10 MB.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterator, Optional

from sdbridge.files import write_text

log = logging.getLogger("sdbridge")


def digest(path: Path) -> dict[str, int | str]:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def mismatch(path: Path, recorded: object) -> Optional[str]:
    """Why ``path`` does not match its ``recorded`` digest (``None`` when it does)."""
    if not isinstance(recorded, dict) or not {"size", "sha256"} <= set(recorded):
        return "no recorded checksum"
    if not path.is_file():
        return "file missing"
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"{size:,} bytes, {recorded['size']:,} expected"
    if digest(path)["sha256"] != recorded["sha256"]:
        return "sha256 differs from the recorded one"
    return None


def sidecar(path: Path) -> Path:
    """Where the checksum of a single cache file is kept: ``<file>.sha256.json`` next to it."""
    return path.with_name(path.name + ".sha256.json")


def write_sidecar(path: Path) -> None:
    """Record ``path``'s digest next to it (atomically: a killed write leaves the old one, which then mismatches)."""
    write_text(sidecar(path), json.dumps(digest(path)))


def verify_file(path: Path) -> Optional[str]:
    """Why the cache file ``path`` cannot be trusted (``None``: it matches its sidecar checksum)."""
    try:
        recorded = json.loads(sidecar(path).read_text())
    except (OSError, ValueError):
        return "no readable checksum next to it"
    return mismatch(path, recorded)


def warn_rebuild(what: str, path: Path, reason: str, recorded: bool = True) -> None:
    """Say that the ``what`` cache at ``path`` is rebuilt: a warning when it did not match its recorded checksum
    (``reason``), a note when it was written before checksums were recorded (rebuilt once)."""
    if recorded:
        log.warning("sdbridge: warning: the %s cache %s is damaged (%s); rebuilding it", what, path, reason)
    else:
        log.info("sdbridge: the %s cache %s has no recorded checksum; rebuilding it once", what, path)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` while building the cache file ``path``, so that the jobs of a sweep
    that all find it missing build it once: the others wait here, then find it built. The lock is the OS's
    (``flock``), released when its holder exits or is killed, so a killed build never leaves the others waiting.
    Where ``flock`` does not exist, no lock is taken (each job builds its own copy; atomic writes keep it sound)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("sdbridge: another process is building the %s cache %s; waiting for it", what, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
