"""Certify a whole NIfTI volume: ``medcert certify VOLUME.nii.gz --model seg3d.pt2 ...`` (issue #38, step 4).

Which files: a NIfTI file whose header has three axes longer than 1, given without ``--slice`` (with
``--slice AXIS:INDEX``, one slice of it goes to a 2D model, as before), one file at a time. 4D data is refused.

Which models: a volumetric one, whose input has three spatial axes, read from the model itself:

- a ``torch.export`` program (``.pt2``) whose input is (B, C, D, H, W) (the shape it was exported with);
- a medcert checkpoint whose config records a (D, H, W) ``image_size`` (a 3D architecture);
- an entry point ``package.module:function``: it must run on a (B, 1, D, H, W) batch and return
  (B, K, D, H, W) logits.

A 2D model given a volume is refused (pass ``--slice AXIS:INDEX``, or give a 3D model), and so is a model
taking more than one channel (a 3D NIfTI volume has one).

The certified tensor: the stored values (scl_slope / scl_inter applied) mapped to [0, 1] by ``--intensity``
as a slice's are (:func:`medcert_core.data.medical.read_nifti_unit_volume`), one channel, axes as stored
(D, H, W = array axes 0, 1, 2, no reorientation), never resized. The model runs at its input size: a
``.pt2``'s fixed sizes, a checkpoint's ``image_size``, or ``--image-size DxHxW``; an axis a program leaves
free takes the volume's own size, rounded up to the multiple the program asks for (an axis exported as
``m * Dim``). Where that is larger than the volume, zeros are appended at the end of each axis *inside the
base model, after the noise*, and the logits cropped back (:class:`PaddedVolume`), as the Decathlon
datasets pad (image 0 at the end of each axis): the noise, the Holm correction over voxels, the
certificate and every output cover the volume's own voxels only, and ``file_to_tensor["padding"]``
records what was appended. A volume larger than a fixed model size is refused (no resizing, no tiling).

Writes, next to each other in ``output_dir`` (the 2D outputs' names where they apply):

    <stem>_labels.nii.gz            class ids voxel for voxel, ``abstain_value`` where the certificate abstains
                                    (uint8 with 255 up to 255 classes, else uint16 with 65535), with the input's
                                    affine and header geometry (zooms, units, qform / sform), intent "label"
    <stem>_overlay_axis{0,1,2}.png  the middle slice along each array axis in grey, the certified classes in
                                    colour and abstentions white, as stored (no reorientation)
    <stem>_legend.png               the three overlays side by side (small ones enlarged by an integer factor),
                                    with the legend
    <stem>_certificate.json         the 2D JSON's fields (``certified_pixels`` counts voxels), ``file_to_tensor``
                                    (intensity mapping, axes, padding) and ``radius_on_the_file``: in stored
                                    values R x (WIDTH - 1) for ``window:CENTER,WIDTH``, R x the dtype's range
                                    for ``auto`` on integers; null, with the reason, for a mapping that reads
                                    the volume itself (``minmax``, ``auto`` on floats outside [0, 1])
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcert_core.certify import ABSTAIN, Certificate
from medcert_core.data.base import file_stem
from medcert_core.data.medical import Intensity, read_nifti_unit_volume
from medcert_core.devices import resolve_device
from medcert_core.io import error_gist, file_digest, write_atomically, write_json_atomically
from medcert_core.models.volumetric import padded_to_size
from medcert_core.single_image import (
    exported_input_shape,
    volumetric_program_shape,
    VOLUME_AXES,
    _label_png,
    _save_png,
    abstain_value,
    certify_tensor,
    check_n_certifies,
    file_to_tensor,
    legend_figure,
    load_base_model,
    overlay,
    radius_on_the_file,
    run_seed,
    run_settings,
)
from medcert_core.smoothing import SmoothedSegmenter, check_segmenter_output, image_seed

Shape = tuple[int, int, int]
LEGEND_HEIGHT = 256  # the legend shows small slices enlarged to about this many rows (the overlay PNGs stay 1:1)
THREE_D_MODELS = ("a .pt2 exported with a (B, C, D, H, W) input, a checkpoint of a 3D architecture, or an entry "
                  "point returning (B, K, D, H, W) logits")


def read_volume_file(path: Path, intensity: Intensity, max_pixels: int | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """A 3D NIfTI file -> ((1, D, H, W) float32 in [0, 1], the record of how its values were mapped)."""
    unit, mapping = read_nifti_unit_volume(path, intensity, max_pixels=max_pixels)
    return torch.from_numpy(unit[None]), mapping


def axis_requirement(length: int | torch.SymInt) -> tuple[int | None, int]:
    """What a program asks of one input axis: (its size, 1) when fixed; (None, m) when free, m the factor of a
    size exported as ``m * Dim`` (1 for any other free size)."""
    if isinstance(length, int):
        return int(length), 1
    coefficient = length.node.expr.as_coeff_Mul()[0]
    return None, int(coefficient) if coefficient.is_Integer and coefficient > 0 else 1


def model_input_size(volume: Shape, fixed: Sequence[int | None], multiples: Sequence[int], source: str) -> Shape:
    """The (D, H, W) the model runs at: each axis's fixed size, else the volume's own rounded up to the axis's
    multiple. ValueError naming ``source`` when the volume is larger than a fixed size (no resizing)."""
    size = []
    for axis, (length, fixed_length, multiple) in enumerate(zip(volume, fixed, multiples)):
        if fixed_length is not None and length > fixed_length:
            wanted = " x ".join("any" if value is None else str(value) for value in fixed)
            raise ValueError(f"{source} takes volumes of {wanted} voxels and this one is "
                             f"{' x '.join(map(str, volume))} "
                             f"(array axis {axis}: {length} > {fixed_length}); volumes are never resized: crop the "
                             f"volume, or give a model that takes its size (e.g. a .pt2 exported with dynamic sizes)")
        size.append(fixed_length if fixed_length is not None else -(-length // multiple) * multiple)
    return (size[0], size[1], size[2])


def padding_record(volume: Shape, size: Shape) -> dict[str, Any]:
    """The JSON record of the padding from the volume's (D, H, W) to the model's ``size``."""
    appended = [total - length for length, total in zip(volume, size)]
    return {"model_input_size": list(size), "appended_voxels": appended,
            "how": ("none: the model runs at the volume's own size" if not any(appended) else
                    "zeros appended at the end of each axis inside the base model, after the noise, and the logits "
                    "cropped back: only the volume's own voxels are noised, certified and written")}


class PaddedVolume(torch.nn.Module):
    """``model`` on a (B, C, D, H, W) batch with zeros appended at the end of each axis up to ``size``, its
    logits (B, K, *size) cropped back to the batch's (D, H, W): a deterministic function of the volume's own
    voxels, so the certificate is about them alone."""

    def __init__(self, model: torch.nn.Module, size: Sequence[int]):
        super().__init__()
        self.model = model
        self.size = tuple(int(length) for length in size)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return padded_to_size(self.model, batch, self.size)


def two_d_model_on_volume(path: Path, volume: Shape, why: str) -> str:
    """The refusal of a 2D model (``why``: what says so) given a volume."""
    return (f"{path} is a volume of shape {' x '.join(map(str, volume))} and the model takes 2D images ({why}): pass "
            f"--slice AXIS:INDEX to certify one slice of it (e.g. --slice 0:{volume[0] // 2}), or give a 3D model "
            f"({THREE_D_MODELS})")


def probe_volume_classes(model: torch.nn.Module, size: Shape, batch: int, source: str,
                         device: str | torch.device) -> int:
    """K from one forward pass on a zero volume (batch, 1, *size), whose logits must be (batch, K, *size);
    ValueError naming ``source`` otherwise (a 2D model fails here)."""
    shape = (batch, 1, *size)
    try:
        with torch.inference_mode():
            logits = model(torch.zeros(shape, device=device))
    except Exception as error:
        raise ValueError(f"{source} fails on a volume of shape {shape} ({error_gist(error)}): a volume needs a 3D "
                         f"model ({THREE_D_MODELS}); to certify one slice with a 2D model, pass --slice "
                         f"AXIS:INDEX") from error
    check_segmenter_output(logits, shape, None)
    return int(logits.shape[1])


def load_volume_model(path: Path, volume: Shape, checkpoint: str | Path | None, model: str | None, *,
                      model_kwargs: dict[str, Any] | None = None, num_classes: int | None = None,
                      in_channels: int | None = None, image_size: Sequence[int] | None = None,
                      class_names: Sequence[str] | None = None, normalize: str | None = None,
                      device: str | torch.device = "cpu") -> tuple[torch.nn.Module, int, tuple[str, ...], Shape, dict]:
    """The volumetric base model for the ``volume`` (D, H, W) of ``path`` (module doc: which models, which size),
    checked as a 2D one is (a .pt2 vetted before it runs, K by a forward pass, batch independence), with its
    normalisation inside. Returns (module taking (B, 1, *size), K, class names, the (D, H, W) size it runs at,
    JSON record of the model); padding to that size is the caller's (:class:`PaddedVolume`)."""
    from medcert_core.models.external import ExportedModule, checked_external, load_model

    if in_channels not in (None, 1):
        raise ValueError(f"--in-channels {in_channels}: a 3D NIfTI volume has one channel, so its model takes 1")
    if image_size is not None and len(image_size) != 3:
        raise ValueError(f"--image-size {' x '.join(map(str, image_size))}: {path} is a volume, its model's size is "
                         f"D x H x W (e.g. --image-size 32x64x64), or leave it out to run at the volume's own size")
    if checkpoint is not None or model is None:  # a medcert checkpoint (load_base_model refuses both or neither)
        module, config, record = load_base_model(checkpoint, model, model_kwargs=model_kwargs, num_classes=num_classes,
                                                 in_channels=in_channels, image_size=image_size,
                                                 class_names=class_names, normalize=normalize, device=device)
        if len(config.image_size) != 3:
            raise ValueError(two_d_model_on_volume(path, volume, f"--checkpoint {checkpoint}: image_size "
                                                                 f"{' x '.join(map(str, config.image_size))}"))
        if config.in_channels != 1:
            raise ValueError(f"--checkpoint {checkpoint} takes {config.in_channels} channels; a 3D NIfTI volume "
                             f"has one")
        size = model_input_size(volume, config.image_size, (1, 1, 1), f"--checkpoint {checkpoint}")
        return module, config.num_classes, tuple(config.class_names), size, record
    source = f"--model {model}"
    loaded, form, _ = load_model(model, kwargs=model_kwargs, device=device)
    fixed: Sequence[int | None] = (None, None, None)  # an entry point runs at the volume's own size
    multiples: Sequence[int] = (1, 1, 1)
    batch = None  # a program exported with a fixed batch is called with batches of that size
    if form == "torch.export":
        shape = exported_input_shape(loaded)
        if shape is None or len(shape) != 5:
            raise ValueError(two_d_model_on_volume(path, volume, f"{source}: its input is {shape}"))
        if isinstance(shape[1], int) and shape[1] != 1:
            raise ValueError(f"{source} takes {shape[1]} channels (input {shape}); a 3D NIfTI volume has one")
        fixed, multiples = zip(*(axis_requirement(length) for length in shape[2:]))
        batch = shape[0] if isinstance(shape[0], int) else None
        loaded = ExportedModule(loaded.program, batch)
    if image_size is not None:
        fixed, multiples = tuple(int(length) for length in image_size), (1, 1, 1)
    size = model_input_size(volume, fixed, multiples, source)
    found = probe_volume_classes(loaded, size, batch or 1, source, device)
    loaded, info = checked_external(loaded, str(model), form, found, 1, size, num_classes=num_classes,
                                    class_names=class_names, normalize=normalize, device=device)
    return loaded, found, info.class_names, size, info.describe()


def certify_volume_file(path: str | Path, checkpoint: str | Path | None, denoiser: str, sigma: float, *,
                        model: str | None = None, model_kwargs: dict[str, Any] | None = None,
                        num_classes: int | None = None, in_channels: int | None = None,
                        image_size: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                        normalize: str | None = None, intensity: Intensity = Intensity(),
                        max_pixels: int | None = None, output_dir: str | Path = ".", n0: int = 10, n: int = 100,
                        alpha: float = 0.001, tau: float = 0.75, seed: int | None = None,
                        batch_size: int | str = 32, device: str = "auto", precision: str = "fp32",
                        channels_last: bool = False, compile: bool | str = False, sequential: bool = False,
                        stop_undecided: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """Certify the whole volume of a 3D NIfTI file with a volumetric model (module doc); writes the label NIfTI,
    the overlays, the legend and the JSON, and returns the JSON's content.

    Reached through :func:`medcert_core.single_file.certify_file`, which checks the parameters; the
    options mean what they mean there (seeds: from the OS's entropy unless given, each file's noise from (seed,
    sha256 of its bytes)). Every check (file, model, sizes, an n too small for the volume's voxels) runs before
    the first draw. The denoisers are 2D: ``denoiser`` must be ``none``.
    """
    path = Path(path)
    if denoiser != "none":
        raise ValueError(f"--denoiser {denoiser}: the denoisers take 2D images; a volume is certified with --denoiser "
                         f"none (or certify one slice of it with --slice AXIS:INDEX)")
    volume, mapping = read_volume_file(path, intensity, max_pixels)
    shape: Shape = (int(volume.shape[1]), int(volume.shape[2]), int(volume.shape[3]))
    check_n_certifies(n, shape, tau, alpha, sequential)  # Holm over the volume's own voxels, padding or not
    digest = file_digest(path)
    seed, seed_source = run_seed(seed)
    device = resolve_device(device)
    base, classes, names, size, record = load_volume_model(
        path, shape, checkpoint, model, model_kwargs=model_kwargs, num_classes=num_classes, in_channels=in_channels,
        image_size=image_size, class_names=class_names, normalize=normalize, device=device)
    smoothed = SmoothedSegmenter(base if size == shape else PaddedVolume(base, size), classes, sigma,
                                 batch_size=batch_size, device=device, precision=precision,
                                 channels_last=channels_last, compile=compile)
    settings = run_settings(record, smoothed, denoiser=denoiser, n0=n0, n=n, alpha=alpha, tau=tau, seed=seed,
                            seed_source=seed_source, precision=precision)
    noise_seed = image_seed(seed, digest)
    generator = torch.Generator(device=device).manual_seed(noise_seed)
    certificate, drawn = certify_tensor(smoothed, volume, generator, n0=n0, n=n, tau=tau, alpha=alpha,
                                        sequential=sequential, stop_undecided=stop_undecided, progress=progress)
    steps = file_to_tensor(mapping, volume.shape, 1, shape) | {"padding": padding_record(shape, size)}
    extra = {"image_sha256": digest, "noise_seed": noise_seed, "file_to_tensor": steps, **drawn}
    return write_volume_outputs(path, volume, certificate, names, settings | extra, Path(output_dir))


def middle_slices(shape: Sequence[int]) -> list[tuple[int, int]]:
    """(array axis, index) of the middle slice along each of a (D, H, W) volume's axes."""
    return [(axis, int(shape[axis]) // 2) for axis in VOLUME_AXES]


def side_by_side(images: Sequence[np.ndarray], gap: int = 4, height: int = LEGEND_HEIGHT) -> np.ndarray:
    """(h_i, w_i, 3) uint8 images -> one row, top-aligned on the legend's dark grey with ``gap`` columns between
    them, each enlarged by the same integer factor (nearest neighbour) so that the tallest is about ``height``."""
    factor = max(1, height // max(image.shape[0] for image in images))
    images = [image.repeat(factor, axis=0).repeat(factor, axis=1) for image in images]
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 40, dtype=np.uint8)
    left = 0
    for image in images:
        canvas[:image.shape[0], left:left + image.shape[1]] = image
        left += image.shape[1] + gap
    return canvas


def write_label_nifti(labels: np.ndarray, num_classes: int, source: Path, path: Path) -> Path:
    """(D, H, W) class ids / ABSTAIN -> a NIfTI file at ``path`` (gzip'd for .gz) of the label dtype, abstain as
    :func:`abstain_value`, with the ``source`` NIfTI file's affine and header geometry (zooms, units, qform /
    sform and their codes), no intensity scaling, intent "label"; written atomically."""
    import nibabel

    array = _label_png(labels, num_classes)
    reference = nibabel.load(source)  # the header only
    image = type(reference)(array, reference.affine, header=reference.header)
    image.set_data_dtype(array.dtype)
    header = image.header
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("label")
    header["cal_min"], header["cal_max"] = 0, 0
    header["descrip"] = f"medcert certified labels, abstain = {abstain_value(num_classes)}".encode()[:79]
    data = image.to_bytes()
    return write_atomically(path, lambda temporary: temporary.write_bytes(
        gzip.compress(data, mtime=0) if path.name.lower().endswith(".gz") else data))


def write_volume_outputs(path: Path, volume: torch.Tensor, certificate: Certificate, class_names: Sequence[str],
                         settings: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Write one volume's label NIfTI, middle-slice overlays, legend and JSON; returns the JSON's content."""
    labels = certificate.labels.cpu().numpy()
    grey = volume.numpy()[0]
    shape = [int(length) for length in labels.shape]
    stem = file_stem(path)
    shown = middle_slices(shape)
    overlays = [overlay(grey.take(index, axis=axis)[None], labels.take(index, axis=axis)) for axis, index in shown]
    summary = {
        "image": str(path), **settings, "radius": certificate.radius,
        "input_space": f"[0, 1]^(1x{'x'.join(map(str, shape))})",
        "radius_on_the_file": radius_on_the_file(certificate.radius, settings["file_to_tensor"], volume.shape, 1,
                                                 shape),
        "certified_input_size": shape,
        "image_file_size": shape,
        "about": (f"the certificate is about the 1 x {' x '.join(map(str, shape))} tensor of the volume's voxels "
                  "mapped to [0, 1] as file_to_tensor says (array axes as stored, never resized; any padding is "
                  "added inside the base model, after the noise, and is neither noised nor certified); "
                  "labels_nifti holds its labels voxel for voxel with the input's affine; certified_pixels counts "
                  "voxels"),
        "abstain_fraction": float((labels == ABSTAIN).mean()),
        "certified_pixels": {name: int((labels == index).sum()) for index, name in enumerate(class_names)},
        "abstain_value": abstain_value(len(class_names)),
        "labels_nifti": str(write_label_nifti(labels, len(class_names), path, output_dir / f"{stem}_labels.nii.gz")),
        "overlay_slices": [{"axis": axis, "index": index} for axis, index in shown],
        "overlay_pngs": [str(_save_png(image, output_dir / f"{stem}_overlay_axis{axis}.png"))
                         for image, (axis, _) in zip(overlays, shown)],
    }
    summary["legend_png"] = str(_save_png(legend_figure(side_by_side(overlays), summary, class_names),
                                          output_dir / f"{stem}_legend.png"))
    write_json_atomically(summary, output_dir / f"{stem}_certificate.json")
    return summary
