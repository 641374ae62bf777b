"""Atomic writes: a crash leaves either the old file or the new one, never half of one; file locks
for what several processes may write at once; :func:`load_weights`, the one way medcert reads a
``torch.save`` file (data, never code); and :func:`user_cache_dir`, where trained models live."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


USER_CACHE = "user"  # the cache_dir setting that means :func:`user_cache_dir`
CACHE_SUBSTITUTE = "{cache}"  # in a denoiser spec's path: the model cache in use


def user_cache_dir() -> Path:
    """Where trained models live unless told otherwise, outside any checkout (as torch's and Hugging
    Face's caches): ``$MEDCERT_CACHE``, else ``$XDG_CACHE_HOME/medcert``, else ``~/.cache/medcert``."""
    if os.environ.get("MEDCERT_CACHE"):
        return Path(os.environ["MEDCERT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "medcert"


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder: a rename in it) to the disk."""
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
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself reaches the disk
    return path


def save_torch_atomically(payload: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    return write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class UnsafeFileError(ValueError):
    """A file that would need arbitrary code to unpickle: refused, never run."""


def load_weights(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)``: tensors and plain containers (dict, list,
    tuple, str, numbers) only; nothing in the file runs. ``FileNotFoundError`` for a missing file;
    :class:`UnsafeFileError` (a ``ValueError``) naming ``path`` for a file that would need arbitrary
    code to unpickle; ``ValueError`` naming ``path`` for one that is not a readable PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = UNSUPPORTED_GLOBAL.search(str(error))
        if unsafe:
            raise UnsafeFileError(
                f"{path} holds Python objects beyond tensors and plain containers (it names "
                f"{unsafe.group(1)}): it would need arbitrary code to unpickle, and medcert never runs code "
                "from a data file; save only tensors, dicts, lists, str and numbers (e.g. a state_dict)") from error
        raise ValueError(f"{path} is not a readable PyTorch file ({error_gist(error)})") from error
    except (RuntimeError, EOFError, OSError, KeyError) as error:
        raise ValueError(f"{path} is not a readable PyTorch file ({error_gist(error)})") from error


def error_gist(error: BaseException) -> str:
    """For messages: the error's name and the informative part of its (long) message: the last line's first sentence."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("Check the documentation")]
    return type(error).__name__ + (f": {lines[-1].split('. ')[0][:200]}" if lines else "")


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
    filelock = _import_filelock()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), **_strict_flock_options())
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"[medcert] waiting for {what or path.name}: {path} is held by another process",
              file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _import_filelock() -> Any:
    """filelock, imported when a lock is first taken: it ships with the extras that take locks
    (``medcert[study]``, ``medcert[cluster]``), not with the certification library itself."""
    try:
        import filelock
    except ImportError as error:
        raise ImportError(
            "medcert_core.io.file_lock needs the package filelock, which the certification library "
            "alone does not install: pip install 'medcert[cluster]' (medcert[study] includes it too)"
        ) from error
    return filelock


@functools.lru_cache(maxsize=None)
def _strict_flock_options() -> dict[str, Any]:
    """filelock >= 4 may fall back to a marker-file lock where flock is missing; such a marker would
    outlive a killed process, so medcert asks for flock or an error. Computed on the first lock."""
    import inspect

    file_lock_class = _import_filelock().FileLock
    return {"fallback_to_soft": False} if "fallback_to_soft" in inspect.signature(file_lock_class.__init__).parameters else {}


_FILE_DIGESTS: dict[tuple[object, ...], str] = {}  # (path, device, inode, size, mtime, ctime) -> sha256


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes; cached in the process per (path, inode, size, mtime, ctime),
    so a file is read once however often a key is computed, and a replaced one is read again."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _FILE_DIGESTS:
        return _FILE_DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    # a file changed less than 2 s ago may change again within one timestamp tick: not cached ("racily clean")
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > 2_000_000_000:
        _FILE_DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()
