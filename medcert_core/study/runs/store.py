"""The results store: one folder per completed run, keyed by the hash of what produced its numbers
(parameters, a digest of the data read, digests of the weight files loaded, ``NUMBERS_VERSION``).

    <results_dir>/runs/<hash>/results.csv    tidy: one row per image x class (x sigma)
    <results_dir>/runs/<hash>/curves.csv     tidy: one row per image x class x tau (smoothed runs)
    <results_dir>/runs/<hash>/maps.npz       label maps of the first test images, for figures
    <results_dir>/runs/<hash>/metadata.json  parameters, versions, git commit, device; written last
    <results_dir>/aggregate.csv              every completed run's rows, for the chapters
    <results_dir>/aggregate_curves.csv       every completed run's curve rows

A run is complete when its metadata.json exists; every file is written atomically, so a crash
leaves either a complete run or one that is simply computed again. Several processes (SLURM jobs,
torchrun ranks, notebooks) may share one store: a run is computed under its lock
(``locks/run-<hash>.lock``, see :func:`run_lock`) and ``aggregate.csv`` is rewritten under
``locks/aggregate.lock``, so no writer's rows are lost and none is written twice.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medcert_core.devices import git_commit, local_timestamp
from medcert_core.io import (
    file_digest,
    file_lock,
    write_atomically,
    write_json_atomically,
)

RESULTS = "results.csv"
CURVES = "curves.csv"
MAPS = "maps.npz"
METADATA = "metadata.json"
AGGREGATE = "aggregate.csv"
AGGREGATE_CURVES = "aggregate_curves.csv"
LOCKS = "locks"  # flock files of the store (and of the grid state): hold nothing once their process ends
_PACKAGES = ("medcert", "torch", "torchvision", "numpy", "scipy", "statsmodels", "diffusers",
             "segmentation-models-pytorch")


def parameter_hash(parameters: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of JSON-able parameters (key order does not matter)."""
    text = json.dumps(parameters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) of a weight file's bytes, or of a folder's files (path below it and bytes,
    in path order; hidden files, e.g. temporary ones, skipped): part of the key of what those weights compute.

    Raises FileNotFoundError naming ``path`` when it does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_file():
        return file_digest(path)[:16]
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file_digest(file).encode() + b"\0")
    return digest.hexdigest()[:16]


def weight_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` in path order, hidden files and folders (temporary ones) skipped."""
    return sorted(file for file in folder.rglob("*") if file.is_file()
                  and not any(part.startswith(".") for part in file.relative_to(folder).parts))


def run_folder(results_dir: str | Path, run_hash: str) -> Path:
    return Path(results_dir) / "runs" / run_hash


def is_complete(results_dir: str | Path, run_hash: str) -> bool:
    return (run_folder(results_dir, run_hash) / METADATA).is_file()


def run_lock(results_dir: str | Path, run_hash: str):
    """Context manager: the lock of one run (``locks/run-<hash>.lock``), held while it is computed and
    saved, so that two processes needing the same run compute it once (the second waits, then reads it)."""
    return file_lock(Path(results_dir) / LOCKS / f"run-{run_hash}.lock", f"run {run_hash}")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def save_run(results_dir: str | Path, run_hash: str, rows: pd.DataFrame, maps: dict[str, np.ndarray],
             parameters: dict[str, Any], *, curves: pd.DataFrame | None = None, **extra: Any) -> Path:
    """Write a finished run: rows, curve rows, maps, then metadata (the completion mark), each atomically."""
    folder = run_folder(results_dir, run_hash)
    write_atomically(folder / RESULTS, lambda path: rows.to_csv(path, index=False))
    if curves is not None and not curves.empty:
        write_atomically(folder / CURVES, lambda path: curves.to_csv(path, index=False))

    def write_maps(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez_compressed(handle, **maps)

    write_atomically(folder / MAPS, write_maps)
    write_json_atomically({
        "hash": run_hash, "parameters": parameters, "versions": package_versions(),
        "git_commit": git_commit(Path(__file__).parent), "platform": platform.platform(),
        "finished": local_timestamp(), **extra,
    }, folder / METADATA)
    return folder


def load_rows(results_dir: str | Path, run_hash: str) -> pd.DataFrame:
    return pd.read_csv(run_folder(results_dir, run_hash) / RESULTS)


def load_curves(results_dir: str | Path, run_hash: str) -> pd.DataFrame:
    """The run's curve rows (image x class x tau); empty for a run without them (sigma = 0)."""
    path = run_folder(results_dir, run_hash) / CURVES
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def load_maps(results_dir: str | Path, run_hash: str) -> dict[str, np.ndarray]:
    with np.load(run_folder(results_dir, run_hash) / MAPS) as saved:
        return {key: saved[key] for key in saved.files}


def load_metadata(results_dir: str | Path, run_hash: str) -> dict[str, Any]:
    return json.loads((run_folder(results_dir, run_hash) / METADATA).read_text())


def training_seed_of(parameters: dict[str, Any]) -> int | None:
    """The seed a run's models were trained from: its explicit ``training_seed``, else the split's seed
    (None for parameters that name neither)."""
    explicit = (parameters.get("training") or {}).get("training_seed")
    seed = (parameters.get("data") or {}).get("seed") if explicit is None else explicit
    return None if seed is None else int(seed)


def aggregate(results_dir: str | Path) -> pd.DataFrame:
    """Rows of every completed run, with its hash, device and training seed; written to aggregate.csv too (and
    the curve rows to aggregate_curves.csv).

    Read and written under ``locks/aggregate.lock``: the last writer's snapshot holds every run
    completed before it, so concurrent writers never drop one another's rows.
    """
    with file_lock(Path(results_dir) / LOCKS / "aggregate.lock", "the results aggregate"):
        return _aggregate(results_dir)


def _aggregate(results_dir: str | Path) -> pd.DataFrame:
    frames, curve_frames = [], []
    for metadata_path in sorted(Path(results_dir).glob(f"runs/*/{METADATA}")):
        metadata = json.loads(metadata_path.read_text())
        columns = {"run": metadata["hash"], "device": metadata.get("device", ""),
                   "training_seed": training_seed_of(metadata["parameters"])}
        frames.append(pd.read_csv(metadata_path.parent / RESULTS).assign(**columns))
        if (metadata_path.parent / CURVES).exists():
            curve_frames.append(pd.read_csv(metadata_path.parent / CURVES).assign(**columns))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    curves = pd.concat(curve_frames, ignore_index=True) if curve_frames else pd.DataFrame()
    write_atomically(Path(results_dir) / AGGREGATE, lambda path: frame.to_csv(path, index=False))
    write_atomically(Path(results_dir) / AGGREGATE_CURVES, lambda path: curves.to_csv(path, index=False))
    return frame
