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

The SLURM options a grid file's ``executor:`` section (or the command line) may give are checked
here too (:class:`SlurmOptions`); :mod:`medcert_core.study.grid.slurm` runs them.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml

import medcert_core
from medcert_core.io import file_digest
from medcert_core.study.runs.store import parameter_hash
from medcert_core.study.settings import PROFILES, TrainingSpec, check_setting

GRID_KEYS = {"parameters", "runs", "executor"}  # executor: SLURM options (see medcert_core.study.grid.slurm)
ENTRY_KEYS = {"notebook", "output", "parameters", "sweep"}


# Grid parameters that change where or how fast a chapter runs, not its numbers' definition. The
# device does change the noise (CPU and CUDA generators differ), so each run records it in its
# metadata; a chapter run on another device is not re-executed for that alone.
NOT_HASHED = ("device",)


@dataclass(frozen=True)
class GridEntry:
    """One notebook execution: template name, output name, parameters, the template's digest and the
    grid file it came from ("" when built in code; not hashed: moving a grid file re-runs nothing)."""

    notebook: str
    output: str
    parameters: dict[str, Any] = field(default_factory=dict)
    template_digest: str = ""
    grid: str = ""

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
            training = dataclasses.asdict(_with_valid_overrides(spec, overrides))
        parameters = {key: value for key, value in self.parameters.items() if key not in NOT_HASHED}
        return parameter_hash({"notebook": self.notebook, "template": self.template_digest,
                               "numbers_version": medcert_core.NUMBERS_VERSION, "parameters": parameters, "training": training})


def _with_valid_overrides(spec: TrainingSpec, overrides: Any) -> TrainingSpec:
    """``spec`` with ``overrides`` when they are valid, else ``spec`` (parse_grid reports invalid ones)."""
    try:
        return spec.with_overrides(overrides)
    except ValueError:
        return spec


def _fail(path: str | Path, message: str) -> NoReturn:
    raise ValueError(f"{path}: {message}")


def check_output_name(name: Any) -> None:
    """ValueError unless ``name`` is a plain file name inside the book (``<book>/<name>.ipynb``): a
    non-empty string without a path separator or a control character, not starting with '.' (so
    neither '..' nor a hidden file), hence never absolute and never outside the book."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("must be a non-empty file name (a string)")
    if "/" in name or "\\" in name:
        raise ValueError("must be a plain file name without a path separator ('/' or '\\'): outputs go into the book folder")
    if name.startswith("."):
        raise ValueError("must not start with '.' (no '..', no hidden file): outputs go into the book folder")
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        raise ValueError("must not hold a control character (newline, tab, ...)")


def _check_output(source: str | Path, number: int, name: Any, what: str = "'output:'") -> None:
    try:
        check_output_name(name)
    except ValueError as problem:
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


def _check_parameters(parameters: Mapping[str, Any], defaults: Mapping[str, Any] | None, source: str | Path,
                      where: str) -> None:
    """Check each parameter against the schema and the template's defaults (none: a template without a
    parameters cell takes anything); the first problem ends parsing, naming ``source`` and ``where``."""
    if defaults is None:
        return
    for key, value in parameters.items():
        try:
            check_setting(key, value, defaults)
        except ValueError as error:
            _fail(source, f"{where}: {error}")


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
    the default, and the valid ranges and choices (see :func:`medcert_core.study.settings.check_setting`).
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
    try:
        check_executor_section(spec.get("executor"))
    except ValueError as problem:
        _fail(source, str(problem))
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
            _check_parameters(parameters, defaults, source, f"entry {number} ({template})")
            _check_parameters(applied, defaults, source, f"--set, entry {number} ({template})")
            parameters.update(applied)
            entries.append(GridEntry(entry["notebook"], output, {**parameters, "interactive": False},
                                     file_digest(template), "" if str(source) == "<grid>" else str(source)))
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


# --- executor options (the grid file's executor: section, the --executor slurm flags) ---

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class SlurmOptions:
    """How each grid entry's SLURM job is requested (``executor:`` section / command-line options)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    mem_gb: float | None = None
    time_min: int = 24 * 60
    sbatch: dict[str, Any] = field(default_factory=dict)
    log_dir: str = "runs/slurm"
    kernel_start_timeout: float = 600.0
    poll_s: float = 5.0

    def submitit_parameters(self) -> dict[str, Any]:
        """The parameters of ``submitit.AutoExecutor.update_parameters`` (the name is set per job)."""
        parameters: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": self.cpus_per_job,
                                      "tasks_per_node": 1, "nodes": 1}
        if self.partition:
            parameters["slurm_partition"] = self.partition
        if self.gpus_per_job:
            parameters["gpus_per_node"] = self.gpus_per_job
        if self.mem_gb is not None:
            parameters["mem_gb"] = self.mem_gb
        if self.sbatch:
            parameters["slurm_additional_parameters"] = dict(self.sbatch)
        return parameters


OPTION_NAMES = [item.name for item in fields(SlurmOptions)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def check_one_line(key: str, value: Any) -> None:
    """ValueError if ``value`` (of SLURM option, job name or path ``key``) holds a control character: it
    cannot go into a batch script (a newline inside ``#SBATCH --key=value`` would start a shell line)."""
    found = CONTROL_CHARACTER.search(value) if isinstance(value, str) else None
    if found is not None:
        raise ValueError(f"{key} holds the control character {found.group()!r} (in {value!r}); SLURM values, job "
                         "names and paths must be on one line: a newline would turn the rest of an #SBATCH line "
                         "into a shell command of the batch script")


OPTION_CHECKS: dict[str, tuple[Any, str]] = {  # option -> (is it valid?, what it must be)
    "partition": (lambda v: v is None or (isinstance(v, str) and v.strip() != ""), "a partition name"),
    "gpus_per_job": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "cpus_per_job": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "mem_gb": (lambda v: v is None or (_is_number(v) and v > 0), "a number of GB > 0"),
    "time_min": (lambda v: _is_int(v) and v >= 1, "an integer number of minutes >= 1"),
    "log_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a folder"),
    "kernel_start_timeout": (lambda v: _is_number(v) and v > 0, "a number of seconds > 0"),
    "poll_s": (lambda v: _is_number(v) and v > 0, "a number of seconds > 0"),
}


def _check_sbatch(value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"'sbatch' must be a mapping of sbatch option: value (e.g. {{account: mylab}}), got {value!r}")
    for key, item in value.items():
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise ValueError(f"'sbatch' option names are sbatch's long options without dashes (e.g. account, qos), "
                             f"got {key!r}")
        if not isinstance(item, (str, int, float, bool)):
            raise ValueError(f"'sbatch' option {key!r} must be a string, number or true, got {item!r}")
        check_one_line(f"'sbatch' option {key!r}", key)
        check_one_line(f"'sbatch' option {key!r}", item)


def check_slurm_option(name: str, value: Any) -> None:
    """ValueError unless ``value`` is valid for SLURM option ``name``, naming the option and what it must be."""
    if name not in OPTION_NAMES:
        raise ValueError(f"unknown option {name!r}; valid: {OPTION_NAMES}")
    check_one_line(repr(name), value)
    if name == "sbatch":
        _check_sbatch(value)
        return
    valid, expected = OPTION_CHECKS[name]
    if not valid(value):
        raise ValueError(f"{name!r} must be {expected}, got {value!r}")


def check_executor_section(section: Any) -> None:
    """ValueError unless a grid file's ``executor:`` section is valid (or absent)."""
    if section is None:
        return
    if not isinstance(section, Mapping):
        raise ValueError(f"'executor:' must be a mapping of SLURM options ({', '.join(OPTION_NAMES)}), got {section!r}")
    for name, value in section.items():
        try:
            check_slurm_option(name, value)
        except ValueError as problem:
            raise ValueError(f"executor: {problem}") from None


def slurm_options(section: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> SlurmOptions:
    """The grid file's ``executor:`` section, then the command line's ``overrides`` (None: not given)."""
    values = {**(section or {}), **{key: value for key, value in (overrides or {}).items() if value is not None}}
    check_executor_section(values)
    sbatch = {**dict((section or {}).get("sbatch") or {}), **dict((overrides or {}).get("sbatch") or {})}
    return replace(SlurmOptions(), **{**values, "sbatch": sbatch})


def grid_section(grid_file: str | Path) -> dict[str, Any] | None:
    """The ``executor:`` section of a grid file (already checked by ``grid.parse_grid``)."""
    import yaml

    spec = yaml.safe_load(Path(grid_file).read_text())
    return spec.get("executor") if isinstance(spec, Mapping) else None
