"""Bad input: one test per row of the "Bad input: what you see" table of the reference chapter (book/reference.md).

The API raises an error whose message names the culprit (the file, the parameter) and the fix;
the CLI exits with code 2, the message on stderr (``medcert: error: ...``, or argparse's
``medcert COMMAND: error: argument ...``) and no traceback. Fixtures are tiny folders in tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medcert_core.__main__ import main
from medcert_core.certify import certify, certify_counts, smallest_certifiable_n
from medcert_core.data import load_dataset
from medcert_core.data.rgb import CVC_IMAGES, CVC_MASKS, ISIC_INPUT, ISIC_TRUTH
from medcert_core.denoisers import load_denoiser
from medcert_core.models import create_model
from medcert_core.study.grid.spec import parse_grid
from medcert_core.study.settings import training_spec
from medcert_core.training import TrainConfig, load_segmenter

REPO = Path(__file__).resolve().parents[1]
SIZE = (40, 48)  # fixture images, H x W
CHEST = ("background", "lung", "heart", "clavicle")
JSRT_ORGANS = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")


# --------------------------------------------------------------------------- helpers


def save(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` to ``path``; TIFF through tifffile (any dtype), the rest through PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def truncate(path: Path) -> Path:
    """Cut ``path`` to half its bytes: a corrupt file with a valid header."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def gray(i: int = 0, size: tuple[int, int] = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return ((xx * 3 + yy * 2 + 17 * i) % 256).astype(np.uint8)


def disc(value: int = 255, size: tuple[int, int] = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (((yy - size[0] // 2) ** 2 + (xx - size[1] // 2) ** 2 < size[0] ** 2 // 9) * value).astype(np.uint8)


def folder_dataset(root: Path, cases: int = 6, image=None, mask=None, image_suffix: str = ".png") -> Path:
    """``root/images`` + ``root/masks`` with ``cases`` cases (6: every split non-empty)."""
    for i in range(cases):
        save(root / "images" / f"k{i}{image_suffix}", gray(i) if image is None else image)
        save(root / "masks" / f"k{i}.png", disc() if mask is None else mask)
    return root


def jsrt_original(root: Path, ids: tuple[str, ...] = ("JPCLN001",)) -> Path:
    """JSRT's original layout: blank 2048 x 2048 .IMG files and 64 x 64 SCR-style GIF masks."""
    for case in ids:
        (root / "All247images").mkdir(parents=True, exist_ok=True)
        np.zeros((2048, 2048), ">u2").tofile(root / "All247images" / f"{case}.IMG")
        for organ in JSRT_ORGANS:
            save(root / "scr" / organ.replace("_", " ") / f"{case}.gif", disc(size=(64, 64)))
    return root


def cli(capsys, *argv: object) -> str:
    """Run the CLI on bad input: it must exit with code 2 and no traceback; returns its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


def grid_file(tmp_path: Path, parameters: dict) -> Path:
    """A one-entry grid file (the phantom chapter) with ``parameters``."""
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"runs": [{"notebook": "phantom", "parameters": parameters}]}))
    return path


def grid_cli(capsys, monkeypatch, tmp_path: Path, parameters: dict) -> str:
    """``medcert grid`` on a grid file with ``parameters``; its stderr (checked by :func:`cli`)."""
    monkeypatch.chdir(REPO)
    path = grid_file(tmp_path, parameters)
    err = cli(capsys, "grid", path)
    assert str(path) in err
    return err


def save_checkpoint(path: Path, arch: str = "resunetpp", model_kwargs: dict | None = None,
                    weights: torch.nn.Module | None = None) -> Path:
    """A segmenter checkpoint as ``medcert train`` writes it (4 chest classes, 32 px, untrained)."""
    config = TrainConfig(arch=arch, in_channels=3, num_classes=4, class_names=CHEST, image_size=(32, 32),
                         model_kwargs=model_kwargs or {"base_channels": 4}, dataset="phantom")
    model = weights or config.build_model()
    torch.save({"config": dataclasses.asdict(config), "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("checkpoint") / "model.pt")


@pytest.fixture
def image(tmp_path) -> Path:
    return save(tmp_path / "chest.png", gray(size=(32, 32)))


# --------------------------------------------------------------------------- data on disk


def test_missing_data_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="Expected layout") as info:
        load_dataset("montgomery", missing, "train")
    assert f"montgomery: folder not found: {missing}" in str(info.value)
    assert "CXR_png/<ID>.png" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"jsrt: root folder \(not given\) not found"):
        load_dataset("jsrt", None, "train")
    # the real console entry, in a fresh interpreter
    run = subprocess.run([sys.executable, "-m", "medcert_core", "train", "--dataset", "montgomery",
                          "--data-root", str(missing), "--checkpoint", str(tmp_path / "x.pt")],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "MEDCERT_TRACEBACK": ""})
    assert run.returncode == 2
    assert f"medcert: error: montgomery: folder not found: {missing}" in run.stderr
    assert "ManualMask/leftMask/<ID>.png" in run.stderr and "Traceback" not in run.stderr


def test_wrong_layout(tmp_path, capsys):
    save(tmp_path / "images" / "k0.png", gray())  # no masks/ folder
    with pytest.raises(FileNotFoundError, match="masks/<ID>.png") as info:
        load_dataset("folder", tmp_path, "train")
    assert f"folder: folder not found: {tmp_path / 'masks'}" in str(info.value)
    err = cli(capsys, "train", "--dataset", "folder", "--data-root", tmp_path, "--checkpoint", tmp_path / "x.pt")
    assert f"folder: folder not found: {tmp_path / 'masks'}" in err and "masks/<ID>.png" in err


def test_image_without_mask(tmp_path, capsys):
    folder_dataset(tmp_path)
    save(tmp_path / "images" / "k9.png", gray())
    expected = f"mask file not found: {tmp_path / 'masks' / 'k9.*'} (for image {tmp_path / 'images' / 'k9.png'})"
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("folder", tmp_path, "train")
    assert expected in str(info.value)
    assert expected in cli(capsys, "train", "--dataset", "folder", "--data-root", tmp_path, "--checkpoint", tmp_path / "x.pt")


def test_image_mask_size_mismatch(tmp_path, capsys):
    folder_dataset(tmp_path, mask=disc(size=(20, 24)))
    with pytest.raises(ValueError) as info:
        load_dataset("folder", tmp_path, "all", image_size=32)[0]
    assert (f"mask shape (20, 24) of {tmp_path / 'masks' / 'k0.png'} differs from image shape (40, 48) of "
            f"{tmp_path / 'images' / 'k0.png'}") in str(info.value)
    err = cli(capsys, "train", "--dataset", "folder", "--data-root", tmp_path, "--image-size", "32",
              "--checkpoint", tmp_path / "x.pt")
    assert "mask shape (20, 24) of" in err and f"differs from image shape (40, 48) of {tmp_path / 'images'}" in err


def _corrupt_png(root: Path):
    folder_dataset(root)
    return truncate(root / "images" / "k0.png"), lambda: load_dataset("folder", root, "all", image_size=32)[0]


def rgb_pairs(images: Path, masks: Path, image_name: str, mask_name: str) -> Path:
    """Three RGB images and their disc masks, named from "k{i}"; returns the first image."""
    for i in range(3):
        save(images / image_name.format(i=i), np.stack([gray(i)] * 3, axis=-1))
        save(masks / mask_name.format(i=i), disc())
    return images / image_name.format(i=0)


def _corrupt_jpeg(root: Path):
    first = rgb_pairs(root / ISIC_INPUT, root / ISIC_TRUTH, "k{i}.jpg", "k{i}_segmentation.png")
    return truncate(first), lambda: load_dataset("isic2018", root, "all", image_size=32)[0]


def _corrupt_gif(root: Path):
    jsrt_original(root)
    return truncate(root / "scr" / "heart" / "JPCLN001.gif"), lambda: load_dataset("jsrt", root, "all", image_size=32)[0]


def _corrupt_tiff(root: Path):
    first = rgb_pairs(root / CVC_IMAGES, root / CVC_MASKS, "k{i}.tif", "k{i}.tif")
    return truncate(first), lambda: load_dataset("cvc_clinicdb", root, "all", image_size=32)[0]


def _corrupt_img(root: Path):
    jsrt_original(root)
    broken = root / "All247images" / "JPCLN001.IMG"
    broken.write_bytes(b"\x00" * 1000)
    return broken, lambda: load_dataset("jsrt", root, "all", image_size=32)[0]


@pytest.mark.parametrize("build, message", [
    (_corrupt_png, "cannot read image file {path}: "),
    (_corrupt_jpeg, "cannot read image file {path}: "),
    (_corrupt_gif, "cannot read mask file {path}: "),
    (_corrupt_tiff, "cannot read image file {path}: "),
    (_corrupt_img, "not a JSRT .IMG file: {path} has 1000 bytes, expected 8388608 (2048 x 2048 16-bit"),
], ids=["png", "jpeg", "gif", "tiff", "img"])
def test_corrupt_file(tmp_path, capsys, checkpoint, build, message):
    path, read = build(tmp_path / "data")
    with pytest.raises(ValueError) as info:
        read()
    assert message.format(path=path) in str(info.value)
    assert path.suffix == ".IMG" or "replace it with a complete PNG, JPEG, TIFF, BMP or GIF file" in str(info.value)
    # the certify command reads the same file as its image (a GIF mask too: PIL reads GIF images)
    err = cli(capsys, "certify", path, "--checkpoint", checkpoint, "--sigma", "0.5", "--output-dir", tmp_path / "out")
    assert message.format(path=path).replace("mask file", "image file") in err
    assert not (tmp_path / "out").exists(), "nothing is written"


def test_nan_or_inf_in_image(tmp_path, capsys, checkpoint):
    image = gray().astype(np.float32) / 255
    image[3, 4], image[5, 6] = np.nan, np.inf
    folder_dataset(tmp_path, image=image, image_suffix=".tif")
    path = tmp_path / "images" / "k0.tif"
    with pytest.raises(ValueError) as info:
        load_dataset("folder", tmp_path, "all", image_size=32)[0]
    assert f"image file {path} holds 2 NaN or infinite values; replace them" in str(info.value)
    err = cli(capsys, "certify", path, "--checkpoint", checkpoint, "--sigma", "0.5", "--output-dir", tmp_path / "out")
    assert f"medcert: error: image file {path} holds 2 NaN or infinite values" in err


def test_image_outside_unit_range(tmp_path, capsys, checkpoint):
    folder_dataset(tmp_path, image=np.linspace(0, 255, 40 * 48, dtype=np.float32).reshape(SIZE), image_suffix=".tif")
    path = tmp_path / "images" / "k0.tif"
    expected = f"image file {path} holds float values in [0, 255], outside [0, 1]; scale it to [0, 1]"
    with pytest.raises(ValueError) as info:
        load_dataset("folder", tmp_path, "all", image_size=32)[0]
    assert expected in str(info.value)
    assert expected in cli(capsys, "certify", path, "--checkpoint", checkpoint, "--sigma", "0.5")


def test_two_inputs_with_the_same_stem(tmp_path, capsys, checkpoint):
    folder = tmp_path / "inputs"
    first, second = save(folder / "a.png", gray(size=(32, 32))), save(folder / "a.jpg", gray(1, size=(32, 32)))
    expected = (f"{first.parent / 'a.jpg'} and {first.parent / 'a.png'} have the same stem 'a': their outputs "
                "(a_labels.png, ..., a_certificate.json) would overwrite each other; rename one")
    err = cli(capsys, "certify", folder, "--checkpoint", checkpoint, "--sigma", "0.5", "--output-dir", tmp_path / "out")
    assert f"medcert: error: {expected}" in err and str(second) in err
    assert not (tmp_path / "out").exists(), "refused before anything is written"


def test_binary_mask_with_other_values(tmp_path, capsys):
    for i in range(6):  # class ids 0, 1, 2 in a binary dataset: thresholding at 128 would empty them
        save(tmp_path / ISIC_INPUT / f"k{i}.jpg", np.stack([gray(i)] * 3, axis=-1))
        save(tmp_path / ISIC_TRUTH / f"k{i}_segmentation.png", (disc(1) * (1 + (gray() > 128))).astype(np.uint8))
    path = tmp_path / ISIC_TRUTH / "k0_segmentation.png"
    with pytest.raises(ValueError) as info:
        load_dataset("isic2018", tmp_path, "all", image_size=32)[0]
    assert f"mask {path} holds values [0, 1, 2]; a binary mask holds 0/255 (binarized at 128) or 0/1" in str(info.value)
    err = cli(capsys, "train", "--dataset", "isic2018", "--data-root", tmp_path, "--image-size", "32",
              "--checkpoint", tmp_path / "x.pt")
    assert "holds values [0, 1, 2]; a binary mask holds 0/255" in err and str(tmp_path / ISIC_TRUTH) in err


class _HalfResolutionHead(torch.nn.Module):
    """Logits at half the input's size: a segmentation head without its final upsample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x[:, :2], 2)


class _Identity2(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


def test_segmenter_output_at_another_resolution():
    from medcert_core.smoothing import SmoothedSegmenter

    smoothed = SmoothedSegmenter(_HalfResolutionHead(), 2, sigma=0.25, batch_size=4, device="cpu")
    with pytest.raises(ValueError) as info:
        smoothed.certify(torch.full((3, 8, 8), 0.5), 1, 10)
    assert str(info.value).startswith("the segmenter returns logits of shape (4, 2, 4, 4) for an input batch of "
                                      "shape (4, 3, 8, 8): expected (B, K, H, W) = (4, 2 (or 1), 8, 8); upsample")


def test_denoiser_output_of_another_shape():
    from medcert_core.smoothing import SmoothedSegmenter

    shrinking = torch.nn.AvgPool2d(2)
    smoothed = SmoothedSegmenter(_Identity2(), 2, sigma=0.25, denoiser=shrinking, batch_size=4, device="cpu")
    with pytest.raises(ValueError) as info:
        smoothed.certify(torch.full((3, 8, 8), 0.5), 1, 10)
    assert str(info.value).startswith("the denoiser returns (4, 3, 4, 4) for a noisy batch of shape (4, 3, 8, 8)")


def test_smoothed_input_outside_the_unit_range():
    from medcert_core.smoothing import SmoothedSegmenter

    smoothed = SmoothedSegmenter(_Identity2(), 2, sigma=0.25, device="cpu")
    with pytest.raises(ValueError) as info:
        smoothed.certify(torch.full((3, 8, 8), 255.0), 1, 10)
    assert str(info.value).startswith("x must lie in [0, 1] (sigma and the radius are in that scale), got values "
                                      "in [255, 255]")


def test_label_mask_beyond_its_classes(tmp_path):
    folder_dataset(tmp_path, cases=9, mask=disc(1))  # class ids 0, 1: two classes inferred from the first 8
    mask = disc(1)
    mask[0, 0] = 5
    path = save(tmp_path / "masks" / "k8.png", mask)
    with pytest.raises(ValueError) as info:
        load_dataset("folder", tmp_path, "all", image_size=32)[8]
    assert f"mask {path} holds values [0, 1, 5] outside 0..1" in str(info.value)
    assert "pass class_names to set it" in str(info.value)


# --------------------------------------------------------------------------- certification parameters

SAMPLES = np.zeros((12, 4, 4), dtype=np.int64)  # n0 = 2 + n = 10 draws of a 4 x 4 image
PARAMETER_CASES = {
    # name: (API call with the bad value, its message, bad CLI values, grid parameters, expected text)
    "sigma": (lambda: certify(SAMPLES, 2, sigma=0.0), "sigma must be a number > 0", ["0", "-0.5"],
              {"sigmas": [0.5, 0.0]}, "sigma must be a number > 0"),
    "tau": (lambda: certify(SAMPLES, 2, sigma=0.5, tau=0.3), "tau must be a number with 0.5 <= tau < 1",
            ["0.3", "1"], {"tau": 1.0}, "tau must be a number with 0.5 <= tau < 1, got 1.0"),
    "alpha": (lambda: certify(SAMPLES, 2, sigma=0.5, alpha=1.0), "alpha must be a number with 0 < alpha < 1",
              ["0", "1.5"], {"alpha": 0.0}, "alpha must be a number with 0 < alpha < 1, got 0.0"),
    "n0": (lambda: certify(SAMPLES, 0, sigma=0.5), "n0", ["0", "-3"], {"n0": 0}, "n0 must be an integer >= 1, got 0"),
    "n": (lambda: certify_counts(np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64), 0, sigma=0.5),
          "must be an integer >= 1, got 0", ["0"], {"n": 0}, "n must be an integer >= 1, got 0"),
}


@pytest.mark.parametrize("name", list(PARAMETER_CASES))
def test_parameter_out_of_range(name, tmp_path, capsys, monkeypatch, checkpoint, image):
    api, api_message, cli_values, grid_parameters, message = PARAMETER_CASES[name]
    with pytest.raises(ValueError, match="must be") as info:
        api()
    assert api_message in str(info.value)
    for value in cli_values:
        err = cli(capsys, "certify", image, "--checkpoint", checkpoint, "--sigma", "0.5", f"--{name}", value)
        parsed = int(value) if name in ("n0", "n") else float(value)
        assert f"argument --{name}: {name} must be" in err and f"got {parsed}" in err
    assert f"parameter {next(iter(grid_parameters))!r}: {message}" in grid_cli(capsys, monkeypatch, tmp_path, grid_parameters)


def test_n_too_small_to_certify_anything(tmp_path, capsys, checkpoint, image):
    with pytest.warns(UserWarning, match="n = 10 draws cannot certify any pixel: with 16 pixels"):
        certify(SAMPLES, 2, sigma=0.5)
    needed = smallest_certifiable_n(32 * 32, 0.75, 0.001, "holm")
    err = cli(capsys, "certify", image, "--checkpoint", checkpoint, "--sigma", "0.5", "--n", "5",
              "--output-dir", tmp_path / "out")
    assert (f"medcert: error: n = 5 cannot certify any pixel of a 32 x 32 image at tau = 0.75, alpha = 0.001 "
            f"(Holm over 1024 pixels); use n >= {needed}") in err
    assert not (tmp_path / "out").exists(), "stopped before the first draw"


# --------------------------------------------------------------------------- names


UNKNOWN_NAMES = {
    # name: (API call, its message, CLI arguments or None, CLI message, grid parameters or None, grid message)
    "arch": (lambda: create_model("vgg", 3, 2), "unknown architecture 'vgg'; valid names: unet, resunetpp, deeplabv2",
             ["train", "--arch", "vgg", "--checkpoint", "x.pt"], "argument --arch: invalid choice: 'vgg'",
             {"archs": ["vgg"]}, "parameter 'archs': unknown value ['vgg']; valid: ['unet', 'resunetpp', 'deeplabv2', 'unet3d', "
             "'unet-slicewise', 'resunetpp-slicewise', 'deeplabv2-slicewise']"),
    "denoiser": (lambda: load_denoiser("diffusion:x.pt", 0.5),
                 "denoiser spec must be 'none' or one of ddpm:<folder>, guided-diffusion:<file.pt>, unet:<folder>, ffdnet:<file.pth>; "
                 "got 'diffusion:x.pt'",
                 ["certify", "x.png", "--checkpoint", "x.pt", "--sigma", "0.5", "--denoiser", "diffusion:x.pt"],
                 "argument --denoiser: denoiser spec must be 'none' or one of ddpm:<folder>",
                 {"denoiser": "diffusion:x.pt"}, "parameter 'denoiser': denoiser spec must be 'none' or one of"),
    "dataset": (lambda: load_dataset("mnist", None, "train"), "unknown dataset 'mnist'; valid names: jsrt, montgomery",
                ["train", "--dataset", "mnist", "--checkpoint", "x.pt"], "argument --dataset: invalid choice: 'mnist'",
                {"dataset": "mnist"}, "parameter 'dataset': unknown value 'mnist'; valid: ['jsrt', 'montgomery'"),
    "split": (lambda: load_dataset("phantom", None, "validation"),
              "unknown split 'validation'; valid splits: train, val, test, all", None, None, None, None),
    "profile": (lambda: training_spec("fast"), "profile must be one of ['jsrt', 'paper', 'quick', 'smoke'], got 'fast'",
                ["study", "--profile", "fast"], "argument --profile: invalid choice: 'fast'",
                {"profile": "fast"}, "parameter 'profile': unknown value 'fast'; valid: ['jsrt', 'paper', 'quick', 'smoke']"),
}


@pytest.mark.parametrize("name", list(UNKNOWN_NAMES))
def test_unknown_name(name, tmp_path, capsys, monkeypatch):
    api, api_message, argv, cli_message, grid_parameters, grid_message = UNKNOWN_NAMES[name]
    with pytest.raises(ValueError) as info:
        api()
    assert api_message in str(info.value)
    if argv is not None:
        assert cli_message in cli(capsys, *argv)
    if grid_parameters is not None:
        assert grid_message in grid_cli(capsys, monkeypatch, tmp_path, grid_parameters)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_of_wrong_architecture(tmp_path, capsys, checkpoint, image):
    with pytest.raises(ValueError) as info:
        load_segmenter(checkpoint, arch="unet")
    assert f"{checkpoint} holds a 'resunetpp' model, not 'unet'" in str(info.value)
    foreign = save_checkpoint(tmp_path / "foreign.pt", arch="deeplabv2", model_kwargs={"backbone": "resnet18"},
                              weights=create_model("resunetpp", 3, 4, base_channels=4))
    err = cli(capsys, "certify", image, "--checkpoint", foreign, "--sigma", "0.5")
    assert f"the weights in {foreign} do not fit the 'deeplabv2' model with 4 classes that its config describes" in err
    assert "weights missing (first: " in err and "weights unexpected (first: " in err


def test_checkpoint_of_wrong_class_count(tmp_path, capsys, checkpoint):
    expected = f"{checkpoint} holds a model with 4 classes {CHEST}, not 2"
    with pytest.raises(ValueError) as info:
        load_segmenter(checkpoint, num_classes=2)
    assert expected in str(info.value)
    folder_dataset(tmp_path / "binary")  # background, foreground
    assert expected in cli(capsys, "evaluate", "--dataset", "folder", "--data-root", tmp_path / "binary",
                           "--image-size", "32", "--checkpoint", checkpoint)


def test_not_a_segmenter_checkpoint(tmp_path, capsys, image):
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError) as info:
        load_segmenter(garbage)
    assert f"{garbage} is not a medcert segmenter checkpoint written by `medcert train`" in str(info.value)
    err = cli(capsys, "certify", image, "--checkpoint", garbage, "--sigma", "0.5")
    assert f"medcert: error: {garbage} is not a medcert segmenter checkpoint" in err


class _CreatesAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_checkpoint_that_would_run_code(tmp_path, capsys, image):
    marker, hostile = tmp_path / "code_ran", tmp_path / "hostile.pt"
    torch.save({"config": _CreatesAFile(marker), "state_dict": {}}, hostile)
    expected = f"{hostile} holds Python objects beyond tensors and plain containers (it names "
    with pytest.raises(ValueError) as info:
        load_segmenter(hostile)
    assert expected in str(info.value) and "it would need arbitrary code to unpickle" in str(info.value)
    err = cli(capsys, "certify", image, "--checkpoint", hostile, "--sigma", "0.5")
    assert f"medcert: error: {expected}" in err
    assert not marker.exists(), "nothing in the file ran"


def test_missing_checkpoint(tmp_path, capsys, image):
    missing = tmp_path / "none.pt"
    with pytest.raises(FileNotFoundError, match=f"no segmenter checkpoint at {missing}"):
        load_segmenter(missing)
    err = cli(capsys, "certify", image, "--checkpoint", missing, "--sigma", "0.5")
    assert f"medcert: error: no segmenter checkpoint at {missing}" in err


def test_not_a_guided_diffusion_checkpoint(tmp_path, capsys, checkpoint, image):
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, weights)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError) as info:
        load_denoiser(f"guided-diffusion:{weights}", 0.5)
    assert f"{weights} does not look like a guided-diffusion UNet state dict (expected a dict" in str(info.value)
    with pytest.raises(ValueError) as info:
        load_denoiser(f"guided-diffusion:{text}", 0.5)
    assert (f"{text} is not a readable PyTorch state dict of tensors (UnpicklingError); "
            f"expected OpenAI's guided-diffusion UNet checkpoint") in str(info.value)
    err = cli(capsys, "certify", image, "--checkpoint", checkpoint, "--sigma", "0.5",
              "--denoiser", f"guided-diffusion:{weights}", "--output-dir", tmp_path / "out")
    assert f"medcert: error: {weights} does not look like a guided-diffusion UNet state dict" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- grid files


def test_grid_unknown_parameter(tmp_path, capsys, monkeypatch):
    expected = "entry 1 ({}): unknown parameter 'sigma'; valid: ['alpha', 'archs',"
    with pytest.raises(ValueError) as info:
        parse_grid({"runs": [{"notebook": "phantom", "parameters": {"sigma": 0.5}}]}, "grid.yaml", REPO / "notebooks")
    assert "grid.yaml: " + expected.format(REPO / "notebooks" / "phantom.ipynb") in str(info.value)
    assert "'sigmas'" in str(info.value)
    err = grid_cli(capsys, monkeypatch, tmp_path, {"sigma": 0.5})
    assert expected.format(REPO / "notebooks" / "phantom.ipynb") in err


def test_grid_type_error(tmp_path, capsys, monkeypatch):
    expected = "entry 1 ({}): parameter 'n' must be int (its default is 100), got str '100'"
    with pytest.raises(ValueError) as info:
        parse_grid({"runs": [{"notebook": "phantom", "parameters": {"n": "100"}}]}, "grid.yaml", REPO / "notebooks")
    assert expected.format(REPO / "notebooks" / "phantom.ipynb") in str(info.value)
    err = grid_cli(capsys, monkeypatch, tmp_path, {"n": "100"})
    assert expected.format(REPO / "notebooks" / "phantom.ipynb") in err


def test_grid_output_outside_the_book(tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.chdir(REPO)
    for output in ("../escaped", "/tmp/escaped", "chapters/jsrt", "..", ".hidden", "line\nbreak", 2024):
        grid = tmp_path / "grid.yaml"
        grid.write_text(yaml.safe_dump({"runs": [{"notebook": "phantom"}, {"notebook": "phantom", "output": output}]}))
        err = cli(capsys, "grid", grid)
        assert f"medcert: error: {grid}: entry 2: 'output:' {output!r} must " in err, err
    with pytest.raises(ValueError, match=r"entry 1: 'output:' '\.\./x' must be a plain file name without a path "
                                         r"separator \('/' or '\\'\): outputs go into the book folder"):
        parse_grid({"runs": [{"notebook": "phantom", "output": "../x"}]}, "grid.yaml", REPO / "notebooks")
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped.ipynb").exists()


def test_control_character_in_a_slurm_value(tmp_path, capsys, monkeypatch):
    import submitit

    from medcert_core.study.grid.slurm import run_on_slurm
    from medcert_core.study.grid.spec import SlurmOptions
    from medcert_core.study.grid.spec import GridEntry

    def no_submission(*args, **kwargs):
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr(submitit, "AutoExecutor", no_submission)
    monkeypatch.chdir(REPO)
    err = cli(capsys, "grid", "grids/smoke.yaml", "--executor", "slurm", "--sbatch", "account=lab\nrm -rf ~")
    assert ("medcert: error: executor: 'sbatch' option 'account' holds the control character '\\n' "
            "(in 'lab\\nrm -rf ~'); SLURM values, job names and paths must be on one line") in err
    with pytest.raises(ValueError, match=r"executor: 'partition' holds the control character '\\r'"):
        parse_grid({"runs": [{"notebook": "phantom"}], "executor": {"partition": "gpu\r"}}, "grid.yaml",
                   REPO / "notebooks")
    common = dict(notebooks_dir=REPO / "notebooks", book_dir=tmp_path / "book", results_dir=tmp_path / "results",
                  cwd=tmp_path, wait=False)
    cases = [([GridEntry("phantom", "phantom")], SlurmOptions(sbatch={"qos": "high\x7f"}),
              "executor: 'sbatch' option 'qos' holds the control character '\\x7f'"),
             ([GridEntry("phantom", "phantom")], SlurmOptions(log_dir="logs\n"),
              "executor: 'log_dir' holds the control character '\\n'"),
             ([GridEntry("phantom", "ok"), GridEntry("phantom", "two\nlines")], SlurmOptions(),
              "the output name of grid entry 'phantom' holds the control character '\\n'")]
    for entries, options, message in cases:
        with pytest.raises(ValueError) as info:
            run_on_slurm(entries, options=options, **common)
        assert str(info.value).startswith("nothing submitted: ") and message in str(info.value), str(info.value)
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- other arguments


def test_bad_image_size(capsys):
    with pytest.raises(ValueError, match=r"image_size must be a positive int or \(H, W\), got \(0, 32\)"):
        load_dataset("phantom", None, "train", image_size=(0, 32))
    err = cli(capsys, "train", "--image-size", "12x", "--checkpoint", "x.pt")
    assert "argument --image-size: image size must be N or HxW with positive integers (e.g. 256 or 384x512), got '12x'" in err


def test_bad_steps(capsys):
    err = cli(capsys, "certify", "x.png", "--checkpoint", "x.pt", "--sigma", "0.5", "--steps", "many")
    assert "argument --steps: steps must be \"single\" or a positive integer, got 'many'" in err


def test_a_failing_grid_notebook(tmp_path, monkeypatch, capsys):
    """A chapter that raises (here: its data root is missing) ends the grid with the kernel's error,
    the parameters and the partial copy (which holds the traceback), and no traceback of ours."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from medcert_core.study import workflow

    notebooks, book = tmp_path / "notebooks", tmp_path / "book"
    notebooks.mkdir()
    (notebooks / "jsrt.ipynb").write_text((Path(__file__).resolve().parents[1] / "notebooks" / "jsrt.ipynb").read_text())
    grid = tmp_path / "grid.yaml"
    grid.write_text("parameters: {data_root: /nowhere/jsrt, profile: jsrt}\nruns:\n  - notebook: jsrt\n")

    def kernel_raises(source, target, **kwargs):
        Path(target).write_text("{}")
        raise PapermillExecutionError(3, 1, "test = load_dataset(...)", "FileNotFoundError",
                                      "jsrt: folder not found: /nowhere/jsrt", [])

    monkeypatch.setattr(papermill, "execute_notebook", kernel_raises)
    monkeypatch.setattr(workflow, "project_root", lambda: tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", str(grid)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "medcert: error: notebook jsrt failed with FileNotFoundError: jsrt: folder not found: /nowhere/jsrt" in err
    assert f"the partly executed copy, with the traceback, is {book / '.jsrt.running.ipynb'}" in err
    assert not (book / "jsrt.ipynb").exists(), "a failed chapter never lands in the book"


def test_traceback_on_request(tmp_path, monkeypatch, image):
    monkeypatch.setenv("MEDCERT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no segmenter checkpoint"):
        main(["certify", str(image), "--checkpoint", str(tmp_path / "none.pt"), "--sigma", "0.5"])
