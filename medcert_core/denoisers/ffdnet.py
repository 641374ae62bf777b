"""FFDNet (Zhang, Zuo, Zhang, "FFDNet: Toward a Fast and Flexible Solution for CNN-Based Image
Denoising", IEEE TIP 27(9), 2018): an off-the-shelf natural-image denoiser for white Gaussian noise
of a known level, as the colour network of the KAIR model zoo (``ffdnet_color.pth``).

The file's layout (a state dict, read with ``weights_only=True``): 24 tensors
``model.{0,2,...,22}.{weight,bias}``, twelve 3x3 convolutions (padding 1, bias) with a ReLU after
each but the last, 96 features; the first takes 13 channels, the last gives 12. The forward, on RGB
``x`` in [0, 1] (B, 3, H, W) at noise level ``s`` (std in [0, 1] units):

1. odd H or W are padded by replicating the last row / column (to even sizes);
2. ``pixel_unshuffle(x, 2)``: (B, 12, H/2, W/2), channel ``4 c + 2 i + j`` holding ``x[c, 2 h + i, 2 w + j]``;
3. a constant map of ``s`` is appended as the 13th channel;
4. the twelve convolutions, then ``pixel_shuffle(., 2)`` back to (B, 3, H, W), the padding cropped.

The output is the clean estimate itself (not a residual). It was trained for s <= 75/255: above it,
:class:`FFDNetDenoiser` box-averages the image by the smallest integer k with s / k <= 75/255 (white
noise stays white, std s / k), denoises at that level and resizes back (``shrink``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from medcert_core.denoisers.diffusion import resize, resize_noise_factor
from medcert_core.io import load_weights
from medcert_core.models.volumetric import per_slice

FEATURES = 96
LAYERS = 12
IN_CHANNELS = 13  # 4 x RGB after pixel-unshuffle + the noise-level map
OUT_CHANNELS = 12
MAX_TRAINED_SIGMA = 75 / 255
FFDNET_SHRINKS = ("box", "bilinear", "none")
"""How sigma above 75/255 is brought into range: box average / bilinear by k, or "none" (denoise at full
resolution with the noise map at sigma, outside the levels the network was trained for)."""


def expected_layout() -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an FFDNet colour state dict."""
    layout = {}
    for layer in range(LAYERS):
        inputs = IN_CHANNELS if layer == 0 else FEATURES
        outputs = OUT_CHANNELS if layer == LAYERS - 1 else FEATURES
        layout[f"model.{2 * layer}.weight"] = (outputs, inputs, 3, 3)
        layout[f"model.{2 * layer}.bias"] = (outputs,)
    return layout


class FFDNet(torch.nn.Module):
    """The FFDNet colour network: (B, 3, H, W) in [0, 1] and a noise level -> clean (B, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for layer in range(LAYERS):
            inputs = IN_CHANNELS if layer == 0 else FEATURES
            outputs = OUT_CHANNELS if layer == LAYERS - 1 else FEATURES
            layers.append(torch.nn.Conv2d(inputs, outputs, 3, padding=1))
            if layer < LAYERS - 1:
                layers.append(torch.nn.ReLU(inplace=True))
        self.model = torch.nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, noise_level: float) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded = F.pad(images, (0, width % 2, 0, height % 2), mode="replicate")
        features = F.pixel_unshuffle(padded, 2)
        level = features.new_full((features.shape[0], 1, *features.shape[-2:]), float(noise_level))
        output = F.pixel_shuffle(self.model(torch.cat([features, level], dim=1)), 2)
        return output[..., :height, :width]


def load_ffdnet_network(path: str | Path) -> FFDNet:
    """The FFDNet of ``path`` (weights only); ValueError naming the file and the expected layout if the
    file holds anything else."""
    path = Path(path)
    state = load_weights(path)
    layout = expected_layout()
    found = ({name: tuple(value.shape) for name, value in state.items() if isinstance(value, torch.Tensor)}
             if isinstance(state, dict) else None)
    if found != layout:
        differences = "not a dict of tensors" if found is None else _layout_difference(found, layout)
        raise ValueError(f"{path} is not an FFDNet colour state dict ({differences}); expected 24 tensors "
                         f"model.{{0,2,...,22}}.{{weight,bias}}: 12 3x3 convolutions, {IN_CHANNELS} -> {FEATURES} "
                         f"-> ... -> {OUT_CHANNELS} channels (ffdnet_color.pth of the KAIR model zoo)")
    network = FFDNet()
    network.model.load_state_dict({name.removeprefix("model."): value for name, value in state.items()})
    return network.eval()


def _layout_difference(found: dict[str, tuple[int, ...]], layout: dict[str, tuple[int, ...]]) -> str:
    """The first few differences between a file's tensors and the expected layout, for a message."""
    missing = sorted(set(layout) - set(found))
    extra = sorted(set(found) - set(layout))
    shapes = [f"{name} {found[name]} != {layout[name]}" for name in layout if name in found and found[name] != layout[name]]
    parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
            ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + shapes[:3]
    return "; ".join(parts)


def shrink_factor(sigma: float) -> int:
    """The smallest integer k with sigma / k <= 75/255 (1 within the trained range)."""
    return max(1, math.ceil(sigma / MAX_TRAINED_SIGMA - 1e-9))


class FFDNetDenoiser(torch.nn.Module):
    """Maps a noisy batch (B, C, H, W) in [0, 1] scale (x + N(0, sigma^2)) to its clean estimate with FFDNet.

    sigma <= 75/255: the network at the input's resolution with the noise map at sigma, clamped to
    [0, 1]. Above: the batch is resized by the smallest integer k with sigma / k <= 75/255 (``shrink``
    "box": box average where k divides the size, bilinear otherwise, as DiffusionDenoiser does), denoised
    at the resized noise's std and resized back; ``shrink="none"`` denoises at full resolution at sigma.
    C = 3 goes in as it is; C = 1 is replicated to 3 channels and the output averaged back. A volume batch
    (B, C, D, H, W) is denoised slice by slice along D, each slice on its own (FFDNet is a 2D network): one
    deterministic function of the whole volume, so a valid part of a volumetric base model.
    """

    def __init__(self, network: FFDNet, sigma: float, shrink: str = "box") -> None:
        super().__init__()
        if shrink not in FFDNET_SHRINKS:
            raise ValueError(f"ffdnet shrink must be one of {list(FFDNET_SHRINKS)}, got {shrink!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.network = network
        self.sigma = float(sigma)
        self.shrink = shrink

    def working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) the network runs at for inputs of ``size``."""
        factor = 1 if self.shrink == "none" else shrink_factor(self.sigma)
        return (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))

    def noise_level(self, size: tuple[int, int]) -> float:
        """Std of the noise the network sees at its working size (sigma times the resize's noise factor)."""
        target = self.working_size(size)
        if target == tuple(size):
            return self.sigma
        return self.sigma * resize_noise_factor(tuple(size), target, self.shrink)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        if noisy.dim() == 5:  # volumes: the B * D slices as one batch of images
            return per_slice(self.forward, noisy)
        channels = noisy.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"FFDNet denoises RGB (3 channels) or grayscale (1) batches, got {channels} channels")
        size = tuple(noisy.shape[-2:])
        images = noisy.float().expand(-1, 3, -1, -1) if channels == 1 else noisy.float()
        target = self.working_size(size)  # == size within the trained range and with shrink="none"
        resized = target != size
        clean = self.network(resize(images, target, self.shrink) if resized else images, self.noise_level(size))
        clean = (resize(clean, size, self.shrink) if resized else clean).clamp(0, 1)
        return clean.mean(dim=1, keepdim=True) if channels == 1 else clean


def load_ffdnet(path: str | Path, sigma: float, *, shrink: str = "box") -> FFDNetDenoiser:
    """``ffdnet:<file.pth>``: the FFDNet of the file as a denoiser for ``sigma``."""
    return FFDNetDenoiser(load_ffdnet_network(path), sigma, shrink=shrink)
