"""The ``paper`` profile proven end to end without the real data.

``medcert_core.testing.fixtures`` writes the five datasets in their distributed layouts and formats
(JSRT ``.IMG`` + SCR GIFs, Montgomery and Shenzhen PNGs, ISIC JPEGs, CVC TIFFs; phantom content)
and a guided-diffusion checkpoint in OpenAI's key layout at reduced width. The slow test runs
``python -m medcert_core study --profile paper`` over them on the CPU in a temporary copy of the
project, shrunk with the documented ``--set`` overrides (1 test image, one sigma, n0 = 1, n = 2,
1-epoch tiny segmenters, one architecture, a 2-step ablation, a 1-step UNet denoiser), and checks
that every chapter of the paper grid executed without an error, that the results store holds
exactly the expected runs, that JSRT went through the 256 px diffusion model at 512 px, and that
the book builds. ``pytest -s`` prints the time of each phase.

The fast tests check the pieces: the fixtures' layout and what the loaders read from it, the
checkpoint's key layout against the independent guided-diffusion re-implementation in
``test_guided_diffusion.py``, MODEL_FLAGS parsing, and ``--set`` / ``training`` overrides.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from medcert_core.data import load_dataset
from medcert_core.data.chest import JSRT_IMG_SHAPE
from medcert_core.testing.fixtures import (
    CHECKPOINT_NAME,
    FIXTURE_MODEL_FLAGS,
    SCR_ORGANS,
    guided_diffusion_shapes,
    guided_diffusion_state_dict,
    write_paper_fixtures,
)
from medcert_core.data.phantom import chest_phantom
from medcert_core.denoisers import load_denoiser, model_flags
from medcert_core.denoisers.guided_diffusion import GUIDED_DIFFUSION_DEFAULTS, channel_multipliers, parse_model_flags
from medcert_core.study.settings import TrainingSpec
from medcert_core.study.grid.spec import parse_grid, parse_override

REPO = Path(__file__).resolve().parents[1]
PAPER_GRID = "grids/paper.yaml"

# The smoke-sized paper grid: what a user with little time passes to `study --profile paper`.
OVERRIDES = {
    "denoiser_flags": FIXTURE_MODEL_FLAGS,
    "test_images": 1,
    "sigmas": [0.5],
    "n0": 1,
    "n": 2,
    "batch_size": 3,
    "archs": ["unet"],
    "arch": "unet",
    "multi_steps": [2],
    "training": {"epochs": 1, "preset": "tiny", "unet_denoiser_steps": 1, "unet_denoiser_batch_size": 2},
    "split_block": 1,  # cvc_clinicdb's runs of 20 frames would leave 6 fixture frames no test split
}
PLAIN_DICE_BY_SPLIT = 2  # cvc_clinicdb's plain Dice on each split's whole test split (blocked, random)
DATASET_CHAPTERS = ("jsrt", "montgomery", "shenzhen", "isic2018", "cvc_clinicdb")
OURS = "ours (guided-diffusion, single-step)"


def set_arguments(overrides: dict) -> list[str]:
    """``--set KEY=VALUE`` arguments, values written as JSON (which is YAML)."""
    return [argument for key, value in overrides.items() for argument in ("--set", f"{key}={json.dumps(value)}")]


def project_copy(root: Path) -> Path:
    """What `study --profile paper` needs of the project: templates, the grid, the book's sources."""
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "grids").mkdir()
    shutil.copy(REPO / PAPER_GRID, root / PAPER_GRID)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("*.ipynb", ".*"))
    (root / "results").mkdir()
    shutil.copy(REPO / "results" / "README.md", root / "results" / "README.md")  # book/results.md includes it
    return root


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_fixtures(tmp_path_factory):
    """The five datasets, 6 cases each, every image but JSRT's at a quarter of the distributed size."""
    return write_paper_fixtures(tmp_path_factory.mktemp("paper_data"), native=0, checkpoint=False)


def test_fixtures_are_laid_out_as_distributed(small_fixtures):
    root = small_fixtures.root
    ids = small_fixtures.case_ids
    assert ids["jsrt"] == ["JPCLN001", "JPCLN002", "JPCLN003", "JPCNN001", "JPCNN002", "JPCNN003"]
    for case_id in ids["jsrt"]:
        image = root / "jsrt" / "All247images" / f"{case_id}.IMG"
        assert image.stat().st_size == JSRT_IMG_SHAPE[0] * JSRT_IMG_SHAPE[1] * 2  # headerless 16-bit words
        assert int(np.fromfile(image, dtype=">u2").max()) <= 4095  # 12-bit values
        folds = [root / "jsrt" / "scr" / fold / "masks" for fold in ("fold1", "fold2")]
        (fold,) = [fold for fold in folds if (fold / "heart" / f"{case_id}.gif").is_file()]
        for organ in SCR_ORGANS:
            with Image.open(fold / organ / f"{case_id}.gif") as gif:  # as SCR's: GIF, grayscale, 0 / 255
                assert (gif.format, gif.mode, gif.size) == ("GIF", "L", (1024, 1024))
                assert set(np.unique(np.asarray(gif)).tolist()) <= {0, 255}
    for case_id in ids["montgomery"]:
        for folder in ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask"):
            assert (root / "montgomery" / folder / f"{case_id}.png").is_file()
    shenzhen = sorted(p.name for p in (root / "shenzhen" / "CXR_png").iterdir())
    assert len(shenzhen) == 7 and len(list((root / "shenzhen" / "mask").iterdir())) == 6  # one without a mask
    assert (root / "isic2018" / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg").is_file()
    assert (root / "isic2018" / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000000_segmentation.png").is_file()
    with Image.open(root / "cvc_clinicdb" / "Original" / "1.tif") as tif:
        assert (tif.format, tif.mode, tif.size) == ("TIFF", "RGB", (384, 288))
    assert (root / "cvc_clinicdb" / "Ground Truth" / "1.tif").is_file()


@pytest.mark.parametrize("dataset", DATASET_CHAPTERS)
def test_the_loaders_read_every_split_of_the_fixtures(small_fixtures, dataset):
    with pytest.warns(UserWarning, match="skipped 1 of 7") if dataset == "shenzhen" else contextlib.nullcontext():
        splits = {split: load_dataset(dataset, small_fixtures.datasets[dataset], split, image_size=64)
                  for split in ("train", "val", "test")}
    assert [len(splits[split]) for split in ("train", "val", "test")] == [4, 1, 1]
    image, mask = splits["train"][0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() < image.max() <= 1
    assert 0 < (mask > 0).float().mean() < 0.8, "a structure to segment, not all background"


def test_jsrt_fixture_labels_survive_the_scr_round_trip(small_fixtures):
    """The SCR organ masks (lungs overlapping clavicles and heart) repaint the phantom's labels exactly."""
    dataset = load_dataset("jsrt", small_fixtures.datasets["jsrt"], "all", image_size=1024, layout="original")
    _, mask = dataset[0]
    _, labels = chest_phantom(0, 0, (1024, 1024))
    assert np.array_equal(mask.numpy(), labels)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}


# --------------------------------------------------------------------------- the checkpoint and its flags


def _reference_flags(flags: dict) -> dict:
    """Flags of test_guided_diffusion.ReferenceUNet (every one explicit, channel_mult spelled out)."""
    names = ("image_size", "num_channels", "num_res_blocks", "attention_resolutions", "num_heads", "num_head_channels",
             "num_heads_upsample", "learn_sigma", "resblock_updown", "use_scale_shift_norm", "use_new_attention_order")
    full = {name: flags.get(name, GUIDED_DIFFUSION_DEFAULTS[name]) for name in names}
    mults = channel_multipliers(full["image_size"], flags.get("channel_mult", ""))
    return {**full, "channel_mult": ",".join(str(int(m)) for m in mults)}


@pytest.mark.parametrize("flags", [FIXTURE_MODEL_FLAGS, ""], ids=["fixture", "256x256_diffusion_uncond"])
def test_checkpoint_keys_are_guided_diffusions_own(flags):
    from test_guided_diffusion import ReferenceUNet  # an independent re-implementation of guided-diffusion's UNet

    with torch.device("meta"):
        reference = ReferenceUNet(**_reference_flags(parse_model_flags(flags)))
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    shapes = guided_diffusion_shapes(**parse_model_flags(flags))
    assert list(shapes) == list(expected) and shapes == expected  # names, order and shapes
    if not flags:
        assert sum(int(np.prod(shape)) for shape in shapes.values()) == 552_814_086


def test_the_fixture_checkpoint_denoises_512_px_through_the_256_px_model(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    torch.save(guided_diffusion_state_dict(FIXTURE_MODEL_FLAGS), path)
    assert set(torch.load(path, weights_only=True)) == set(guided_diffusion_shapes(**model_flags(FIXTURE_MODEL_FLAGS)))
    with pytest.raises(ValueError, match="does not match the guided-diffusion UNet"):  # the defaults are the 552 M model
        load_denoiser(f"guided-diffusion:{path}", 0.5)
    denoiser = load_denoiser(f"guided-diffusion:{path}", 0.5, flags=FIXTURE_MODEL_FLAGS)
    assert denoiser.image_size == (256, 256)
    noisy = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clean = denoiser(noisy)
    assert clean.shape == noisy.shape and 0 <= clean.min() and clean.max() <= 1
    assert denoiser.effective_sigma(3, (512, 512)) < 0.5 * 0.6, "the 512 -> 256 resize averages the noise"


def test_model_flags_parse_as_guided_diffusions_argparse():
    readme = ("--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
              "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
              "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True")
    flags = parse_model_flags(readme)  # guided-diffusion's README, 256x256 unconditional model
    assert flags["attention_resolutions"] == "32,16,8" and flags["num_channels"] == 256
    assert flags["learn_sigma"] is True and flags["class_cond"] is False
    assert "diffusion_steps" not in flags and "noise_schedule" not in flags  # schedule flags: checked, dropped
    assert flags.pop("use_fp16") is True  # no effect on the weights: the converted model is float32
    assert {key: GUIDED_DIFFUSION_DEFAULTS[key] for key in flags} == flags  # the other flags are the defaults
    assert parse_model_flags("") == {} and model_flags(None) == {}
    assert parse_model_flags("--learn_sigma=false --num_heads_upsample -1 --dropout 0.1") == {
        "learn_sigma": False, "num_heads_upsample": -1, "dropout": 0.1}
    with pytest.raises(ValueError, match=r"unknown guided-diffusion flag\(s\) \['--num_chanels'\].*--num_channels"):
        parse_model_flags("--num_chanels 128")
    with pytest.raises(ValueError, match="--batch_size"):  # SAMPLE_FLAGS are not the model's
        parse_model_flags("--batch_size 4 --num_samples 100")
    with pytest.raises(ValueError, match="invalid int value: '1.5'"):
        parse_model_flags("--num_res_blocks 1.5")
    with pytest.raises(ValueError, match="boolean value expected"):
        parse_model_flags("--learn_sigma maybe")
    with pytest.raises(ValueError, match="'2' is not a flag"):
        parse_model_flags("--num_res_blocks 1 2")
    with pytest.raises(ValueError, match="linear 1000-step schedule"):
        parse_model_flags("--noise_schedule cosine")


# --------------------------------------------------------------------------- --set overrides


@pytest.fixture
def notebooks(tmp_path):
    """Two templates with parameters cells: one with ``archs``, one with ``arch``."""
    common = ('profile = "quick"\nsigmas = [0.25, 0.5, 1.0]\nn = 100\ntest_images = 3\ntraining = None\n'
              'denoiser_flags = ""\ndenoiser = "ddpm:auto"\n')
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name, extra in (("jsrt", 'archs = ["resunetpp"]\n'), ("ablation", 'arch = "unet"\n')):
        cell = nbformat.v4.new_code_cell(common + extra, metadata={"tags": ["parameters"]})
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(folder / f"{name}.ipynb"))
    return folder


GRID = {"parameters": {"profile": "paper"},
        "runs": [{"notebook": "jsrt", "sweep": {"n": [50, 100]}}, {"notebook": "ablation"}]}


def test_set_overrides_every_entry_whose_template_has_the_parameter(notebooks):
    plain = parse_grid(GRID, "paper.yaml", notebooks)
    entries = parse_grid(GRID, "paper.yaml", notebooks,
                         dict([parse_override("n=20"), parse_override("sigmas=[0.5]"), parse_override("archs=[unet]"),
                               parse_override("training={epochs: 1, preset: tiny}")]))
    assert [entry.output for entry in entries] == ["jsrt", "ablation"], "an overridden sweep is not swept"
    assert all(entry.parameters["n"] == 20 and entry.parameters["sigmas"] == [0.5] for entry in entries)
    assert entries[0].parameters["archs"] == ["unet"] and "archs" not in entries[1].parameters
    assert entries[1].parameters["training"] == {"epochs": 1, "preset": "tiny"}
    assert entries[1].hash != plain[1].hash, "the grid hash covers the overrides"
    retrained = parse_grid(GRID, "paper.yaml", notebooks, {"training": {"epochs": 2, "preset": "tiny"}})
    assert retrained[1].hash != entries[1].hash


@pytest.mark.parametrize("override, message", [
    ("sigma=[0.5]", r"--set sigma: no notebook of this grid has a parameter 'sigma'; valid: \['arch', 'archs', "),
    ("n=0", r"--set, entry 1 .*parameter 'n': n must be an integer >= 1, got 0"),
    ("test_images=one", r"parameter 'test_images' must be int or null"),
    ("archs=[vgg]", r"parameter 'archs': unknown value \['vgg'\]"),
    ("training={epoch: 1}", r"parameter 'training': unknown training setting\(s\) \['epoch'\]; valid: \['preset', 'epochs'"),
    ("training={preset: huge}", r"training setting 'preset' must be one of \['matched', 'paper', 'tiny'\]"),
    ("training=[1]", r"training overrides must be a mapping"),
    ("denoiser_flags=--num_chanels 32", r"parameter 'denoiser_flags': unknown guided-diffusion flag\(s\) \['--num_chanels'\]"),
    ("denoiser_flags=--num_channels 48", r"parameter 'denoiser_flags': .*cannot be split into heads"),
])
def test_bad_overrides_are_explained_before_anything_runs(notebooks, override, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(GRID, "paper.yaml", notebooks, dict([parse_override(override)]))


def test_cli_set_needs_key_equals_value(capsys):
    from medcert_core.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["grid", PAPER_GRID, "--set", "n"])
    assert exit_info.value.code == 2
    assert "argument --set: an override must be KEY=VALUE" in capsys.readouterr().err
    assert parse_override("test_images=null") == ("test_images", None)
    assert parse_override('denoiser_flags="--num_channels 32 --learn_sigma True"')[1] == "--num_channels 32 --learn_sigma True"


def test_training_overrides_replace_fields_of_the_profile():
    spec = TrainingSpec(preset="paper", epochs=None, unet_denoiser_steps=5000)
    assert spec.with_overrides({"epochs": 1, "preset": "tiny"}) == TrainingSpec(preset="tiny", epochs=1,
                                                                                unet_denoiser_steps=5000)
    assert spec.with_overrides(None) is spec
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['width'\]; valid: \[.*'unet_denoiser_steps'"):
        spec.with_overrides({"width": 8})


# --------------------------------------------------------------------------- end to end


def expected_runs() -> set[tuple[str, str, float]]:
    """(dataset, method label, sigma) of every run the shrunk paper grid stores (arch: unet)."""
    per_dataset = {(OURS, 0.5), ("plain (noise 0)", 0.0), ("plain (noise 0.25)", 0.0), ("SegCertify", 0.5)}
    jsrt_ablations = {("ours (guided-diffusion, 2-step)", 0.5), ("ours (unet)", 0.5), ("ours (no denoiser)", 0.5)}
    return ({(dataset, label, sigma) for dataset in DATASET_CHAPTERS for label, sigma in per_dataset}
            | {("jsrt", label, sigma) for label, sigma in jsrt_ablations})


@pytest.mark.slow
def test_the_paper_grid_runs_end_to_end_on_the_fixtures(tmp_path):
    start = time.perf_counter()
    fixtures = write_paper_fixtures(tmp_path / "data", native=1)
    written = time.perf_counter()
    root = project_copy(tmp_path / "project")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEDCERT_TRACEBACK": "1"}
    command = [sys.executable, "-m", "medcert_core", "study", "--profile", "paper", "--data-root",
               str(fixtures.root), "--device", "cpu", *set_arguments(OVERRIDES)]
    completed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    finished = time.perf_counter()
    assert completed.returncode == 0, f"study failed:\n{completed.stderr[-6000:]}"

    grid = yaml.safe_load((REPO / PAPER_GRID).read_text())
    chapters = [entry.get("output", entry["notebook"]) for entry in grid["runs"]]
    assert len(chapters) == 8
    for chapter in chapters:  # every chapter executed, with the overrides, and without an error
        notebook = nbformat.read(str(root / "book" / f"{chapter}.ipynb"), as_version=4)
        metadata = notebook.metadata.get("medcert", {})
        assert not metadata.get("placeholder"), f"{chapter} was not executed"
        parameters = metadata["parameters"]
        assert parameters["profile"] == "paper" and parameters["device"] == "cpu"
        assert {key: parameters[key] for key in ("denoiser_flags", "training", "n", "sigmas")} == {
            key: OVERRIDES[key] for key in ("denoiser_flags", "training", "n", "sigmas")}
        assert parameters["denoiser"] == f"guided-diffusion:../data/{CHECKPOINT_NAME}"
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.get("execution_count") for cell in code), f"{chapter}: a cell did not run"
        errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
        assert not errors, f"{chapter}: {errors[0]}"
        assert (root / "_build" / "html" / "book" / f"{chapter}.html").is_file()
    assert (root / "_build" / "html" / "index.html").is_file()

    results = root / "runs" / "results"
    rows = pd.read_csv(results / "aggregate.csv")
    assert set(rows["arch"]) == {"unet"} and set(rows["device"]) == {"cpu"}
    stored = set(zip(rows["dataset"], rows["method_label"], rows["sigma"]))
    assert stored == expected_runs()
    complete = sorted(path.parent.name for path in (results / "runs").glob("*/metadata.json"))
    assert sorted(rows["run"].unique()) == complete and len(complete) == len(expected_runs()) + PLAIN_DICE_BY_SPLIT
    assert rows.groupby("run")["image_id"].nunique().eq(1).all(), "one test image per run"

    jsrt_ours = rows[(rows["dataset"] == "jsrt") & (rows["method_label"] == OURS)]
    assert set(jsrt_ours["image_size"].astype(str)) == {"512"}
    assert set(jsrt_ours["denoiser"]) == {f"guided-diffusion:../data/{CHECKPOINT_NAME}"}
    with np.load(results / "runs" / jsrt_ours["run"].iloc[0] / "maps.npz") as maps:
        assert maps["labels"].shape == (1, 512, 512), "certified at 512 px through the 256 px diffusion model"
    print(f"\npaper profile end to end: fixtures {written - start:.0f} s, study (grid + book) "
          f"{finished - written:.0f} s, total {time.perf_counter() - start:.0f} s")
