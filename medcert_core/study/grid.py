"""The papermill grid runner: execute chapter notebooks with parameters, write them into the book.

A grid file (YAML)::

    parameters:            # given to every entry
      profile: quick
    runs:
      - notebook: phantom                  # notebooks/phantom.ipynb -> <book>/phantom.ipynb
      - notebook: ablation_denoising_steps
        parameters: {test_images: 2}
      - notebook: jsrt
        output: jsrt_sigmas                # default: the notebook's name (+ the swept values)
        sweep: {alpha: [0.001, 0.01]}      # lists, expanded as a product: one notebook each

Overrides (``medcert grid GRID --set n=20 --set "sigmas=[0.5]"``, values parsed as YAML) replace a
parameter in every entry whose template has it, after ``parameters:``, the entries' own values and
their sweeps, and are checked like the file's own values. ``training`` (a mapping of
``TrainingSpec`` fields, e.g. ``{epochs: 1, preset: tiny}``) changes how a chapter's models are
trained and ``denoiser_flags`` (guided-diffusion's MODEL_FLAGS string) describes its checkpoint;
both are checked here, before any notebook runs.

Every executed notebook gets ``interactive = False`` and its parameter hash in its metadata. An
entry is skipped when its output exists with the same hash and the results store recorded that
hash as complete (``grid_state.json``); it is executed into a temporary file and moved into place
only when it succeeded, so the book never holds a half-run chapter.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from tqdm import tqdm

import medcert_core
from medcert_core.checks import check_parameter
from medcert_core.data import DATASET_NAMES
from medcert_core.denoisers import parse_spec
from medcert_core.errors import NotebookFailed
from medcert_core.io import file_digest, file_lock, write_atomically, write_json_atomically
from medcert_core.models import ARCHITECTURES
from medcert_core.smoothing import PRECISIONS, check_batch_size, compile_mode
from medcert_core.study.assets import training_override_problem
from medcert_core.study.profiles import PROFILES
from medcert_core.study.store import parameter_hash

GRID_KEYS = {"parameters", "runs", "executor"}  # executor: SLURM options (see medcert_core.study.executors)
ENTRY_KEYS = {"notebook", "output", "parameters", "sweep"}
STATE = "grid_state.json"
STATE_LOCK = "locks/grid_state.lock"  # under the results store; jobs finishing at once all record their entry


# Grid parameters that change where or how fast a chapter runs, not its numbers' definition. The
# device does change the noise (CPU and CUDA generators differ), so each run records it in its
# metadata; a chapter run on another device is not re-executed for that alone.
NOT_HASHED = ("device",)


@dataclass(frozen=True)
class GridEntry:
    """One notebook execution: template name, output name, parameters, the template's digest."""

    notebook: str
    output: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template_digest: str = ""

    @property
    def hash(self) -> str:
        """Of the template's bytes, ``NUMBERS_VERSION``, the parameters (not the device) and the
        training settings (the profile's, with the entry's ``training`` overrides): a changed template,
        numbers version, profile or override re-runs the chapter."""
        profile = self.parameters.get("profile")
        training = None
        if profile in PROFILES:
            overrides = self.parameters.get("training")
            spec = PROFILES[profile]
            training = dataclasses.asdict(spec if training_override_problem(overrides or {}) else
                                          spec.with_overrides(overrides))
        parameters = {key: value for key, value in self.parameters.items() if key not in NOT_HASHED}
        return parameter_hash({"notebook": self.notebook, "template": self.template_digest,
                               "numbers_version": medcert_core.NUMBERS_VERSION, "parameters": parameters, "training": training})


def _fail(path: str | Path, message: str) -> NoReturn:
    raise ValueError(f"{path}: {message}")


def output_problem(name: Any) -> str | None:
    """Why ``name`` is not a plain file name inside the book (``<book>/<name>.ipynb``); None if it is:
    a non-empty string without a path separator or a control character, not starting with '.'
    (so neither '..' nor a hidden file), hence never absolute and never outside the book."""
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty file name (a string)"
    if "/" in name or "\\" in name:
        return "must be a plain file name without a path separator ('/' or '\\'): outputs go into the book folder"
    if name.startswith("."):
        return "must not start with '.' (no '..', no hidden file): outputs go into the book folder"
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return "must not hold a control character (newline, tab, ...)"
    return None


def _check_output(source: str | Path, number: int, name: Any, what: str = "'output:'") -> None:
    problem = output_problem(name)
    if problem:
        _fail(source, f"entry {number}: {what} {name!r} {problem}; e.g. 'output: jsrt_sigmas'")


def _sweep_suffix(values: Mapping[str, Any]) -> str:
    return "-".join(f"{key}={value}" for key, value in values.items()).replace("/", "_").replace(" ", "")


def template_parameters(notebook: Path) -> dict[str, Any] | None:
    """Names and default values of a template's cell tagged ``parameters``; None when it has none.

    A default that is not a literal is None (any value accepted).
    """
    try:
        cells = json.loads(notebook.read_text()).get("cells", [])
    except (OSError, ValueError) as error:
        raise ValueError(f"{notebook} is not a readable notebook: {error}") from error
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            assignments = [node for node in ast.parse("".join(cell["source"])).body if isinstance(node, ast.Assign)]
            return {target.id: _literal_or_none(node.value) for node in assignments
                    for target in node.targets if isinstance(target, ast.Name)}
    return None


def _literal_or_none(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


# Types a grid value may have besides its template default's: None for the whole test split,
# [H, W] for a non-square size, a number of DDPM calls instead of "single".
ALSO_ACCEPTED: dict[str, tuple[type, ...]] = {"test_images": (type(None),), "image_size": (list,),
                                              "denoise_steps": (int,), "batch_size": (str,), "compile": (str,),
                                              "training": (type(None), dict)}  # TrainingSpec overrides
RANGED = {"sigmas": "sigma", "n0": "n0", "n": "n", "alpha": "alpha", "tau": "tau"}  # grid name -> checks name
CHOICES: dict[str, Sequence[str]] = {"profile": sorted(PROFILES), "dataset": DATASET_NAMES,
                                     "arch": ARCHITECTURES, "archs": ARCHITECTURES, "precision": list(PRECISIONS)}
DENOISER_SPECS = ("denoiser", "unet_denoiser")


def _flags_problem(text: Any) -> str | None:
    """Why ``text`` is not a valid guided-diffusion MODEL_FLAGS string; None if it is."""
    from medcert_core.denoisers.guided_diffusion import parse_model_flags, unet_config_from_flags

    try:
        unet_config_from_flags(**parse_model_flags(text))
    except (ValueError, TypeError, NotImplementedError) as error:
        return str(error)
    return None


def accepted_types(key: str, default: Any) -> tuple[type, ...] | None:
    """The types a grid value of parameter ``key`` may have, from its template default; None: any."""
    if default is None:
        return None
    return ((int, float) if isinstance(default, float) else (type(default),)) + ALSO_ACCEPTED.get(key, ())


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)


def parameter_problem(key: str, value: Any, defaults: Mapping[str, Any]) -> str | None:
    """Why ``value`` is not valid for template parameter ``key`` (name, type, range, choice); None if it is."""
    if key not in defaults:
        return f"unknown parameter {key!r}; valid: {sorted(defaults)}"
    types = accepted_types(key, defaults[key])
    if types is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        return (f"parameter {key!r} must be {_type_names(types)} (its default is {defaults[key]!r}), "
                f"got {type(value).__name__} {value!r}")
    items = value if isinstance(value, list) else [value]
    if key in RANGED:
        try:
            for item in items:
                check_parameter(RANGED[key], item)
        except ValueError as error:
            return f"parameter {key!r}: {error}"
    if key in CHOICES and any(item not in CHOICES[key] for item in items):
        return f"parameter {key!r}: unknown value {value!r}; valid: {list(CHOICES[key])}"
    if key in DENOISER_SPECS and value != "none":
        try:
            parse_spec(value)
        except ValueError as error:
            return f"parameter {key!r}: {error}"
    if key == "training" and value is not None:
        problem = training_override_problem(value)
        if problem:
            return f"parameter 'training': {problem}"
    execution_checks = {"batch_size": check_batch_size, "compile": compile_mode}
    if key in execution_checks:
        try:
            execution_checks[key](value)
        except ValueError as error:
            return f"parameter {key!r}: {error}"
    if key == "denoiser_flags":
        problem = _flags_problem(value)
        if problem:
            return f"parameter 'denoiser_flags': {problem}"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (a ``--set`` argument) -> (key, value), VALUE parsed as YAML: ``n=20`` -> ("n", 20),
    ``sigmas=[0.5]`` -> ("sigmas", [0.5]), ``test_images=null`` -> ("test_images", None),
    ``training={epochs: 1}`` -> ("training", {"epochs": 1}). ValueError for any other form."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not key.isidentifier():
        raise ValueError(f"an override must be KEY=VALUE with VALUE in YAML (e.g. n=20, \"sigmas=[0.5]\", "
                         f"\"training={{epochs: 1}}\"), got {text!r}")
    try:
        return key, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"the value of override {text!r} is not valid YAML: {' '.join(str(error).split())}") from error


def parse_grid(spec: Mapping[str, Any], source: str | Path = "<grid>", notebooks_dir: str | Path = "notebooks",
               overrides: Mapping[str, Any] | None = None) -> list[GridEntry]:
    """Validate a grid mapping and expand its sweeps; errors name ``source`` and the valid keys.

    Parameters are checked against the template's ``parameters`` cell: known names, the type of
    the default, and the valid ranges and choices (see :func:`parameter_problem`).
    ``overrides`` (``--set``) replace a parameter in every entry whose template has it (a swept
    parameter is then not swept); one that no template has is an error listing the valid names.
    """
    overrides = dict(overrides or {})
    if not isinstance(spec, Mapping):
        _fail(source, "a grid must be a mapping with 'runs:' (a list) and optional 'parameters:'")
    unknown = set(spec) - GRID_KEYS
    if unknown:
        _fail(source, f"unknown keys {sorted(unknown)}; valid: {sorted(GRID_KEYS)}")
    if not isinstance(spec.get("parameters") or {}, Mapping):
        _fail(source, "'parameters:' must be a mapping of name: value")
    from medcert_core.study.executors import section_problem  # here: executors imports this module

    problem = section_problem(spec.get("executor"))
    if problem:
        _fail(source, problem)
    shared = dict(spec.get("parameters") or {})
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        _fail(source, "'runs:' must be a non-empty list of entries like {notebook: phantom}")
    available = sorted(path.stem for path in Path(notebooks_dir).glob("*.ipynb"))
    entries = []
    known: set[str] = set()  # the parameter names of the grid's templates, for overrides
    overridden: set[str] = set()
    for number, entry in enumerate(runs, start=1):
        if not isinstance(entry, Mapping) or "notebook" not in entry:
            _fail(source, f"entry {number} must be a mapping with 'notebook:' (one of {available})")
        unknown = set(entry) - ENTRY_KEYS
        if unknown:
            _fail(source, f"entry {number} has unknown keys {sorted(unknown)}; valid: {sorted(ENTRY_KEYS)}")
        if entry["notebook"] not in available:
            _fail(source, f"entry {number}: no notebook {entry['notebook']!r} in {notebooks_dir}; valid: {available}")
        if not all(isinstance(entry.get(key) or {}, Mapping) for key in ("parameters", "sweep")):
            _fail(source, f"entry {number}: 'parameters:' and 'sweep:' must be mappings of name: value")
        sweep = dict(entry.get("sweep") or {})
        if any(not isinstance(values, list) or not values for values in sweep.values()):
            _fail(source, f"entry {number}: every 'sweep:' value must be a non-empty list")
        if "output" in entry:
            _check_output(source, number, entry["output"])
        template = Path(notebooks_dir) / f"{entry['notebook']}.ipynb"
        defaults = template_parameters(template)
        applied = {key: value for key, value in overrides.items() if defaults is None or key in defaults}
        known.update(defaults or overrides)
        overridden.update(applied)
        sweep = {key: values for key, values in sweep.items() if key not in applied}
        for combination in itertools.product(*sweep.values()) if sweep else [()]:
            swept = dict(zip(sweep, combination))
            output = entry.get("output", entry["notebook"]) + (f"-{_sweep_suffix(swept)}" if swept else "")
            _check_output(source, number, output, "the output name (with its sweep values)")
            parameters = {**shared, **(entry.get("parameters") or {}), **swept}
            checked = [] if defaults is None else [parameter_problem(key, value, defaults) for key, value in parameters.items()]
            problems = [problem for problem in checked if problem]
            if problems:
                _fail(source, f"entry {number} ({template}): {problems[0]}")
            checked = [] if defaults is None else [parameter_problem(key, value, defaults) for key, value in applied.items()]
            problems = [problem for problem in checked if problem]
            if problems:
                _fail(source, f"--set, entry {number} ({template}): {problems[0]}")
            parameters.update(applied)
            entries.append(GridEntry(entry["notebook"], output, {**parameters, "interactive": False},
                                     file_digest(template)))
    unused = sorted(set(overrides) - overridden)
    if unused:
        _fail(source, f"--set {unused[0]}: no notebook of this grid has a parameter {unused[0]!r}; "
                      f"valid: {sorted(known)}")
    outputs = [entry.output for entry in entries]
    duplicated = sorted({name for name in outputs if outputs.count(name) > 1})
    if duplicated:
        _fail(source, f"several entries write {duplicated}; give them distinct 'output:' names")
    return entries


def load_grid(path: str | Path, notebooks_dir: str | Path = "notebooks",
              overrides: Mapping[str, Any] | None = None) -> list[GridEntry]:
    """The entries of grid file ``path`` (see :func:`parse_grid`, which also applies ``overrides``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no grid file at {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    return parse_grid(spec, path, notebooks_dir, overrides)


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


def rerun_cell(entry: GridEntry, template: str, output: str):
    """A closing markdown cell: how to run this chapter again (papermill call with its parameters)."""
    import nbformat

    profile = entry.parameters.get("profile")
    grid = (f"It is part of the `{profile}` study: `./run.sh study --profile {profile}` (`grids/{profile}.yaml`, "
            "which adds `--data-root DIR` where the data lives elsewhere).\n" if profile in PROFILES else "")
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
    notebook = without_stderr(nbformat.read(temporary, as_version=4))
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
