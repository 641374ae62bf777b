"""Certify one image file with a trained segmenter (and a denoiser): ``medcert certify IMAGE ...``.

Writes, next to each other in ``output_dir``:
    <stem>_labels.png    uint8 class ids, 255 where the certificate abstains
    <stem>_overlay.png   the input in grey with the certified classes in colour, abstentions white
    <stem>_certificate.json  sigma, radius, n0, n, alpha, tau, abstain fraction, pixels per class
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcert_core.certify import ABSTAIN, Certificate, smallest_certifiable_n
from medcert_core.checks import check_parameter
from medcert_core.data.base import read_image, resize_image
from medcert_core.data.chest import read_jsrt_img
from medcert_core.denoisers import load_denoiser
from medcert_core.io import write_atomically, write_json_atomically
from medcert_core.smoothing import SmoothedSegmenter, resolve_device
from medcert_core.study.report import ABSTAIN_COLOUR, colour_labels, grey_image
from medcert_core.training import load_segmenter

ABSTAIN_VALUE = 255


def check_n_certifies(n: int, size: tuple[int, int], tau: float, alpha: float) -> None:
    """ValueError when n draws cannot certify any pixel of a ``size`` image (Holm over all its pixels)."""
    needed = smallest_certifiable_n(size[0] * size[1], tau, alpha, "holm")
    if n < needed:
        raise ValueError(f"n = {n} cannot certify any pixel of a {size[0]} x {size[1]} image at tau = {tau}, "
                         f"alpha = {alpha} (Holm over {size[0] * size[1]} pixels); use n >= {needed}")


def load_image_file(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image file (PNG, JPEG, TIFF, ... or JSRT .IMG) as the segmenter's input: (channels, *size) float32 in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    array = read_jsrt_img(path) if path.suffix.lower() == ".img" else read_image(path)
    image = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    if image.shape[0] != channels:
        image = image.mean(0, keepdim=True).expand(channels, -1, -1).clone()
    return resize_image(image, tuple(size))


def overlay(image: np.ndarray, labels: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """(C, H, W) image in [0, 1] and (H, W) labels -> (H, W, 3) uint8: colours on grey, abstain white."""
    grey = grey_image(image).astype(np.float32)
    colours = colour_labels(labels).astype(np.float32)
    blended = np.where((labels > 0)[..., None], (1 - opacity) * grey + opacity * colours, grey)
    blended[labels == ABSTAIN] = ABSTAIN_COLOUR
    return blended.round().astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    return write_atomically(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def certify_image_file(image_path: str | Path, checkpoint: str | Path, denoiser: str, sigma: float, *,
                       output_dir: str | Path = ".", n0: int = 10, n: int = 100, alpha: float = 0.001,
                       tau: float = 0.75, steps: str | int = "single", seed: int = 0, batch_size: int | str = 32,
                       device: str = "auto", precision: str = "fp32", channels_last: bool = False,
                       compile: bool | str = False, denoiser_flags: str = "") -> dict[str, Any]:
    """Certify one image file; writes the label map, the overlay and a JSON summary; returns the summary.

    Every check (parameters, files, an n too small to certify any pixel) runs before the first draw.
    """
    for name, value in {"sigma": sigma, "tau": tau, "alpha": alpha, "n0": n0, "n": n}.items():
        check_parameter(name, value)
    device = resolve_device(device)
    model, config = load_segmenter(checkpoint, device=device)
    check_n_certifies(n, config.image_size, tau, alpha)
    image = load_image_file(image_path, config.in_channels, config.image_size)
    denoising = load_denoiser(denoiser, sigma, steps=steps, flags=denoiser_flags)
    smoothed = SmoothedSegmenter(model, config.num_classes, sigma, denoiser=denoising, batch_size=batch_size,
                                 device=device, precision=precision, channels_last=channels_last, compile=compile)
    certificate: Certificate = smoothed.certify(image, n0, n, tau=tau, alpha=alpha, progress=True,
                                                generator=torch.Generator(device=device).manual_seed(seed))
    labels = certificate.labels.cpu().numpy()
    stem = Path(image_path).stem
    output_dir = Path(output_dir)
    label_png = np.where(labels == ABSTAIN, ABSTAIN_VALUE, labels).astype(np.uint8)
    summary = {
        "image": str(image_path), "checkpoint": str(checkpoint), "denoiser": denoiser, "sigma": sigma,
        "radius": certificate.radius, "n0": n0, "n": n, "alpha": alpha, "tau": tau, "seed": seed,
        "precision": precision, "device": str(device),
        "input_space": f"[0, 1]^({config.in_channels}x{config.image_size[0]}x{config.image_size[1]})",
        "abstain_fraction": float((labels == ABSTAIN).mean()),
        "certified_pixels": {name: int((labels == index).sum()) for index, name in enumerate(config.class_names)},
        "labels_png": str(_save_png(label_png, output_dir / f"{stem}_labels.png")),
        "overlay_png": str(_save_png(overlay(image.numpy(), labels), output_dir / f"{stem}_overlay.png")),
    }
    write_json_atomically(summary, output_dir / f"{stem}_certificate.json")
    return summary
