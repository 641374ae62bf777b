"""Run a grid here, one entry after another: execute each chapter notebook with papermill into the book.

Every executed notebook gets ``interactive = False`` and its parameter hash in its metadata. An
entry is skipped when its output exists with the same hash and the results store recorded that
hash as complete (``grid_state.json``); it is executed into a temporary file and moved into place
only when it succeeded, so the book never holds a half-run chapter.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medcert_core.errors import NotebookFailed
from medcert_core.io import file_lock, write_atomically, write_json_atomically
from medcert_core.study.grid.spec import GridEntry, template_parameters
from medcert_core.study.settings import PROFILES

STATE = "grid_state.json"
STATE_LOCK = "locks/grid_state.lock"  # under the results store; jobs finishing at once all record their entry


def _state(results_dir: Path) -> dict[str, str]:
    path = results_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_done(entry: GridEntry, book_dir: Path, results_dir: Path) -> bool:
    """True when the book holds this entry's output with the same hash, recorded complete in the store."""
    output = book_dir / f"{entry.output}.ipynb"
    if not output.is_file() or _state(results_dir).get(entry.output) != entry.hash:
        return False
    metadata = json.loads(output.read_text()).get("metadata", {}).get("medcert", {})
    return metadata.get("parameters_hash") == entry.hash


def without_stderr(notebook):
    """The notebook without stderr stream outputs (progress bars, kernel warnings)."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [out for out in cell.outputs if not (out.output_type == "stream" and out.name == "stderr")]
    return notebook


def with_dataset_heading(notebook, template: Path, parameters: Mapping[str, Any]):
    """The executed notebook with its first cell written from its dataset (``study.dataset_texts``) where the
    template asks for it (``metadata.medcert.heading = "dataset"``: the shared dataset template); else as is."""
    from medcert_core.study.dataset_texts import HEADING_FROM_DATASET, heading_markdown

    if notebook.metadata.get("medcert", {}).get("heading") != HEADING_FROM_DATASET:
        return notebook
    dataset = parameters.get("dataset", (template_parameters(template) or {}).get("dataset"))
    notebook.cells[0].source = heading_markdown(dataset)
    return notebook


RERUN = """````{{admonition}} Rerun this chapter
:class: tip
This page is the template `{template}` executed with the parameters below. From the project root,
with the project installed (`./run.sh` sets it up), the same chapter is

```bash
.venv/bin/papermill {template} {output} --cwd . -y '{parameters}'
```

{grid}Or open the template in JupyterLab (`./run.sh lab`), set these values in its parameters cell and run
all cells (`interactive = True` adds the live controls).
````"""


def rerun_grid_sentence(entry: GridEntry) -> str:
    """How the chapter runs with its grid: the grid file it came from (``./run.sh grid FILE``, and the
    profile's study when that file is ``grids/<profile>.yaml``); "" for an entry built in code."""
    if not entry.grid:
        return ""
    grid = Path(entry.grid)
    if grid.is_absolute() and grid.is_relative_to(Path.cwd()):
        grid = grid.relative_to(Path.cwd())
    profile = entry.parameters.get("profile")
    study = (f", and with the whole `{profile}` study by `./run.sh study --profile {profile}`"
             if profile in PROFILES and grid.as_posix() == f"grids/{profile}.yaml" else "")
    return (f"It is an entry of the grid `{grid.as_posix()}`: `./run.sh grid {grid.as_posix()}` runs it with the grid's "
            f"other entries (add `--data-root DIR` where the data lives elsewhere){study}.\n")


def rerun_cell(entry: GridEntry, template: str, output: str):
    """A closing markdown cell: how to run this chapter again (papermill call with its parameters)."""
    import nbformat

    grid = rerun_grid_sentence(entry)
    parameters = json.dumps(entry.parameters, ensure_ascii=False).replace("'", "'\\''")
    return nbformat.v4.new_markdown_cell(RERUN.format(template=template, output=output, parameters=parameters,
                                                      grid=grid))


def record_done(entry: GridEntry, results_dir: Path) -> None:
    """Record in the grid state that ``entry`` was executed with its hash (read-modify-write under a lock:
    several jobs finishing at once each keep their entry)."""
    with file_lock(results_dir / STATE_LOCK, "the grid state"):
        state = _state(results_dir)
        state[entry.output] = entry.hash
        write_json_atomically(state, results_dir / STATE)


def execute(entry: GridEntry, *, notebooks_dir: Path, book_dir: Path, results_dir: Path, cwd: Path,
            progress: bool = True, kernel_name: str = "python3", start_timeout: float = 60,
            kernel_manager_class: Any = None) -> Path:
    """Run one entry with papermill; the output appears in ``book_dir`` only if every cell succeeded.

    ``kernel_name``, ``start_timeout`` (seconds for the kernel to start) and ``kernel_manager_class``
    go to papermill; the SLURM executor passes the project's registered kernel, a generous timeout
    and a kernel manager using IPC sockets in the job's own runtime folder.
    """
    import nbformat
    import papermill

    output = book_dir / f"{entry.output}.ipynb"
    temporary = book_dir / f".{entry.output}.running.ipynb"
    book_dir.mkdir(parents=True, exist_ok=True)
    temporary.unlink(missing_ok=True)  # a copy left by a killed or failed run is never taken for this one
    try:  # the kernel's progress bars stream to this terminal; they are dropped from the chapter
        papermill.execute_notebook(
            str(notebooks_dir / f"{entry.notebook}.ipynb"), str(temporary), parameters=entry.parameters,
            cwd=str(cwd), kernel_name=kernel_name, progress_bar=progress, language="python", stderr_file=sys.stderr,
            start_timeout=start_timeout,
            **({"kernel_manager_class": kernel_manager_class} if kernel_manager_class is not None else {}),
        )
    except Exception as error:
        reason = f"{error.ename}: {error.evalue}" if hasattr(error, "ename") else f"{type(error).__name__}: {error}"
        raise NotebookFailed(f"notebook {entry.notebook} failed with {reason}\n  parameters: {entry.parameters}\n"
                             f"  the partly executed copy, with the traceback, is {temporary}") from error
    notebook = with_dataset_heading(without_stderr(nbformat.read(temporary, as_version=4)),
                                    notebooks_dir / f"{entry.notebook}.ipynb", entry.parameters)
    template, output_path = (os.path.relpath(notebooks_dir / f"{entry.notebook}.ipynb", cwd),
                             os.path.relpath(output, cwd))
    notebook.metadata["papermill"].update(  # paths as the project sees them, not as this machine does
        input_path=template, output_path=output_path)
    notebook.cells.append(rerun_cell(entry, template, output_path))
    notebook.metadata["medcert"] = {"notebook": entry.notebook, "parameters": entry.parameters,
                                    "parameters_hash": entry.hash}
    write_atomically(output, lambda path: nbformat.write(notebook, str(path)))
    temporary.unlink(missing_ok=True)
    record_done(entry, results_dir)
    return output


def run_grid(entries: list[GridEntry], *, notebooks_dir: str | Path = "notebooks", book_dir: str | Path = "book",
             results_dir: str | Path = "runs/results", cwd: str | Path = ".", force: bool = False) -> list[Path]:
    """Execute every entry not already done (all of them with ``force``); returns the output paths."""
    notebooks_dir, book_dir, results_dir, cwd = map(Path, (notebooks_dir, book_dir, results_dir, cwd))
    outputs = []
    bar = tqdm(entries, desc="grid", unit="notebook")
    for entry in bar:
        bar.set_postfix_str(entry.output)
        output = book_dir / f"{entry.output}.ipynb"
        if not force and is_done(entry, book_dir, results_dir):
            tqdm.write(f"skip {entry.output}: already executed with these parameters")
        else:
            execute(entry, notebooks_dir=notebooks_dir, book_dir=book_dir, results_dir=results_dir, cwd=cwd)
        outputs.append(output)
    return outputs
