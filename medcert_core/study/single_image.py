"""Certify image files with a trained segmenter (and a denoiser): ``medcert certify IMAGE|FOLDER ...``.

The certificate is about the tensor the model receives: the image resized to the checkpoint's
input size, values in [0, 1]. Writes, next to each other in ``output_dir``:
    <stem>_labels.png           uint8 class ids at the input size, 255 where the certificate abstains
    <stem>_overlay.png          the input in grey with the certified classes in colour, abstentions white
    <stem>_labels_native.png    the same labels at the image file's own resolution (nearest neighbour)
    <stem>_overlay_native.png   the overlay on the original image, at its resolution
    <stem>_certificate.json     sigma, radius, n0, n, alpha, tau, input and native sizes, abstain
                                fraction, pixels per class
For a folder, one set per image file and ``certificates.csv`` (one row per image).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".img")


def read_image_file(path: str | Path) -> torch.Tensor:
    """An image file (PNG, JPEG, TIFF, ... or JSRT .IMG) at its own resolution: (1 or 3, H, W) float32 in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    array = read_jsrt_img(path) if path.suffix.lower() == ".img" else read_image(path)
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


def model_input(image: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) image -> the segmenter's input (channels, *size): grey averaged or replicated, resized."""
    if image.shape[0] != channels:
        image = image.mean(0, keepdim=True).expand(channels, -1, -1).clone()
    return resize_image(image, tuple(size))


def load_image_file(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image file as the segmenter's input: (channels, *size) float32 in [0, 1]."""
    return model_input(read_image_file(path), channels, size)


def native_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) labels (ABSTAIN included) -> (H, W) by nearest neighbour, for viewing at the file's resolution."""
    resized = F.interpolate(torch.from_numpy(labels)[None, None].double(), size=tuple(size), mode="nearest-exact")
    return resized[0, 0].long().numpy()


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (not recursive), sorted; FileNotFoundError naming the accepted suffixes."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image file in {folder} (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return files


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
                       compile: bool | str = False, denoiser_flags: str = "",
                       progress: bool = True) -> dict[str, Any] | list[dict[str, Any]]:
    """Certify an image file, or every image file of a folder; writes the label maps, overlays and a
    JSON summary per image (and ``certificates.csv`` for a folder); returns the summary (or the list).

    Every check (parameters, files, an n too small to certify any pixel) runs before the first draw.
    Each image's noise is seeded from ``seed`` alone, as for a single file.
    """
    for name, value in {"sigma": sigma, "tau": tau, "alpha": alpha, "n0": n0, "n": n}.items():
        check_parameter(name, value)
    image_path = Path(image_path)
    files = image_files(image_path) if image_path.is_dir() else [image_path]
    images = {path: read_image_file(path) for path in files}  # a bad file fails before any draw
    device = resolve_device(device)
    model, config = load_segmenter(checkpoint, device=device)
    check_n_certifies(n, config.image_size, tau, alpha)
    denoising = load_denoiser(denoiser, sigma, steps=steps, flags=denoiser_flags)
    smoothed = SmoothedSegmenter(model, config.num_classes, sigma, denoiser=denoising, batch_size=batch_size,
                                 device=device, precision=precision, channels_last=channels_last, compile=compile)
    settings = {"checkpoint": str(checkpoint), "denoiser": denoiser, "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
                "tau": tau, "seed": seed, "precision": precision, "device": str(device)}
    summaries = []
    for path in tqdm(files, desc="certify", disable=not progress or len(files) == 1):
        original = images[path]
        image = model_input(original, config.in_channels, config.image_size)
        certificate: Certificate = smoothed.certify(image, n0, n, tau=tau, alpha=alpha, progress=progress,
                                                    generator=torch.Generator(device=device).manual_seed(seed))
        summaries.append(_write_outputs(path, original, image, certificate, config, settings, Path(output_dir)))
    if not image_path.is_dir():
        return summaries[0]
    table = pd.DataFrame([{key: value for key, value in summary.items() if not isinstance(value, dict)}
                          | {f"certified_{name}": count for name, count in summary["certified_pixels"].items()}
                          for summary in summaries])
    write_atomically(Path(output_dir) / "certificates.csv", lambda temporary: table.to_csv(temporary, index=False))
    return summaries


def _write_outputs(path: Path, original: torch.Tensor, image: torch.Tensor, certificate: Certificate, config,
                   settings: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Write one image's PNGs (input size and native size) and JSON; returns the JSON's content."""
    labels = certificate.labels.cpu().numpy()
    native = native_labels(labels, tuple(original.shape[-2:]))
    stem = path.stem
    height, width = config.image_size
    summary = {
        "image": str(path), **settings, "radius": certificate.radius,
        "input_space": f"[0, 1]^({config.in_channels}x{height}x{width})",
        "certified_input_size": [height, width],
        "image_file_size": [int(original.shape[-2]), int(original.shape[-1])],
        "about": (f"the certificate is about the {config.in_channels} x {height} x {width} tensor the model receives "
                  "(the image file resized to the checkpoint's input size); the native-size maps are its labels "
                  "resized by nearest neighbour, for viewing"),
        "abstain_fraction": float((labels == ABSTAIN).mean()),
        "certified_pixels": {name: int((labels == index).sum()) for index, name in enumerate(config.class_names)},
        "labels_png": str(_save_png(_label_png(labels), output_dir / f"{stem}_labels.png")),
        "overlay_png": str(_save_png(overlay(image.numpy(), labels), output_dir / f"{stem}_overlay.png")),
        "labels_native_png": str(_save_png(_label_png(native), output_dir / f"{stem}_labels_native.png")),
        "overlay_native_png": str(_save_png(overlay(original.numpy(), native), output_dir / f"{stem}_overlay_native.png")),
    }
    write_json_atomically(summary, output_dir / f"{stem}_certificate.json")
    return summary


def _label_png(labels: np.ndarray) -> np.ndarray:
    return np.where(labels == ABSTAIN, ABSTAIN_VALUE, labels).astype(np.uint8)
