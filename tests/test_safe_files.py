"""Files are data, never code: every loader of medcert refuses a checkpoint that would need arbitrary
code to unpickle, names the file, and runs nothing from it (no marker file appears)."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from medcert_core.data import load_dataset
from medcert_core.denoisers import load_denoiser, train_ddpm, train_unet_denoiser
from medcert_core.denoisers.guided_diffusion import load_guided_diffusion_unet
from medcert_core.denoisers.unet_denoiser import WEIGHTS, UNetDenoiser
from medcert_core.io import UnsafeFileError, load_weights
from medcert_core.training import load_segmenter, train_segmenter

REFUSAL = "would need arbitrary code to unpickle"


class CreatesAFile:
    """Unpickling this runs ``Path(marker).touch()``: what a hostile checkpoint could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like medcert's checkpoints whose unpickling would create ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": CreatesAFile(marker), "state_dict": {}, "network": {}, "unet": {}, "step": 1, "epoch": 1}
    torch.save(payload, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code_ran"


@pytest.fixture(scope="module")
def phantoms():
    return load_dataset("phantom", None, "train", image_size=32, num_images=4)


def test_the_fixture_really_runs_code_when_unpickled_unsafely(tmp_path, marker):
    torch.load(hostile_checkpoint(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists(), "the hostile file creates the marker when unpickled without weights_only"


def test_load_weights_refuses_it_naming_the_file(tmp_path, marker):
    path = hostile_checkpoint(tmp_path / "weights.pt", marker)
    with pytest.raises(UnsafeFileError) as info:
        load_weights(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and REFUSAL in str(info.value)
    assert not marker.exists()
    safe = tmp_path / "safe.pt"
    torch.save({"config": {"epochs": 3, "names": ("a", "b")}, "weight": torch.ones(2)}, safe)
    assert load_weights(safe)["config"] == {"epochs": 3, "names": ("a", "b")}
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{garbage} is not a readable PyTorch file"):
        load_weights(garbage)


def test_the_segmenter_loader_refuses_it(tmp_path, marker):
    path = hostile_checkpoint(tmp_path / "model.pt", marker)
    with pytest.raises(ValueError, match=REFUSAL) as info:
        load_segmenter(path)
    assert str(path) in str(info.value) and not marker.exists()


def test_segmenter_training_refuses_to_resume_from_it(tmp_path, marker, phantoms):
    path = hostile_checkpoint(tmp_path / "model.pt", marker)
    with pytest.raises(ValueError, match=REFUSAL) as info:
        train_segmenter(phantoms, phantoms, arch="resunetpp", model_kwargs={"base_channels": 4}, epochs=1,
                        checkpoint=path, progress=False, device="cpu")
    assert str(path) in str(info.value) and not marker.exists()


def test_the_unet_denoiser_loader_refuses_it(tmp_path, marker):
    path = hostile_checkpoint(tmp_path / "denoiser" / WEIGHTS, marker)
    for load in (lambda: UNetDenoiser.load(path.parent), lambda: load_denoiser(f"unet:{path.parent}", 0.5)):
        with pytest.raises(ValueError, match=REFUSAL) as info:
            load()
        assert str(path) in str(info.value) and not marker.exists()


def test_denoiser_training_refuses_to_resume_from_it(tmp_path, marker, phantoms):
    ddpm = hostile_checkpoint(tmp_path / "ddpm" / "training_state.pt", marker)
    with pytest.raises(ValueError, match=REFUSAL) as info:
        train_ddpm(phantoms, ddpm.parent, steps=2, batch_size=2, image_size=32, progress=False, device="cpu")
    assert str(ddpm) in str(info.value) and not marker.exists()
    unet = hostile_checkpoint(tmp_path / "unet" / "training_state.pt", marker)
    with pytest.raises(ValueError, match=REFUSAL) as info:
        train_unet_denoiser(phantoms, 0.5, unet.parent, steps=2, batch_size=2, progress=False, device="cpu",
                            model_kwargs={"encoder_name": "resnet18", "decoder_channels": (8, 8, 8, 8, 8)})
    assert str(unet) in str(info.value) and not marker.exists()


def test_the_guided_diffusion_loader_refuses_it(tmp_path, marker):
    path = hostile_checkpoint(tmp_path / "256x256_diffusion_uncond.pt", marker)
    with pytest.raises(ValueError, match=REFUSAL) as info:
        load_guided_diffusion_unet(path)
    assert str(path) in str(info.value) and not marker.exists()
