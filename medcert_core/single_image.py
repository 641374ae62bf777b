"""Certify image files with a trained segmenter (and a denoiser): ``medcert certify IMAGE|FOLDER ...``.

The segmenter is a medcert checkpoint (``checkpoint``) or any other model (``model``: a
``torch.export`` program or ``package.module:function``, see :mod:`medcert_core.models.external`),
with an optional normalisation inside the base model. Image files may be PNG, JPEG, TIFF (8 or
16 bit, kept at full depth), BMP, JSRT .IMG, DICOM or NIfTI (:mod:`medcert_core.data.medical`).

The certificate is about the tensor the model receives: the image mapped to [0, 1] (``intensity``),
resized to the model's input size and given its channel count. Each JSON records that mapping under
``file_to_tensor``. Writes, next to each other in ``output_dir``:
    <stem>_labels.png           class ids at the input size, ``abstain_value`` where the certificate abstains:
                                8-bit with 255 for up to 255 classes, else 16-bit with 65535
    <stem>_overlay.png          the input in grey with the certified classes in colour, abstentions white
    <stem>_labels_native.png    the same labels at the image file's own resolution (nearest neighbour)
    <stem>_overlay_native.png   the overlay on the original image, at its resolution
    <stem>_legend.png           the native overlay with a legend beside it: class colours and names,
                                abstain, sigma, the certified radius and what it is measured on
    <stem>_certificate.json     sigma, radius, n0, n, alpha, tau, input and native sizes, abstain
                                fraction, pixels per class, the seeds (see below)
For a folder, one set per image file and ``certificates.csv`` (one row per image); two image files
with the same stem (``a.png``, ``a.jpg``) are refused, since their outputs would overwrite each other.
A 3D NIfTI volume given without ``slice`` is certified whole by a volumetric model, never resized, and
writes a label NIfTI instead (:mod:`medcert_core.single_volume`).

Seeds: whoever chooses an input and knows the noise can craft an input that certifies a wrong
class, so without a seed the run's seed comes from the OS's entropy (``secrets``). Each file's noise
is seeded from (run seed, sha256 of the file's bytes): files get their own noise, and a file gives
the same certificate alone or in a folder. Both seeds and the digest are recorded per certificate;
``seed=<recorded seed>`` reproduces it. A fixed seed is for evaluating a fixed test set or
reproducing a number, never for certifying inputs someone else chose.
"""

from __future__ import annotations

import math
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
from medcert_core.data.base import check_pixel_budget, file_stem, file_suffix, memory_error_names, resize_image
from medcert_core.data.chest import JSRT_IMG_SHAPE, read_jsrt_img
from medcert_core.data.medical import (
    MEDICAL_SUFFIXES,
    Intensity,
    parse_intensity,
    parse_slice,
    read_with_mapping,
)
from medcert_core.denoisers import load_denoiser
from medcert_core.devices import resolve_device
from medcert_core.io import file_digest, write_atomically, write_json_atomically
from medcert_core.render import ABSTAIN_COLOUR, colour_labels, grey_image
from medcert_core.sequential import smallest_certifiable_n_max
from medcert_core.smoothing import SEED_RANGE, SmoothedSegmenter, image_seed
from medcert_core.training import load_segmenter

ABSTAIN_VALUES = {np.uint8: 255, np.uint16: 65535}  # label PNG dtype -> the value of an abstained pixel


def check_n_certifies(n: int, size: Sequence[int], tau: float, alpha: float, sequential: bool = False) -> None:
    """ValueError when n draws (n_max under ``sequential``, whose anytime-valid test needs more) cannot
    certify any pixel of a ``size`` (H, W) image, or any voxel of a (D, H, W) volume (Holm over all of them)."""
    pixels = math.prod(int(length) for length in size)
    needed = (smallest_certifiable_n_max(pixels, tau, alpha) if sequential
              else smallest_certifiable_n(pixels, tau, alpha, "holm"))
    if n < needed:
        what = "sequential certification with n_max" if sequential else "n"
        unit, shape = ("pixel", "image") if len(size) == 2 else ("voxel", "volume")
        raise ValueError(f"{what} = {n} cannot certify any {unit} of a {' x '.join(map(str, size))} {shape} at "
                         f"tau = {tau}, alpha = {alpha} (Holm over {pixels} {unit}s); use n >= {needed}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".img", *MEDICAL_SUFFIXES)


def read_image_file(path: str | Path, intensity: Intensity = Intensity(), slice_spec=None, *,
                    max_pixels: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """An image file at its own resolution -> ((1 or 3, H, W) float32 in [0, 1], how its values were mapped).

    ``max_pixels``: the pixel budget checked from the file's header before decoding (default
    :data:`medcert_core.data.base.MAX_PIXELS`); beyond it, or when memory runs out, ImageTooLarge (a ValueError).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    if file_suffix(path) == ".img":
        if intensity.mode != "auto" or slice_spec is not None:
            raise ValueError(f"{path}: a JSRT .IMG file is read with its own 12-bit mapping; --intensity and "
                             f"--slice do not apply")
        check_pixel_budget(path, JSRT_IMG_SHAPE, "rows x columns of a JSRT .IMG", max_pixels)
        with memory_error_names(path):
            array = read_jsrt_img(path)
        mapping = {"format": "jsrt img", "intensity": "auto", "unit_per_value": 1 / 4095, "image_dependent": False,
                   "formula": "(4095 - min(v, 4095)) / 4095 (12-bit, high = dark)"}
    else:
        array, mapping = read_with_mapping(path, intensity, slice_spec, max_pixels=max_pixels)
    with memory_error_names(path):
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()), mapping


def channel_mapping(stored: int, channels: int) -> str:
    """How a file's ``stored`` channels become the model's ``channels`` (the rule of :func:`model_input`)."""
    if stored == channels:
        return "as stored"
    return f"grey replicated to {channels} channels" if stored == 1 else f"{stored} channels averaged to grey" + (
        f", replicated to {channels}" if channels > 1 else "")


def channel_norm(stored: int, channels: int) -> float:
    """The operator norm of :func:`model_input`'s channel step, sqrt(channels / stored) when they differ: the
    average of ``stored`` channels (norm 1/sqrt(stored)), replicated to ``channels`` (norm sqrt(channels));
    1 -> 3: sqrt(3), 3 -> 1: 1/sqrt(3), 3 -> 4: sqrt(4/3)."""
    if stored == channels:
        return 1.0
    return float(np.sqrt(channels / stored))


def resize_norm_bound(native: tuple[int, int], size: tuple[int, int]) -> float:
    """An upper bound on the L2 operator norm of :func:`resize_image` (bilinear, antialiased) from ``native``
    to ``size``: sqrt(max column sum x max row sum) of its matrix (Schur's test; its weights are >= 0),
    both sums read off by applying the map and its transpose to ones. 1 when nothing is resized."""
    if tuple(native) == tuple(size):
        return 1.0
    ones = torch.ones(1, 1, *native, dtype=torch.float64, requires_grad=True)
    out = F.interpolate(ones, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    (columns,) = torch.autograd.grad(out, ones, grad_outputs=torch.ones_like(out))
    return float(np.sqrt(columns.max().item() * out.max().item()))


def radius_on_the_file(radius: float, mapping: dict[str, Any], stored_shape: Sequence[int], channels: int,
                       size: tuple[int, int]) -> dict[str, Any]:
    """What the certificate's radius R (on the model's tensor) covers on the file itself.

    Every step from the [0, 1] file image to the tensor is linear then clipped (the channel step, the
    resize; clipping only shrinks differences), so a perturbation of L2 norm e of the [0, 1] file image
    moves the tensor by at most channel_norm x resize_norm x e: R / (that product) is certified on it.
    In stored values only through an affine intensity mapping (``unit_per_value`` x rescale slope) that does
    not depend on the image: for one that does (``image_dependent``: minmax), changing one stored value can
    move every pixel, so ``stored_values`` is None and ``stored_values_reason`` says why. ``stored_shape`` is
    (C, H, W), or (1, D, H, W) for a volume with ``size`` its own (D, H, W): volumes are never resized.
    """
    channel, resize = channel_norm(int(stored_shape[0]), channels), resize_norm_bound(tuple(stored_shape[1:]), size)
    on_image = radius / (channel * resize)
    per_value = mapping.get("unit_per_value")
    per_stored, reason = None, None
    if mapping.get("image_dependent", False):
        reason = (f"the intensity mapping ({mapping.get('intensity')}) depends on the image itself (its minimum and "
                  f"maximum): changing one stored value can move every pixel of the [0, 1] image, so no radius in "
                  f"stored values holds; unit_image holds on the file's [0, 1] image")
    elif per_value is None:
        reason = "the intensity mapping is a table, not affine: no radius in stored values follows from it"
    elif per_value == 0:
        reason = "the intensity mapping sends every stored value to the same [0, 1] value"
    else:
        per_stored = abs(per_value * mapping.get("rescale", {}).get("slope", 1.0))
    return {"unit_image": on_image,
            "stored_values": None if per_stored is None else on_image / per_stored,
            "stored_values_reason": reason,
            "how": f"R / (channels {channel:.4f} x resize {resize:.4f}) on the file's [0, 1] image"
                   + ("" if per_stored is None else f"; / {per_stored:.6g} per stored value")}


def model_input(image: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) image -> the segmenter's input (channels, *size): grey averaged or replicated, resized."""
    if image.shape[0] != channels:
        image = image.mean(0, keepdim=True).expand(channels, -1, -1).clone()
    return resize_image(image, tuple(size))


def file_to_tensor(mapping: dict[str, Any], stored_shape: Sequence[int], channels: int,
                   size: Sequence[int]) -> dict[str, Any]:
    """The JSON record of every step from the file to the certified tensor: values, channels, resize.
    ``stored_shape`` (C, H, W) and ``size`` (H, W), or (1, D, H, W) and (D, H, W) for a volume (never resized)."""
    native = [int(length) for length in stored_shape[1:]]
    resize = ("none" if native == [int(length) for length in size] else
              f"{' x '.join(map(str, native))} -> {' x '.join(map(str, size))}, bilinear with antialiasing, "
              f"clipped to [0, 1]")
    return {**mapping, "channels": channel_mapping(int(stored_shape[0]), channels), "resize": resize,
            "tensor": f"[0, 1]^({'x'.join(map(str, (channels, *size)))})"}


def native_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) labels (ABSTAIN included) -> (H, W) by nearest neighbour, for viewing at the file's resolution."""
    resized = F.interpolate(torch.from_numpy(labels)[None, None].double(), size=tuple(size), mode="nearest-exact")
    return resized[0, 0].long().numpy()


VOLUME_AXES = (0, 1, 2)  # a volume's overlays: the middle slice along each array axis
VOLUME_OUTPUT_SUFFIXES = ("_labels.nii.gz", *(f"_overlay_axis{axis}.png" for axis in VOLUME_AXES))
OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png", "_labels_native.png", "_overlay_native.png", "_legend.png",
                   *VOLUME_OUTPUT_SUFFIXES)  # what certify writes


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (not recursive), sorted, without certify's own outputs (an earlier
    run with --output-dir in the same folder); FileNotFoundError naming the accepted suffixes."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and file_suffix(path) in IMAGE_SUFFIXES
                   and not path.name.endswith(OUTPUT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no image file in {folder} (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return files


def check_distinct_stems(files: Sequence[Path]) -> None:
    """ValueError naming the files when two share a stem (ignoring case): their outputs
    ``<stem>_labels.png`` ... ``<stem>_certificate.json`` would overwrite each other."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_stem[file_stem(path).casefold()].append(path)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        names, stem = " and ".join(str(path) for path in clashes[0]), file_stem(clashes[0][0])
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


def load_base_model(checkpoint: str | Path | None, model: str | None, *, model_kwargs: dict[str, Any] | None = None,
                    num_classes: int | None = None, in_channels: int | None = None,
                    image_size: tuple[int, int] | None = None, class_names: Sequence[str] | None = None,
                    normalize: str | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, dict]:
    """The base model f and what certify reads of it (num_classes, in_channels, image_size, class_names),
    from a medcert ``checkpoint`` or any other ``model``; returns (module, info, JSON record of the model)."""
    from medcert_core.models.external import (
        Normalized,
        check_batch_independence,
        external_segmenter,
        parse_normalize,
    )

    if (checkpoint is None) == (model is None):
        raise ValueError("give a segmenter: either --checkpoint (a medcert checkpoint) or --model (a torch.export "
                         ".pt2 or package.module:function), not both")
    if model is not None:
        module, info = external_segmenter(model, kwargs=model_kwargs, num_classes=num_classes, in_channels=in_channels,
                                          image_size=image_size, class_names=class_names, normalize=normalize,
                                          device=device)
        return module, info, info.describe()
    asked = {"--model-kwargs": model_kwargs, "--in-channels": in_channels, "--image-size": image_size,
             "--class-names": class_names}
    given = [flag for flag, value in asked.items() if value]
    if given:
        raise ValueError(f"{', '.join(given)} apply to --model; a medcert checkpoint records them itself")
    module, config = load_segmenter(checkpoint, num_classes=num_classes, device=device)
    check_batch_independence(module, config.in_channels, tuple(config.image_size), f"--checkpoint {checkpoint}", device)
    record = {"checkpoint": str(checkpoint), "normalize": None}
    if normalize:
        mean, std = parse_normalize(normalize, config.in_channels)
        module, record["normalize"] = Normalized(module, mean, std).to(device).eval(), {"mean": mean, "std": std}
    return module, config, record


def check_run_options(*, sigma: float, tau: float, alpha: float, n0: int, n: int, sequential: bool,
                      stop_undecided: float) -> None:
    """ValueError naming the first parameter of a certify run out of its range."""
    for name, value in {"sigma": sigma, "tau": tau, "alpha": alpha, "n0": n0, "n": n}.items():
        check_parameter(name, value)
    if stop_undecided and not sequential:
        raise ValueError("--stop-undecided applies to --sequential certification only")


def exported_input_shape(module: torch.nn.Module) -> tuple[int | torch.SymInt, ...] | None:
    """The input shape (B, C, *spatial) of a loaded torch.export program (an ``ExportedModule``), from its one
    placeholder; a size the program leaves free is a ``torch.SymInt``. None for any other module."""
    from medcert_core.models.external import ExportedModule

    if not isinstance(module, ExportedModule):
        return None
    shapes = [tuple(node.meta["val"].shape) for node in module.program.graph.nodes
              if node.op == "placeholder" and "val" in node.meta]
    return shapes[0] if len(shapes) == 1 else None


def volumetric_program_shape(model: str | None, device: str | torch.device) -> tuple | None:
    """The (B, C, D, H, W) input shape of ``--model`` when it is a torch.export program taking volumes, else None
    (also when it does not load: the caller's own error stands)."""
    from medcert_core.models.external import load_model

    if model is None or not Path(model).is_file():
        return None
    try:
        loaded = load_model(model, device=device)[0]
    except (ValueError, FileNotFoundError):
        return None
    shape = exported_input_shape(loaded)
    return shape if shape is not None and len(shape) == 5 else None


def certify_image_file(image_path: str | Path, checkpoint: str | Path | None, denoiser: str, sigma: float, *,
                       model: str | None = None, model_kwargs: dict[str, Any] | None = None,
                       num_classes: int | None = None, in_channels: int | None = None,
                       image_size: tuple[int, ...] | None = None, class_names: Sequence[str] | None = None,
                       normalize: str | None = None, intensity: str = "auto", slice: str | None = None,
                       max_pixels: int | None = None,
                       output_dir: str | Path = ".", n0: int = 10, n: int = 100, alpha: float = 0.001,
                       tau: float = 0.75, steps: str | int = "single", seed: int | None = None,
                       batch_size: int | str = 32,
                       device: str = "auto", precision: str = "fp32", channels_last: bool = False,
                       compile: bool | str = False, denoiser_flags: str = "", sequential: bool = False,
                       stop_undecided: float = 0.0, progress: bool = True) -> dict[str, Any] | list[dict[str, Any]]:
    """Certify an image file, or every image file of a folder; writes the label maps, overlays, legend and
    a JSON summary per image (and ``certificates.csv`` for a folder); returns the summary (or the list).

    The segmenter: ``checkpoint`` (medcert) or ``model`` with its options (:func:`load_base_model`);
    ``normalize`` "MEAN,STD" runs inside the base model, after the noise. ``intensity`` and ``slice``:
    how DICOM, NIfTI and 16-bit files map to [0, 1] (:mod:`medcert_core.data.medical`); ``max_pixels``: the
    pixel budget each file's header is checked against before decoding (default 2**28 elements).
    Every check (parameters, files, stems, model, an n too small to certify any pixel) runs before the
    first draw. ``seed`` None (the default): drawn from the OS's entropy; each file's noise is seeded
    from (seed, sha256 of its bytes). The JSON records ``seed`` (pass it to reproduce), ``seed_source``,
    ``image_sha256`` and ``noise_seed`` (the file's generator seed). ``sequential``: n is the most
    estimation draws, sampling stops once every pixel is decided (anytime-valid p-values,
    :mod:`medcert_core.sequential`); the JSON records the draws used under ``sequential``.

    Images only: ``medcert certify`` reaches it through :func:`medcert_core.single_file.certify_file`, which
    sends a whole 3D volume to :func:`medcert_core.single_volume.certify_volume_file`; a volumetric model given
    a 2D image is refused here.
    """
    check_run_options(sigma=sigma, tau=tau, alpha=alpha, n0=n0, n=n, sequential=sequential,
                      stop_undecided=stop_undecided)
    reading = parse_intensity(intensity), (parse_slice(slice) if slice else None)
    image_path = Path(image_path)
    files = image_files(image_path) if image_path.is_dir() else [image_path]
    check_distinct_stems(files)
    if image_size is not None and len(image_size) != 2:
        raise ValueError(volumetric_model_on_image(image_path, f"--image-size {' x '.join(map(str, image_size))}"))
    images = {path: read_image_file(path, *reading, max_pixels=max_pixels) for path in files}  # fails before any draw
    digests = {path: file_digest(path) for path in files}
    seed, seed_source = run_seed(seed)
    device = resolve_device(device)
    base, config, model_record = load_image_model(
        image_path, checkpoint, model, model_kwargs=model_kwargs, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, class_names=class_names, normalize=normalize, device=device)
    check_channels(images, config.in_channels)
    check_n_certifies(n, config.image_size, tau, alpha, sequential)
    denoising = load_denoiser(denoiser, sigma, steps=steps, flags=denoiser_flags)
    smoothed = SmoothedSegmenter(base, config.num_classes, sigma, denoiser=denoising, batch_size=batch_size,
                                 device=device, precision=precision, channels_last=channels_last, compile=compile)
    settings = run_settings(model_record, smoothed, denoiser=denoiser, n0=n0, n=n, alpha=alpha, tau=tau, seed=seed,
                            seed_source=seed_source, precision=precision)
    summaries = []
    for path in tqdm(files, desc="certify", disable=not progress or len(files) == 1):
        original, mapping = images[path]
        image = model_input(original, config.in_channels, config.image_size)
        noise_seed = image_seed(seed, digests[path])
        generator = torch.Generator(device=device).manual_seed(noise_seed)
        certificate, drawn = certify_tensor(smoothed, image, generator, n0=n0, n=n, tau=tau, alpha=alpha,
                                            sequential=sequential, stop_undecided=stop_undecided, progress=progress)
        extra = {"image_sha256": digests[path], "noise_seed": noise_seed,
                 "file_to_tensor": file_to_tensor(mapping, original.shape, config.in_channels, config.image_size),
                 **drawn}
        summaries.append(_write_outputs(path, original, image, certificate, config, settings | extra,
                                        Path(output_dir)))
    if not image_path.is_dir():
        return summaries[0]
    table = pd.DataFrame([{key: value for key, value in summary.items() if not isinstance(value, dict)}
                          | {f"certified_{name}": count for name, count in summary["certified_pixels"].items()}
                          for summary in summaries])
    write_atomically(Path(output_dir) / "certificates.csv", lambda temporary: table.to_csv(temporary, index=False))
    return summaries


def run_settings(model_record: dict[str, Any], smoothed: SmoothedSegmenter, *, denoiser: str, n0: int, n: int,
                 alpha: float, tau: float, seed: int, seed_source: str, precision: str) -> dict[str, Any]:
    """The JSON fields every certificate of a run shares: the model, the denoiser, the parameters, the seed,
    the precision as resolved for the device (and the one asked, when it was ``auto``)."""
    settings = {**model_record, "denoiser": denoiser, "sigma": smoothed.sigma, "n0": n0, "n": n, "alpha": alpha,
                "tau": tau, "seed": seed, "seed_source": seed_source, "precision": smoothed.precision,
                "device": str(smoothed.device)}
    if precision != smoothed.precision:  # auto, resolved for this device
        settings["precision_asked"] = precision
    return settings


def certify_tensor(smoothed: SmoothedSegmenter, tensor: torch.Tensor, generator: torch.Generator, *, n0: int, n: int,
                   tau: float, alpha: float, sequential: bool, stop_undecided: float,
                   progress: bool) -> tuple[Certificate, dict[str, Any]]:
    """Certify one (C, H, W) image or (C, D, H, W) volume in [0, 1]: n draws, or up to n under ``sequential``.
    Returns the certificate and its JSON fields about the draws (under ``sequential``: the draws used as ``n``)."""
    if not sequential:
        return smoothed.certify(tensor, n0, n, tau=tau, alpha=alpha, progress=progress, generator=generator), {}
    result = smoothed.certify_sequential(tensor, n0, n, tau=tau, alpha=alpha, stop_undecided=stop_undecided,
                                         generator=generator, progress=progress)
    return result.certificate, {"n": result.draws,  # the estimation draws used; n_max under "sequential"
                                "sequential": {"n_max": n, "draws": result.draws, "stopped": result.stopped,
                                               "stop_undecided": stop_undecided}}


def volumetric_model_on_image(path: Path, why: str) -> str:
    """The refusal of a volumetric model (``why``: what says so) given a 2D image file or folder."""
    return (f"the model takes volumes (B, C, D, H, W) ({why}) and {path} holds 2D images: give a 3D NIfTI volume "
            f"(without --slice) to certify it whole, or a 2D model")


def load_image_model(path: Path, checkpoint: str | Path | None, model: str | None, *,
                     device: str | torch.device = "cpu", **options: Any) -> tuple[torch.nn.Module, Any, dict]:
    """:func:`load_base_model` for 2D images (``path``: the file or folder to certify): a volumetric model (a
    checkpoint whose image_size is (D, H, W), a .pt2 whose input is (B, C, D, H, W)) is refused, saying so."""
    try:
        module, config, record = load_base_model(checkpoint, model, device=device, **options)
    except ValueError as error:  # a volumetric .pt2 fails the 2D reading of its input shape: say why
        shape = volumetric_program_shape(model, device)
        if shape is not None:
            raise ValueError(volumetric_model_on_image(path, f"--model {model}: its input is {shape}")) from error
        raise
    if len(config.image_size) != 2:
        raise ValueError(volumetric_model_on_image(path, f"--checkpoint {checkpoint}: image_size "
                                                         f"{' x '.join(map(str, config.image_size))}"))
    return module, config, record


def check_channels(images: dict[Path, tuple[torch.Tensor, dict]], channels: int) -> None:
    """ValueError naming the file when a colour image meets a 1-channel model (its colour would be averaged
    away silently); grey images for a 3-channel model are replicated, as the study does."""
    for path, (image, _) in images.items():
        if image.shape[0] == 3 and channels == 1 and not (torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])):
            raise ValueError(f"{path} is a colour image and the model takes 1 channel: convert it to grey yourself "
                             f"(the certificate would be about the average of its channels), or give an RGB model")


def _write_outputs(path: Path, original: torch.Tensor, image: torch.Tensor, certificate: Certificate, config,
                   settings: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Write one image's PNGs (input size and native size) and JSON; returns the JSON's content."""
    labels = certificate.labels.cpu().numpy()
    native = native_labels(labels, tuple(original.shape[-2:]))
    native_overlay = overlay(original.numpy(), native)
    stem = file_stem(path)
    height, width = config.image_size
    summary = {
        "image": str(path), **settings, "radius": certificate.radius,
        "input_space": f"[0, 1]^({config.in_channels}x{height}x{width})",
        "radius_on_the_file": radius_on_the_file(certificate.radius, settings["file_to_tensor"], original.shape,
                                                 config.in_channels, config.image_size),
        "certified_input_size": [height, width],
        "image_file_size": [int(original.shape[-2]), int(original.shape[-1])],
        "about": (f"the certificate is about the {config.in_channels} x {height} x {width} tensor the model receives "
                  "(the image file mapped to [0, 1] as file_to_tensor says, resized to the model's input size); the native-size maps are its labels "
                  "resized by nearest neighbour, for viewing"),
        "abstain_fraction": float((labels == ABSTAIN).mean()),
        "certified_pixels": {name: int((labels == index).sum()) for index, name in enumerate(config.class_names)},
        "abstain_value": abstain_value(len(config.class_names)),
        "labels_png": str(_save_png(_label_png(labels, len(config.class_names)), output_dir / f"{stem}_labels.png")),
        "overlay_png": str(_save_png(overlay(image.numpy(), labels), output_dir / f"{stem}_overlay.png")),
        "labels_native_png": str(_save_png(_label_png(native, len(config.class_names)),
                                           output_dir / f"{stem}_labels_native.png")),
        "overlay_native_png": str(_save_png(native_overlay, output_dir / f"{stem}_overlay_native.png")),
    }
    summary["legend_png"] = str(_save_png(legend_figure(native_overlay, summary, config.class_names),
                                          output_dir / f"{stem}_legend.png"))
    write_json_atomically(summary, output_dir / f"{stem}_certificate.json")
    return summary


LEGEND_WIDTH = 320  # pixels of the legend panel beside the overlay


def legend_lines(summary: dict[str, Any], class_names: Sequence[str]) -> list[tuple[np.ndarray | None, str]]:
    """The legend's rows, (swatch colour or None, text): title, what R means, one row per class, abstain; for a
    volume (a (D, H, W) ``certified_input_size``) voxels, and the slices shown (``overlay_slices``)."""
    size = summary["certified_input_size"]
    total, unit = math.prod(size), "pixel" if len(size) == 2 else "voxel"
    rows: list[tuple[np.ndarray | None, str]] = [
        (None, f"certified segmentation, sigma = {summary['sigma']:g}"),
        (None, f"radius R = {summary['radius']:.3f} (L2, [0, 1] scale)"),
        (None, f"on the {summary['file_to_tensor']['tensor']} model input"),
        (None, f"= {summary['radius_on_the_file']['unit_image']:.3f} on the file's own [0, 1] image"),
        (None, f"n = {summary['n']}" + (f" of n_max {summary['sequential']['n_max']} (sequential)"
                                         if "sequential" in summary else "")
               + f", tau = {summary['tau']:g}, alpha = {summary['alpha']:g}"),
        (None, f"every certified {unit} of the model input keeps"),
        (None, "its class under any perturbation of L2 norm <= R"),
        (None, "(all at once, with probability >= 1 - alpha)"),
    ]
    if list(size) != list(summary["image_file_size"]):
        (height, width), (file_height, file_width) = size, summary["image_file_size"]
        rows += [(None, f"shown at the file's {file_height} x {file_width}: each pixel"),
                 (None, f"copies its nearest of the {height} x {width} certified ones")]
    if "overlay_slices" in summary:
        rows += [(None, "shown, left to right: the middle slice along"),
                 (None, "array axes " + ", ".join(f"{shown['axis']} (index {shown['index']})"
                                                  for shown in summary["overlay_slices"])),
                 (None, "as stored, no reorientation")]
    rows.append((None, ""))
    for index, name in enumerate(class_names):
        share = 100 * summary["certified_pixels"][name] / total
        swatch = None if index == 0 else colour_labels(np.array([[index]]))[0, 0]
        label = f"{name}: image shown as is" if index == 0 else name
        rows.append((swatch, f"{label} ({share:.1f} % of {unit}s)"))
    rows.append((ABSTAIN_COLOUR, f"abstain: no class certified ({100 * summary['abstain_fraction']:.1f} %)"))
    return rows


def legend_figure(overlay_rgb: np.ndarray, summary: dict[str, Any], class_names: Sequence[str]) -> np.ndarray:
    """(H, W, 3) overlay -> (max(H, legend), W + LEGEND_WIDTH, 3) uint8 with the legend panel on its right."""
    from PIL import Image, ImageDraw, ImageFont

    rows = legend_lines(summary, class_names)
    line = 18
    height = max(overlay_rgb.shape[0], line * (len(rows) + 1))
    canvas = Image.new("RGB", (overlay_rgb.shape[1] + LEGEND_WIDTH, height), (40, 40, 40))
    canvas.paste(Image.fromarray(overlay_rgb), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    left = overlay_rgb.shape[1] + 10
    first_class_row = len(rows) - len(class_names) - 1  # the class rows and abstain, after the text
    for row, (swatch, text) in enumerate(rows):
        top = 8 + row * line
        if swatch is not None:
            draw.rectangle([left, top + 2, left + 12, top + 14], fill=tuple(int(v) for v in swatch), outline=(0, 0, 0))
        draw.text((left + (18 if row >= first_class_row else 0), top), text, fill=(235, 235, 235), font=font)
    return np.asarray(canvas)


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
