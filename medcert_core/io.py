"""Atomic writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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
