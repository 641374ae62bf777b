"""The study end to end: a profile's grid (grids/<profile>.yaml) executed into book/, the results
aggregated, the website built. Paths are taken from the project root (see ``project_root``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medcert_core.study import store
from medcert_core.study.book import build_book
from medcert_core.study.experiment import project_root
from medcert_core.study.grid import GridEntry, load_grid, run_grid
from medcert_core.study.profiles import training_spec

DEFAULT_RESULTS = "runs/results"


def fill_data_root(value: Any, data_root: str | None, source: str | Path) -> Any:
    """Replace ``{data_root}`` in a grid parameter (strings, lists of strings)."""
    if isinstance(value, list):
        return [fill_data_root(item, data_root, source) for item in value]
    if not isinstance(value, str) or "{data_root}" not in value:
        return value
    if data_root is None:
        raise ValueError(f"{source} needs a data root: pass --data-root DIR (it fills {{data_root}} in {value!r})")
    return value.replace("{data_root}", str(data_root))


def project_relative(path: str | Path, root: Path) -> str:
    """``path`` (absolute, or relative to the current folder) relative to the project root, where the
    notebooks run: executed chapters then show no machine's absolute paths."""
    return os.path.relpath(Path(path).expanduser().resolve(), root.resolve())


def prepare_entries(grid_file: str | Path, *, data_root: str | None = None, device: str | None = None,
                    root: Path | None = None, overrides: Mapping[str, Any] | None = None) -> list[GridEntry]:
    """The grid file's entries, checked, with ``overrides`` (``--set``) applied, ``{data_root}`` filled
    in (relative to the project root) and the device set."""
    root = root or project_root()
    entries = load_grid(grid_file, root / "notebooks", overrides)
    if data_root is not None:
        data_root = project_relative(data_root, root)
    prepared = []
    for entry in entries:
        parameters = {key: fill_data_root(value, data_root, grid_file) for key, value in entry.parameters.items()}
        if device is not None:
            parameters["device"] = device
        training_spec(parameters.get("profile", "quick"))  # unknown profiles fail before any notebook runs
        prepared.append(dataclasses.replace(entry, parameters=parameters))
    return prepared


def results_dir_of(entries: list[GridEntry], root: Path) -> Path:
    """The results store the entries write to (their ``results_dir`` parameter, one for all)."""
    folders = {entry.parameters.get("results_dir", DEFAULT_RESULTS) for entry in entries}
    if len(folders) != 1:
        raise ValueError(f"all entries of a grid must share one results_dir, got {sorted(folders)}")
    folder = Path(folders.pop())
    return folder if folder.is_absolute() else root / folder


def run_grid_file(grid_file: str | Path, *, data_root: str | None = None, device: str | None = None,
                  force: bool = False, book_dir: str | Path = "book",
                  overrides: Mapping[str, Any] | None = None) -> list[Path]:
    """Execute a grid file's notebooks into ``book_dir`` (under the project root); returns their paths.

    ``overrides``: parameter -> value set in every entry whose template has it (``--set KEY=VALUE``).
    """
    root = project_root()
    entries = prepare_entries(grid_file, data_root=data_root, device=device, root=root, overrides=overrides)
    results_dir = results_dir_of(entries, root)
    outputs = run_grid(entries, notebooks_dir=root / "notebooks", book_dir=root / book_dir,
                       results_dir=results_dir, cwd=root, force=force)
    store.aggregate(results_dir)
    return outputs


def run_study(profile: str, *, data_root: str | None = None, device: str = "auto", grid_file: str | Path | None = None,
              force: bool = False, build: bool = True, overrides: Mapping[str, Any] | None = None) -> Path | None:
    """Run profile ``profile``'s grid and build the website; returns the site's index.html (or None).

    ``overrides`` (``--set``) shrink or change the grid's parameters, e.g. ``{"test_images": 1}``.
    """
    training_spec(profile)
    root = project_root()
    grid_file = Path(grid_file) if grid_file else root / "grids" / f"{profile}.yaml"
    start = time.perf_counter()
    run_grid_file(grid_file, data_root=data_root, device=device, force=force, overrides=overrides)
    print(f"[medcert] grid {grid_file.name} done in {time.perf_counter() - start:.0f} s")
    if not build:
        return None
    start = time.perf_counter()
    index = build_book(root, root / "notebooks")
    print(f"[medcert] website built in {time.perf_counter() - start:.0f} s")
    return index
