"""Packaging: `pip install medcert` is the certification library alone, the rest are extras.

* requirements.txt (what ./run.sh installs: everything) and pyproject.toml's dependencies and
  extras name the same packages with the same specifiers;
* every library module (medcert_core's top-level modules, models, denoisers, data) imports with no
  package of the study / cluster / test extras reachable from medcert_core's own imports;
* what the library does import at module level is a core dependency (or the standard library).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's interpreter is 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "medcert_core"
# not the library: the study, the test fixtures, the command line (which reaches into the study)
NOT_LIBRARY = ("medcert_core.study", "medcert_core.testing", "medcert_core.__main__")
# import names of the extras' packages and of what they bring along (the library imports none of them);
# the import names of every installed distribution named by an extra are added to these
EXTRA_IMPORT_NAMES = {
    "papermill", "nbformat", "ipykernel", "ipywidgets", "plotly", "yaml", "jupyter_book", "jupyterlab",
    "sphinx_mathjax_offline", "sphinx", "myst_nb", "nbclient", "IPython", "jupyter_client", "jupyter_core",
    "submitit", "filelock", "playwright", "statsmodels", "pytest", "_pytest", "psutil", "cloudpickle",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements_txt() -> list[Requirement]:
    requirements = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirements.append(Requirement(line))
    return requirements


def _by_name(requirements: list[Requirement], where: str) -> dict[str, Requirement]:
    named: dict[str, Requirement] = {}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name not in named, f"{where} names {name} twice"
        named[name] = requirement
    return named


def _extras() -> dict[str, list[Requirement]]:
    return {extra: [Requirement(text) for text in texts]
            for extra, texts in _pyproject()["project"]["optional-dependencies"].items()}


def test_requirements_txt_and_pyproject_name_the_same_packages_with_the_same_specifiers():
    project = _pyproject()["project"]
    own_name = canonicalize_name(project["name"])
    core = _by_name([Requirement(text) for text in project["dependencies"]], "dependencies")
    extras = _extras()
    assert {"study", "cluster", "test", "all"} <= set(extras)

    # [all] is medcert[every other extra] and nothing else
    (everything,) = extras["all"]
    assert canonicalize_name(everything.name) == own_name
    assert everything.extras == set(extras) - {"all"}

    declared: dict[str, Requirement] = dict(core)
    for extra, requirements in extras.items():
        if extra == "all":
            continue
        for name, requirement in _by_name(requirements, f"[{extra}]").items():
            assert name != own_name, f"[{extra}] names medcert itself; only [all] may"
            assert name not in core, f"{name} is a core dependency and in [{extra}]"
            if name in declared:  # the same package in two extras (filelock): the same specifier
                assert requirement.specifier == declared[name].specifier, (name, extra)
            declared[name] = requirement

    pinned = _by_name(_requirements_txt(), "requirements.txt")
    assert set(pinned) - set(declared) == set(), "in requirements.txt, in no dependency list of pyproject.toml"
    assert set(declared) - set(pinned) == set(), "in pyproject.toml, not in requirements.txt (./run.sh)"
    for name, requirement in pinned.items():
        assert requirement.specifier == declared[name].specifier, (
            f"{name}: requirements.txt says {requirement.specifier}, pyproject.toml {declared[name].specifier}")
    for name in ("torch", "torchvision"):  # the machine's local wheels: one exact version each
        assert name in core
        (specifier,) = core[name].specifier
        assert specifier.operator == "==", core[name]
        assert pinned[name].specifier == core[name].specifier
    assert project["scripts"]["medcert"] == "medcert_core.__main__:main"


def _blocked_import_names() -> set[str]:
    """EXTRA_IMPORT_NAMES plus the top-level import names of every installed extra's distribution."""
    extra_names = {canonicalize_name(requirement.name)
                   for extra, requirements in _extras().items() if extra != "all" for requirement in requirements}
    blocked = set(EXTRA_IMPORT_NAMES)
    for module, distributions in metadata.packages_distributions().items():
        if any(canonicalize_name(name) in extra_names for name in distributions):
            blocked.add(module)
    # a name a core dependency also provides must stay importable (none today)
    core_names = {canonicalize_name(Requirement(text).name) for text in _pyproject()["project"]["dependencies"]}
    for module, distributions in metadata.packages_distributions().items():
        if any(canonicalize_name(name) in core_names for name in distributions):
            blocked.discard(module)
    return blocked


# Run in a fresh interpreter: a finder first on sys.meta_path (and, for packages already in
# sys.modules, the import statement) refuses an extra's package whenever the import comes from a
# medcert_core module; a core dependency may still import its own dependencies (huggingface_hub
# imports yaml). Then every library module is imported; prints a JSON report.
_IMPORT_LIBRARY = textwrap.dedent('''
    import importlib, json, pkgutil, sys, traceback, types

    BLOCKED = set(json.loads(sys.argv[1]))
    NOT_LIBRARY = tuple(json.loads(sys.argv[2]))
    refused = []

    class RefuseExtras:
        """Importing an extra's package from a medcert_core module raises ImportError."""

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] not in BLOCKED:
                return None
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                         or frame.f_globals.get("__name__", "").startswith("importlib")):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "") if frame is not None else ""
            if importer == "medcert_core" or importer.startswith("medcert_core."):
                refused.append([importer, name])
                raise ImportError(f"{name} belongs to an extra of medcert (imported by {importer})")
            return None

    sys.meta_path.insert(0, RefuseExtras())

    # a package a core dependency has already loaded (yaml, by huggingface_hub) is taken from
    # sys.modules without asking any finder: the import statement itself is checked too
    import builtins
    plain_import = builtins.__import__

    def refusing_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        if (level == 0 and name.partition(".")[0] in BLOCKED
                and (importer == "medcert_core" or importer.startswith("medcert_core."))):
            refused.append([importer, name])
            raise ImportError(f"{name} belongs to an extra of medcert (imported by {importer})")
        return plain_import(name, globals, locals, fromlist, level)

    builtins.__import__ = refusing_import

    def library(name):
        return not any(name == skip or name.startswith(skip + ".") for skip in NOT_LIBRARY)

    failures, imported, pending = {}, [], ["medcert_core"]
    while pending:
        name = pending.pop(0)
        try:
            module = importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-4)
            continue
        imported.append(name)
        if hasattr(module, "__path__"):
            pending += [info.name for info in pkgutil.iter_modules(module.__path__, name + ".") if library(info.name)]

    library_refused = list(refused)  # refused imports that a module caught (an optional import) are fine
    # the refusal itself works: a medcert_core module importing plotly (not loaded yet) or yaml
    # (loaded by huggingface_hub, when the library imported diffusers) gets an ImportError
    probe_refused = {}
    for statement in ("import plotly", "from yaml import safe_load"):
        probe = types.ModuleType("medcert_core._packaging_probe")
        try:
            exec(statement, probe.__dict__)
            probe_refused[statement] = False
        except ImportError:
            probe_refused[statement] = True
    print(json.dumps({"imported": imported, "failures": failures, "refused": library_refused,
                      "probe_refused": probe_refused}))
''')


@pytest.mark.slow  # a fresh interpreter imports torch, diffusers and segmentation-models-pytorch (10-30 s)
def test_library_modules_import_without_any_extra():
    blocked = _blocked_import_names()
    assert {"plotly", "yaml", "papermill", "submitit", "filelock", "statsmodels", "pytest"} <= blocked
    result = subprocess.run([sys.executable, "-c", _IMPORT_LIBRARY, json.dumps(sorted(blocked)),
                             json.dumps(NOT_LIBRARY)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(report["probe_refused"].values()), f"an extra's package got through: {report['probe_refused']}"
    assert report["failures"] == {}, "library modules that need an extra at import time:\n" + "\n".join(
        f"--- {name}\n{trace}" for name, trace in report["failures"].items())
    imported = set(report["imported"])
    expected = {f"medcert_core.{name}" for name in ("certify", "smoothing", "metrics", "io", "checks", "errors",
                                                    "distributed", "attack", "training", "models", "denoisers",
                                                    "data")}
    assert expected <= imported, expected - imported
    assert not any(name.startswith(NOT_LIBRARY) for name in imported)


def _library_files() -> list[Path]:
    files = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if not any(module == skip or module.startswith(skip + ".") for skip in NOT_LIBRARY):
            files.append(path)
    return files


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level names of absolute imports run at import time (not inside a function or class)."""
    names: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    statements.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return names


def test_library_imports_at_module_level_only_core_dependencies():
    core = {canonicalize_name(Requirement(text).name) for text in _pyproject()["project"]["dependencies"]}
    owners = metadata.packages_distributions()
    undeclared = {}
    for path in _library_files():
        for name in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if name in sys.stdlib_module_names or name == "__future__" or name == PACKAGE:
                continue
            distributions = {canonicalize_name(distribution) for distribution in owners.get(name, [])}
            if not distributions & core:
                undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert undeclared == {}, f"imported at module level by the library, not a core dependency: {undeclared}"
