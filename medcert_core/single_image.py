"""Certify image files with a trained segmenter (and a denoiser): ``medcert certify IMAGE|FOLDER ...``.

The certificate is about the tensor the model receives: the image resized to the checkpoint's
input size, values in [0, 1]. Writes, next to each other in ``output_dir``:
    <stem>_labels.png           class ids at the input size, ``abstain_value`` where the certificate abstains:
                                8-bit with 255 for up to 255 classes, else 16-bit with 65535
    <stem>_overlay.png          the input in grey with the certified classes in colour, abstentions white
    <stem>_labels_native.png    the same labels at the image file's own resolution (nearest neighbour)
    <stem>_overlay_native.png   the overlay on the original image, at its resolution
    <stem>_certificate.json     sigma, radius, n0, n, alpha, tau, input and native sizes, abstain
                                fraction, pixels per class, the seeds (see below)
For a folder, one set per image file and ``certificates.csv`` (one row per image); two image files
with the same stem (``a.png``, ``a.jpg``) are refused, since their outputs would overwrite each other.

Seeds: whoever chooses an input and knows the noise can craft an input that certifies a wrong
class, so without a seed the run's seed comes from the OS's entropy (``secrets``). Each file's noise
is seeded from (run seed, sha256 of the file's bytes): files get their own noise, and a file gives
the same certificate alone or in a folder. Both seeds and the digest are recorded per certificate;
``seed=<recorded seed>`` reproduces it. A fixed seed is for evaluating a fixed test set or
reproducing a number, never for certifying inputs someone else chose.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Sequence
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
from medcert_core.io import file_digest, write_atomically, write_json_atomically
from medcert_core.smoothing import SEED_RANGE, SmoothedSegmenter, image_seed, resolve_device
from medcert_core.render import ABSTAIN_COLOUR, colour_labels, grey_image
from medcert_core.training import load_segmenter

ABSTAIN_VALUES = {np.uint8: 255, np.uint16: 65535}  # label PNG dtype -> the value of an abstained pixel


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


def native_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) labels (ABSTAIN included) -> (H, W) by nearest neighbour, for viewing at the file's resolution."""
    resized = F.interpolate(torch.from_numpy(labels)[None, None].double(), size=tuple(size), mode="nearest-exact")
    return resized[0, 0].long().numpy()


OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png", "_labels_native.png", "_overlay_native.png")  # what certify writes


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (not recursive), sorted, without certify's own outputs (an earlier
    run with --output-dir in the same folder); FileNotFoundError naming the accepted suffixes."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
                   and not path.name.endswith(OUTPUT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no image file in {folder} (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return files


def check_distinct_stems(files: Sequence[Path]) -> None:
    """ValueError naming the files when two share a stem (ignoring case): their outputs
    ``<stem>_labels.png`` ... ``<stem>_certificate.json`` would overwrite each other."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_stem[path.stem.casefold()].append(path)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        names, stem = " and ".join(str(path) for path in clashes[0]), clashes[0][0].stem
        raise ValueError(f"{names} have the same stem {stem!r}: their outputs ({stem}_labels.png, ..., "
                         f"{stem}_certificate.json) would overwrite each other; rename one, or move it to another folder")


def run_seed(seed: int | None) -> tuple[int, str]:
    """(seed, where it came from): the given one, or one drawn from the OS's entropy."""
    if seed is not None:
        return int(seed), "given"
    return secrets.randbelow(SEED_RANGE), "os-entropy"


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
                       tau: float = 0.75, steps: str | int = "single", seed: int | None = None,
                       batch_size: int | str = 32,
                       device: str = "auto", precision: str = "fp32", channels_last: bool = False,
                       compile: bool | str = False, denoiser_flags: str = "",
                       progress: bool = True) -> dict[str, Any] | list[dict[str, Any]]:
    """Certify an image file, or every image file of a folder; writes the label maps, overlays and a
    JSON summary per image (and ``certificates.csv`` for a folder); returns the summary (or the list).

    Every check (parameters, files, stems, an n too small to certify any pixel) runs before the first
    draw. ``seed`` None (the default): drawn from the OS's entropy; each file's noise is seeded from
    (seed, sha256 of its bytes). The JSON records ``seed`` (pass it to reproduce), ``seed_source``,
    ``image_sha256`` and ``noise_seed`` (the file's generator seed).
    """
    for name, value in {"sigma": sigma, "tau": tau, "alpha": alpha, "n0": n0, "n": n}.items():
        check_parameter(name, value)
    image_path = Path(image_path)
    files = image_files(image_path) if image_path.is_dir() else [image_path]
    check_distinct_stems(files)
    images = {path: read_image_file(path) for path in files}  # a bad file fails before any draw
    digests = {path: file_digest(path) for path in files}
    seed, seed_source = run_seed(seed)
    device = resolve_device(device)
    model, config = load_segmenter(checkpoint, device=device)
    check_n_certifies(n, config.image_size, tau, alpha)
    denoising = load_denoiser(denoiser, sigma, steps=steps, flags=denoiser_flags)
    smoothed = SmoothedSegmenter(model, config.num_classes, sigma, denoiser=denoising, batch_size=batch_size,
                                 device=device, precision=precision, channels_last=channels_last, compile=compile)
    settings = {"checkpoint": str(checkpoint), "denoiser": denoiser, "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
                "tau": tau, "seed": seed, "seed_source": seed_source, "precision": precision, "device": str(device)}
    summaries = []
    for path in tqdm(files, desc="certify", disable=not progress or len(files) == 1):
        original = images[path]
        image = model_input(original, config.in_channels, config.image_size)
        noise_seed = image_seed(seed, digests[path])
        certificate: Certificate = smoothed.certify(image, n0, n, tau=tau, alpha=alpha, progress=progress,
                                                    generator=torch.Generator(device=device).manual_seed(noise_seed))
        seeds = {"image_sha256": digests[path], "noise_seed": noise_seed}
        summaries.append(_write_outputs(path, original, image, certificate, config, settings | seeds,
                                        Path(output_dir)))
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
        "abstain_value": abstain_value(len(config.class_names)),
        "labels_png": str(_save_png(_label_png(labels, len(config.class_names)), output_dir / f"{stem}_labels.png")),
        "overlay_png": str(_save_png(overlay(image.numpy(), labels), output_dir / f"{stem}_overlay.png")),
        "labels_native_png": str(_save_png(_label_png(native, len(config.class_names)),
                                           output_dir / f"{stem}_labels_native.png")),
        "overlay_native_png": str(_save_png(overlay(original.numpy(), native), output_dir / f"{stem}_overlay_native.png")),
    }
    write_json_atomically(summary, output_dir / f"{stem}_certificate.json")
    return summary


def label_dtype(num_classes: int) -> type:
    """The smallest PNG dtype whose top value is no class id: uint8 up to 255 classes, uint16 up to 65535."""
    for dtype, value in ABSTAIN_VALUES.items():
        if num_classes <= value:
            return dtype
    raise ValueError(f"{num_classes} classes do not fit a label PNG (at most 65535 with a value left for abstain)")


def abstain_value(num_classes: int) -> int:
    """The value of an abstained pixel in the label PNG of a model with ``num_classes`` classes."""
    return ABSTAIN_VALUES[label_dtype(num_classes)]


def _label_png(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids / ABSTAIN -> the label PNG's array; abstain can never read as a class id."""
    dtype = label_dtype(num_classes)
    return np.where(labels == ABSTAIN, ABSTAIN_VALUES[dtype], labels).astype(dtype)
