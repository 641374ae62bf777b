"""The one schema (medcert_core.study.settings): every default in one place and the same everywhere,
the templates' parameters cells written from it, one raising check, and a dataset chapter's runs
defined once for its notebook and for certify-runs."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from medcert_core.certify import certify_counts
from medcert_core.smoothing import SmoothedSegmenter
from medcert_core.study import Experiment
from medcert_core.study.chapter import DatasetChapter
from medcert_core.study.grid.spec import template_parameters
from medcert_core.study.runs.run import CertificationRun
from medcert_core.study.settings import DEFAULTS, SETTINGS, DataSpec, check_setting, parameters_cell, training_spec

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "notebooks").glob("*.ipynb"))
DATA_SETTINGS = {"profile", "dataset", "data_root", "image_size", "test_images"}  # what a chapter's data changes


def parameters_source(template: Path) -> str:
    notebook = nbformat.read(str(template), as_version=4)
    return next(cell.source for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: path.stem)
def test_each_parameters_cell_is_written_from_the_schema(template):
    values = template_parameters(template)
    assert parameters_source(template) == parameters_cell(values), \
        "a parameters cell restates the schema: run python scripts/format_templates.py"
    assert set(SETTINGS) <= set(values), "every shared setting is in the cell, so a reader can change it in Jupyter"
    drifted = {name: values[name] for name in set(SETTINGS) - DATA_SETTINGS if values[name] != DEFAULTS[name]}
    assert not drifted, f"templates keep the schema's defaults of shared settings other than their data: {drifted}"


def test_the_defaults_are_the_schemas_everywhere():
    experiment = Experiment()
    for name in set(SETTINGS) - {"training", "sigmas"}:
        if hasattr(experiment, name):
            assert getattr(experiment, name) == DEFAULTS[name], name
    assert list(experiment.sigmas) == DEFAULTS["sigmas"] and experiment.training_overrides == DEFAULTS["training"]
    run_defaults = {field.name: field.default for field in dataclasses.fields(CertificationRun)}
    assert {name: run_defaults[name] for name in ("n0", "n", "alpha", "tau", "precision", "denoiser_flags")} == \
        {name: DEFAULTS[name] for name in ("n0", "n", "alpha", "tau", "precision", "denoiser_flags")}
    for function in (SmoothedSegmenter.certify, certify_counts):
        parameters = inspect.signature(function).parameters
        assert (parameters["tau"].default, parameters["alpha"].default) == (DEFAULTS["tau"], DEFAULTS["alpha"])
    from medcert_core.__main__ import build_parser

    arguments = build_parser().parse_args(["certify", "x.png", "--checkpoint", "c.pt", "--sigma", "0.5"])
    assert {name: getattr(arguments, name) for name in ("n0", "n", "alpha", "tau", "batch_size", "precision")} == \
        {name: DEFAULTS[name] for name in ("n0", "n", "alpha", "tau", "batch_size", "precision")}


@pytest.mark.parametrize("name, value, message", [
    ("n0", 0, "parameter 'n0': n0 must be an integer >= 1, got 0"),
    ("sigmas", [0.5, -1.0], "parameter 'sigmas': sigma must be"),
    ("n", True, "parameter 'n' must be int (its default is 100), got bool True"),
    ("precision", "fp8", "parameter 'precision': unknown value 'fp8'; valid: ['fp32', 'bf16', 'fp16', 'auto']"),
    ("training", {"epoch": 1}, "parameter 'training': unknown training setting(s) ['epoch']"),
    ("sigma", 0.5, "unknown parameter 'sigma'; valid: ['alpha', 'batch_size',"),
])
def test_one_check_raises_with_the_same_message_everywhere(name, value, message):
    with pytest.raises(ValueError) as info:
        check_setting(name, value)
    assert message in str(info.value)
    if name in DEFAULTS:
        check_setting(name, DEFAULTS[name])  # the default itself is valid


def test_a_template_parameter_outside_the_schema_is_refused_by_the_cell_writer():
    with pytest.raises(ValueError, match=r"template parameters \['archz'\] are not in the schema"):
        parameters_cell({"archz": ["unet"]})


def _chapter(template: str, **values) -> DatasetChapter:
    return DatasetChapter.from_parameters({**template_parameters(REPO / "notebooks" / f"{template}.ipynb"), **values})


def _runs_read(chapter: DatasetChapter, monkeypatch) -> list:
    """The runs a chapter's notebook reads (per_arch, comparison, curves), recorded instead of computed."""
    read = []
    monkeypatch.setattr(Experiment, "run", lambda self, archs, methods: (read.extend(self.runs(archs, methods)),
                                                                         pd.DataFrame({"x": [0]}))[1])
    monkeypatch.setattr(Experiment, "curves", lambda self, archs, methods: read.extend(
        run for run in self.runs(archs, methods) if run.sigma > 0))
    chapter.per_arch(), chapter.comparison(), chapter.curves()
    return read


def test_a_dataset_chapter_computes_exactly_the_runs_its_notebook_reads(monkeypatch):
    chapter = _chapter("phantom")
    assert set(_runs_read(chapter, monkeypatch)) == set(chapter.runs())
    assert len(chapter.runs()) == len(set(chapter.runs()))


def test_baselines_for_all_gives_every_architecture_segcertify_and_the_clean_rows():
    first = _chapter("jsrt", baselines_for="first")
    every = _chapter("jsrt")
    assert every.baselines_for == "all", "the JSRT chapter compares every architecture (as its tables say)"

    def compared(chapter):
        return {run.arch for run in chapter.runs() if run.method.name != "ours"}

    assert compared(first) == {"resunetpp"} and compared(every) == {"resunetpp", "unet", "deeplabv2"}
    with pytest.raises(ValueError, match="baselines_for must be one of"):
        _chapter("jsrt", baselines_for="some")


def test_certify_runs_builds_the_chapter_the_notebook_builds():
    from medcert_core.study.workflow import chapter_runs

    experiment, runs = chapter_runs(REPO / "grids" / "jsrt.yaml", data_root="/data", device="cpu", root=REPO)
    notebook = _chapter("jsrt", data_root=experiment.data_root, test_images=25, device="cpu", interactive=False,
                        precision="auto", training_seeds=[0, 1, 2])  # as the grid says
    assert runs == notebook.runs() and experiment.test_images == 25
    assert {run.training.training_seed for run in runs} == {None, 1, 2}, "seed 0 keeps the split's seed (its keys unchanged)"
    assert {run.arch for run in runs if run.method.name == "segcertify"} == {"resunetpp", "unet", "deeplabv2"}


def test_a_notebook_without_chapter_parameters_is_not_a_dataset_chapter():
    with pytest.raises(ValueError, match=r"not a dataset chapter: its parameters lack \['archs'"):
        DatasetChapter.from_parameters({"arch": "unet"})
    assert DataSpec("phantom", None, 64).tag == "phantom_64" and training_spec("quick").epochs == 40


def test_the_settings_table_names_the_chapters_training_overrides():
    assert Experiment(profile="jsrt").profile_description() == "jsrt"
    experiment = Experiment(profile="jsrt", training_overrides={"preset": "tiny", "epochs": 5})
    assert experiment.profile_description() == "jsrt (epochs 5, preset tiny)"
    assert experiment.with_training_seed(0).profile_description() == "jsrt (epochs 5, preset tiny)"
    assert experiment.with_training_seed(3).profile_description() == "jsrt (epochs 5, preset tiny, training_seed 3)"


def test_the_settings_table_names_the_seeds_models_are_trained_from():
    experiment = Experiment(profile="smoke", dataset="phantom")
    assert experiment.settings_table().loc["training seeds", "value"] == "0"
    assert experiment.with_training_seed(2).settings_table().loc["training seeds", "value"] == "2"
    chapter = _chapter("dataset", profile="smoke", dataset="phantom", data_root=None, training_seeds=[0, 1, 2])
    assert chapter.settings_table().loc["training seeds", "value"] == "0, 1, 2"


@pytest.mark.parametrize(("input_size", "setting", "expected"), [
    (128, 64, (64, 64)),           # JSRT: the 128 px input box-averaged by 2
    ((144, 192), 72, (72, 96)),    # CVC-ClinicDB's 4:3 frames keep their aspect
    ((144, 192), None, (144, 192)),
    ((512, 512), None, (256, 256)),  # at most 256 high by default
])
def test_the_ddpms_resolution_keeps_the_inputs_aspect(input_size, setting, expected):
    from medcert_core.study.runs.assets import ddpm_image_size
    from medcert_core.study.settings import DataSpec, TrainingSpec

    data = DataSpec("phantom", None, input_size, 0)
    assert ddpm_image_size(data, TrainingSpec(ddpm_image_size=setting)) == expected


def test_a_chapter_over_training_seeds_reads_every_seeds_runs_and_only_them(monkeypatch):
    chapter = _chapter("phantom", training_seeds=[0, 3])
    assert set(_runs_read(chapter, monkeypatch)) == set(chapter.runs())
    seeds = {run.training.training_seed for run in chapter.runs()}
    assert seeds == {None, 3}, "seed 0 is the split's: its runs keep their keys"
    assert len(chapter.runs()) == 2 * len(_chapter("phantom").runs())
    with pytest.raises(ValueError, match="training_seeds must name at least one seed, each once"):
        _chapter("phantom", training_seeds=[1, 1])


def test_without_training_seeds_a_chapter_trains_from_its_split_seed_or_its_explicit_training_seed(monkeypatch):
    for values, seed in (({"seed": 1}, None), ({"seed": 0, "training": {"training_seed": 3}}, 3)):
        chapter = _chapter("phantom", **values)
        assert {run.training.training_seed for run in chapter.runs()} == {seed}
        assert chapter.experiment.training.training_seed == seed, "the figures' experiment: the same models"
    other = _chapter("phantom", seed=0, training_seeds=[2, 5])
    assert other.experiment.training.training_seed == 2, "the figures use the first seed's models"
    assert set(_runs_read(other, monkeypatch)) == set(other.runs())


def test_a_grid_may_name_several_training_seeds_and_each_is_checked():
    defaults = {**DEFAULTS, "training_seeds": None}
    check_setting("training_seeds", [0, 1, 2], defaults)
    check_setting("training_seeds", None, defaults)
    with pytest.raises(ValueError, match="parameter 'training_seeds': each training seed must be null or an integer"):
        check_setting("training_seeds", [0, -1], defaults)


def test_every_dataset_chapter_template_shows_the_settings_of_all_its_training_seeds():
    """A chapter run over several training seeds names them all: its settings table is the chapter's
    (``DatasetChapter.settings_table``), not its first seed's experiment's (which says 'training seeds 0')."""
    import nbformat

    chapters = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        code = "\n".join(cell.source for cell in nbformat.read(str(path), as_version=4).cells if cell.cell_type == "code")
        if "DatasetChapter.from_parameters" in code:
            chapters.append(path.stem)
            assert "chapter.settings_table()" in code and "experiment.settings_table()" not in code, path.name
    assert {"jsrt", "cxr_lungs", "cvc_clinicdb", "dataset"} <= set(chapters)
