"""The custom-trained baseline denoiser (paper Table S3; Salman et al. 2020).

A plain UNet trained with MSE to map x + N(0, sigma^2) to x, one per sigma; it predicts the clean
image directly and returns it clamped to [0, 1]. (Predicting the noise instead does not work with
segmentation_models_pytorch's UNet: its decoder has no full-resolution skip, so it cannot
reproduce per-pixel i.i.d. noise.) Images use the 2D ``"unet"`` architecture, volumes (B, C, D, H, W)
the 3D ``"unet3d"`` (MONAI's, with a full-resolution first level: stride 1 there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medcert_core.io import load_weights, save_torch_atomically, write_json_atomically
from medcert_core.models import create_model

WEIGHTS = "unet_denoiser.pt"
IMAGE_ARCH, VOLUME_ARCH = "unet", "unet3d"
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {  # train_unet_denoiser's widths per architecture
    IMAGE_ARCH: {"encoder_name": "resnet18", "decoder_channels": (128, 64, 32, 16, 8)},
    # full resolution at the top level (stride 1: a denoiser needs it), 8 channels there and one residual unit per
    # level: 0.56 M weights, half the seconds per training step of 16 hippocampus volumes under bf16 on this CPU of
    # (16, 32, 64, 128) with two units (1.2 M): benchmarks/results/bench_volume_certify.json
    VOLUME_ARCH: {"channels": (8, 32, 64, 128), "strides": (1, 2, 2), "num_res_units": 1},
}


class UNetDenoiser(torch.nn.Module):
    """(B, C, H, W) noisy batch in [0, 1] scale -> clean estimate, for the sigma it was trained at; (B, C, D, H, W)
    for a 3D one (``config["arch"] == "unet3d"``)."""

    def __init__(self, network: torch.nn.Module, sigma: float, config: dict[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.sigma = float(sigma)
        self.config = config

    @classmethod
    def build(cls, channels: int, sigma: float, /, arch: str = IMAGE_ARCH, **model_kwargs: Any) -> "UNetDenoiser":
        """A fresh (untrained) denoiser: a ``create_model(arch, C, C, **model_kwargs)`` network, ``"unet"`` for
        images and ``"unet3d"`` for volumes (``channels`` is positional: unet3d's widths are a model kwarg of
        that name). The config names ``arch`` only when it is not ``"unet"``, so the denoisers saved before
        3D ones existed load unchanged."""
        config = {"channels": channels, "sigma": float(sigma), "model_kwargs": model_kwargs}
        if arch != IMAGE_ARCH:
            config["arch"] = arch
        return cls(create_model(arch, channels, channels, **model_kwargs), sigma, config)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.network(noisy).clamp(0, 1)

    def save(self, folder: str | Path, **extra: Any) -> Path:
        """Write ``folder/unet_denoiser.pt`` (config + weights) atomically."""
        config = {**self.config, **extra}
        write_json_atomically(config, Path(folder) / "config.json")
        return save_torch_atomically({"config": config, "state_dict": self.network.state_dict()}, Path(folder) / WEIGHTS)

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> "UNetDenoiser":
        """The denoiser saved in ``folder`` (tensors and plain containers only: nothing in the file runs)."""
        path = Path(folder) / WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"no UNet denoiser at {path} (expected {folder}/{WEIGHTS}, written by train_unet_denoiser)")
        saved = load_weights(path, map_location=map_location)
        try:
            config, state_dict = saved["config"], saved["state_dict"]
            denoiser = cls.build(config["channels"], config["sigma"], config.get("arch", IMAGE_ARCH),
                                 **config["model_kwargs"])
        except (TypeError, KeyError) as error:
            raise ValueError(f"{path} is not a UNet denoiser written by train_unet_denoiser (expected 'config' with "
                             f"channels, sigma, model_kwargs and 'state_dict'; {error!r})") from error
        denoiser.config = config
        denoiser.network.load_state_dict(state_dict)
        return denoiser.eval()
