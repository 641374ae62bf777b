"""The study end to end: a profile's grid (grids/<profile>.yaml) executed into book/, the results
aggregated, the website built. Paths are taken from the project root (see ``project_root``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcert_core.study.runs import store
from medcert_core.study.report.book import build_book
from medcert_core.study.experiment import project_root
from medcert_core.study.grid.local import is_done, run_grid
from medcert_core.study.grid.spec import GridEntry, load_grid
from medcert_core.study.warm import warm_before_grid
from medcert_core.study.settings import training_spec

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
    notebooks run: executed chapters then show no machine's absolute paths. Symbolic links are kept,
    not resolved: a data root reached through a linked ``../shared`` stays ``../shared/...``."""
    return os.path.relpath(os.path.abspath(Path(path).expanduser()), os.path.abspath(root))


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


def only_entries(entries: list[GridEntry], outputs: Sequence[str] | None, source: str | Path) -> list[GridEntry]:
    """The entries whose output is named in ``outputs`` (``--only``), in the grid's order; all of them for
    None. A name the grid does not have is an error naming the ones it has."""
    if not outputs:
        return entries
    known = [entry.output for entry in entries]
    unknown = [name for name in outputs if name not in known]
    if unknown:
        raise ValueError(f"{source} has no entry with output {', '.join(map(repr, unknown))}; "
                         f"its outputs are: {', '.join(known)}")
    return [entry for entry in entries if entry.output in outputs]


def results_dir_of(entries: list[GridEntry], root: Path) -> Path:
    """The results store the entries write to (their ``results_dir`` parameter, one for all)."""
    folders = {entry.parameters.get("results_dir", DEFAULT_RESULTS) for entry in entries}
    if len(folders) != 1:
        raise ValueError(f"all entries of a grid must share one results_dir, got {sorted(folders)}")
    folder = Path(folders.pop())
    return folder if folder.is_absolute() else root / folder


def run_grid_file(grid_file: str | Path, *, data_root: str | None = None, device: str | None = None,
                  force: bool = False, book_dir: str | Path = "book",
                  overrides: Mapping[str, Any] | None = None, executor: str = "local",
                  slurm: Mapping[str, Any] | None = None, wait: bool = True,
                  only: Sequence[str] | None = None) -> list[Path]:
    """Execute a grid file's notebooks into ``book_dir`` (under the project root); returns their paths
    (with ``executor="slurm"`` and ``wait=False``: those of the chapters already done).

    ``overrides``: parameter -> value set in every entry whose template has it (``--set KEY=VALUE``).
    ``executor``: "local" (here, one after another) or "slurm" (one job per entry, see
    ``medcert_core.study.grid.slurm``), with ``slurm`` options over the grid file's ``executor:`` section.
    ``only``: the outputs of the entries to execute (``--only``; default: all).
    """
    return grid_report(grid_file, data_root=data_root, device=device, force=force, book_dir=book_dir,
                       overrides=overrides, executor=executor, slurm=slurm, wait=wait, only=only).outputs


@dataclass
class GridReport:
    """The chapters of a grid call: ``outputs`` (done), ``pending`` (SLURM jobs not waited for)."""

    outputs: list[Path]
    pending: list[str] = field(default_factory=list)


def grid_report(grid_file: str | Path, *, data_root: str | None = None, device: str | None = None,
                force: bool = False, book_dir: str | Path = "book", overrides: Mapping[str, Any] | None = None,
                executor: str = "local", slurm: Mapping[str, Any] | None = None, wait: bool = True,
                only: Sequence[str] | None = None) -> GridReport:
    """:func:`run_grid_file`, also saying which chapters are still pending on SLURM. Failed SLURM jobs
    raise ``NotebookFailed`` (each with its log) once every job has ended. ``only``: the outputs to run
    (default: every entry)."""
    from medcert_core.study.grid import slurm as slurm_grid
    from medcert_core.study.grid.spec import EXECUTORS, grid_section, slurm_options

    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if executor == "local" and any(value not in (None, {}) for value in (slurm or {}).values()):
        given = sorted(key for key, value in (slurm or {}).items() if value not in (None, {}))
        raise ValueError(f"SLURM options ({', '.join(given)}) need --executor slurm")
    if executor == "local" and not wait:
        raise ValueError("--no-wait needs --executor slurm (local notebooks run in this process)")
    root = project_root()
    entries = prepare_entries(grid_file, data_root=data_root, device=device, root=root, overrides=overrides)
    entries = only_entries(entries, only, grid_file)
    results_dir = results_dir_of(entries, root)
    if executor == "local":
        warm_before_grid([entry for entry in entries if force or not is_done(entry, root / book_dir, results_dir)],
                         root / "notebooks")
        outputs = run_grid(entries, notebooks_dir=root / "notebooks", book_dir=root / book_dir,
                           results_dir=results_dir, cwd=root, force=force)
        store.aggregate(results_dir)
        return GridReport(outputs)
    options = slurm_options(grid_section(grid_file), slurm)
    report = slurm_grid.run_on_slurm(entries, notebooks_dir=root / "notebooks", book_dir=root / book_dir,
                                      results_dir=results_dir, cwd=root, options=options, wait=wait, force=force)
    store.aggregate(results_dir)
    slurm_grid.raise_on_failures(report)
    pending = {outcome.entry.output for outcome in report.pending}
    if pending:
        print(f"[medcert] {len(pending)} SLURM job(s) submitted or still running: "
              + ", ".join(f"{outcome.entry.output} (job {outcome.job_id}, log {outcome.log})" for outcome in report.pending)
              + "\n[medcert] run the same command again to collect them (finished chapters are skipped)")
    return GridReport([root / book_dir / f"{entry.output}.ipynb" for entry in entries if entry.output not in pending],
                      sorted(pending))


def run_study(profile: str, *, data_root: str | None = None, device: str = "auto", grid_file: str | Path | None = None,
              force: bool = False, build: bool = True, overrides: Mapping[str, Any] | None = None,
              executor: str = "local", slurm: Mapping[str, Any] | None = None, wait: bool = True) -> Path | None:
    """Run profile ``profile``'s grid and build the website; returns the site's index.html (or None).

    ``overrides`` (``--set``) shrink or change the grid's parameters, e.g. ``{"test_images": 1}``.
    ``executor``, ``slurm``, ``wait``: as for :func:`run_grid_file`; the website is built once every
    chapter is done (a later call, after ``wait=False``, collects the jobs and builds it).
    """
    training_spec(profile)
    root = project_root()
    grid_file = Path(grid_file) if grid_file else root / "grids" / f"{profile}.yaml"
    start = time.perf_counter()
    report = grid_report(grid_file, data_root=data_root, device=device, force=force, overrides=overrides,
                         executor=executor, slurm=slurm, wait=wait)
    if report.pending:
        print(f"[medcert] the website is built once the {len(report.pending)} pending chapter(s) are done")
        return None
    print(f"[medcert] grid {grid_file.name} done in {time.perf_counter() - start:.0f} s")
    if not build:
        return None
    start = time.perf_counter()
    index = build_book(root, root / "notebooks")
    print(f"[medcert] website built in {time.perf_counter() - start:.0f} s")
    return index


# --- a dataset chapter's runs outside its notebook (torchrun: each run's images over the processes) ---

def chapter_runs(grid_file: str | Path, *, chapter: str | None = None, data_root: str | None = None,
                 device: str | None = None, overrides: Mapping[str, Any] | None = None,
                 root: Path | None = None) -> tuple[Any, list[Any]]:
    """(Experiment, certification runs) of one dataset chapter of a grid, exactly as its notebook builds
    them (:class:`~medcert_core.study.chapter.DatasetChapter`, from the template's defaults, the grid's
    values and ``overrides``).

    ``chapter``: the entry's output name (default: the grid's first dataset chapter).
    """
    from medcert_core.study.chapter import DatasetChapter
    from medcert_core.study.grid.spec import template_parameters

    root = root or project_root()
    entries = prepare_entries(grid_file, data_root=data_root, device=device, root=root, overrides=overrides)
    defaults = {entry.output: template_parameters(root / "notebooks" / f"{entry.notebook}.ipynb") or {}
                for entry in entries}
    chapters = [entry for entry in entries if DatasetChapter.is_dataset_chapter(defaults[entry.output])]
    chosen = [entry for entry in chapters if chapter in (None, entry.output)]
    if not chosen:
        raise ValueError(f"{grid_file}: no dataset chapter {chapter!r}; valid: {[entry.output for entry in chapters]}")
    entry = chosen[0]
    dataset_chapter = DatasetChapter.from_parameters({**defaults[entry.output], **entry.parameters})
    return dataset_chapter.experiment, dataset_chapter.runs()


def certify_chapter_runs(profile: str = "quick", *, grid_file: str | Path | None = None, chapter: str | None = None,
                         data_root: str | None = None, device: str | None = None,
                         overrides: Mapping[str, Any] | None = None, output: str | Path | None = None):
    """Certify a dataset chapter's runs into the results store (``medcert certify-runs``); returns their
    tidy rows. Launched by torchrun with several processes, each run's test images are sharded over
    the ranks (``medcert_core.distributed``) and rank 0 writes the store, the aggregate and ``output``
    (a CSV of the rows). The chapter's notebook later reads these runs back instead of computing them."""
    from medcert_core import distributed
    from medcert_core.io import write_atomically
    from medcert_core.study.runs.run import run_all

    training_spec(profile)
    root = project_root()
    grid_file = Path(grid_file) if grid_file else root / "grids" / f"{profile}.yaml"
    shard = distributed.init()
    try:
        experiment, runs = chapter_runs(grid_file, chapter=chapter, data_root=data_root, device=device,
                                        overrides=overrides, root=root)
        first = shard is None or shard.first
        frame = run_all(runs, results_dir=experiment.results_path, cache=experiment.cache_path,
                        device=experiment.device, execution=experiment.execution, progress=experiment.progress and first)
        if first:
            store.aggregate(experiment.results_path)
            if output is not None:
                write_atomically(Path(output), lambda path: frame.to_csv(path, index=False))
        if shard is not None:
            distributed.barrier()
        return frame
    finally:
        distributed.shutdown()
