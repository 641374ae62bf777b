"""Atomic writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)
    return path


def save_torch_atomically(payload: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    return write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


def write_json_atomically(payload: Any, path: str | Path) -> Path:
    """JSON (indented, non-JSON values as str) to a temporary file, then rename it into place."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    return write_atomically(Path(path), lambda temporary: temporary.write_text(text))
