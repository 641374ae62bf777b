"""Atomic writes: a crash leaves either the old file or the new one, never half of one; and file locks
for what several processes may write at once."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting the process-wide umask on every write would race other threads


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, fsync it, then rename it to ``path``.

    The temporary file has a unique name in the target folder (same file system, so the rename is
    atomic; two writers never share it) and is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(descriptor, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would have given
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # the rename itself reaches the disk
    return path


def save_torch_atomically(payload: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    return write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


def write_json_atomically(payload: Any, path: str | Path) -> Path:
    """JSON (indented, non-JSON values as str) to a temporary file, then rename it into place."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    return write_atomically(Path(path), lambda temporary: temporary.write_text(text))


# --- locks for files that several processes (SLURM jobs, torchrun ranks, notebooks) may write ------

@contextlib.contextmanager
def file_lock(path: str | Path, what: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock file ``path`` (made, with its folder, if missing) for the ``with`` block.

    ``filelock.FileLock``: an ``flock`` on an open descriptor, so the kernel drops it when the
    process dies (a SIGKILLed job leaves no stale lock; the file itself may stay, holding nothing).
    Waits as long as it takes (a model may train for hours); when the lock is busy, says once on
    stderr what it waits for. Not re-entrant: never take the same lock twice in one process.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), **_STRICT_FLOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[medcert] waiting for {what or path.name}: {path} is held by another process",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _strict_flock_options() -> dict[str, Any]:
    """filelock >= 4 may fall back to a marker-file lock where flock is missing; such a marker would
    outlive a killed process, so medcert asks for flock or an error."""
    import inspect

    from filelock import FileLock

    return {"fallback_to_soft": False} if "fallback_to_soft" in inspect.signature(FileLock.__init__).parameters else {}


_STRICT_FLOCK = _strict_flock_options()
