"""Trained models a study needs, built once and cached: segmenters, the in-project DDPM, UNet denoisers.

Every function returns what is in the cache when it is there and trains it otherwise (training
itself checkpoints and resumes). Cache names spell out everything that defines the model, so a
changed setting trains a new one instead of silently reusing an old one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from medcert_core.data import load_dataset
from medcert_core.data.base import as_size
from medcert_core.denoisers import load_denoiser, train_ddpm, train_unet_denoiser
from medcert_core.smoothing import resolve_device
from medcert_core.training import TrainConfig, load_segmenter, train_segmenter

AUTO = "auto"  # denoiser location meaning "train it in the project", e.g. "ddpm:auto"


@dataclass(frozen=True)
class DataSpec:
    """Which data a study reads: dataset name, its root (None for phantoms), input size, split seed."""

    dataset: str
    data_root: str | None
    image_size: int | tuple[int, int]
    seed: int = 0

    def load(self, split: str):
        return load_dataset(self.dataset, self.data_root, split, image_size=self.image_size, seed=self.seed)

    @property
    def tag(self) -> str:
        size = self.image_size if isinstance(self.image_size, int) else "x".join(map(str, self.image_size))
        return f"{self.dataset}_{size}"


@dataclass(frozen=True)
class TrainingSpec:
    """How models are trained when the cache lacks them (see ``medcert_core.training.PRESETS``)."""

    preset: str = "tiny"
    epochs: int | None = None
    ddpm_preset: str = "tiny"
    ddpm_steps: int | None = None
    ddpm_max_sigma: float = 1.0
    unet_denoiser_steps: int = 300


def segmenter_path(cache: Path, data: DataSpec, training: TrainingSpec, arch: str, noise_sigma: float) -> Path:
    epochs = training.epochs if training.epochs is not None else "default"
    return Path(cache) / "segmenters" / f"{data.tag}_{arch}_{training.preset}_e{epochs}_noise{noise_sigma}_seed{data.seed}.pt"


def segmenter(cache: Path, data: DataSpec, training: TrainingSpec, arch: str, noise_sigma: float = 0.0,
              device: str | torch.device = "auto") -> tuple[torch.nn.Module, TrainConfig]:
    """The segmenter of ``arch`` trained on ``data`` with Gaussian noise ``noise_sigma`` (0: none)."""
    path = segmenter_path(cache, data, training, arch, noise_sigma)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
            finished = saved.get("epoch") == saved["config"]["epochs"]
        except Exception as error:  # e.g. emptied by a power loss before writes were fsynced: train it again
            warnings.warn(f"unreadable segmenter checkpoint {path} ({error}); training it again", stacklevel=2)
            path.unlink()
            finished = False
        if finished:  # an unfinished checkpoint is resumed by train_segmenter below
            return load_segmenter(path, device=resolve_device(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    model, config, _ = train_segmenter(
        data.load("train"), data.load("val"), arch=arch, preset=training.preset, noise_sigma=noise_sigma,
        epochs=training.epochs, seed=data.seed, checkpoint=path, device=device,
    )
    return model, config


def ddpm_folder(cache: Path, data: DataSpec, training: TrainingSpec) -> Path:
    steps = training.ddpm_steps if training.ddpm_steps is not None else "default"
    return (Path(cache) / "denoisers"
            / f"ddpm_{data.tag}_{training.ddpm_preset}_s{steps}_max{training.ddpm_max_sigma}_seed{data.seed}")


def unet_denoiser_folder(cache: Path, data: DataSpec, training: TrainingSpec, sigma: float) -> Path:
    return (Path(cache) / "denoisers"
            / f"unet_{data.tag}_sigma{sigma}_s{training.unet_denoiser_steps}_seed{data.seed}")


def resolve_denoiser_spec(spec: str, sigma: float, cache: Path, data: DataSpec, training: TrainingSpec,
                          device: str | torch.device = "auto") -> str:
    """Turn ``ddpm:auto`` / ``unet:auto`` into the cached folder, training it first if needed.

    Other specs pass through; a ``{sigma}`` in a path is filled in (one UNet denoiser per sigma).
    """
    kind, _, location = spec.partition(":")
    if location != AUTO:
        return spec.replace("{sigma}", f"{sigma:g}")
    train_set = data.load("train")
    if kind == "ddpm":
        folder = train_ddpm(train_set, ddpm_folder(cache, data, training), preset=training.ddpm_preset,
                            steps=training.ddpm_steps, image_size=min(as_size(data.image_size)[0], 256),
                            max_sigma=training.ddpm_max_sigma, seed=data.seed, device=device)
    elif kind == "unet":
        folder = train_unet_denoiser(train_set, sigma, unet_denoiser_folder(cache, data, training, sigma),
                                     steps=training.unet_denoiser_steps, seed=data.seed, device=device)
    else:
        raise ValueError(f"only ddpm:auto and unet:auto can be trained in the project, not {spec!r}")
    return f"{kind}:{folder}"


def denoiser(spec: str, sigma: float, cache: Path, data: DataSpec, training: TrainingSpec, *,
             steps: str | int = "single", generator: torch.Generator | None = None,
             device: str | torch.device = "auto") -> torch.nn.Module | None:
    """The denoiser of ``spec`` for ``sigma`` (None for "none"); diffusion ones use ``steps`` calls."""
    resolved = resolve_denoiser_spec(spec, sigma, cache, data, training, device)
    return load_denoiser(resolved, sigma, steps=steps, generator=generator)  # options only reach diffusion ones
