"""Medical image files: DICOM, NIfTI and 16-bit PNG / TIFF, each read to a [0, 1] image with a record
of how its stored values became that image.

A certificate is about the tensor the model receives, so :func:`read_with_mapping` returns, next to
the (H, W) or (H, W, 3) float32 image, the ``mapping``: the format, the stored dtype and bit depth,
the rescale (DICOM slope / intercept, NIfTI scl_slope / scl_inter), the intensity mapping to [0, 1]
(:class:`Intensity`), the MONOCHROME1 inversion and, for a volume, the slice. ``certify`` adds the
resize and the channels and writes the whole mapping into each certificate's JSON.

Intensity (``--intensity``):

- ``auto`` (default): integer PNG / TIFF: value / (2^bits - 1) for the file's dtype (8 or 16 bit, kept
  at full depth); DICOM: the range its BitsStored / PixelRepresentation allow, after the rescale,
  maps to [0, 1]; NIfTI and float files: as stored when within [0, 1], else the slice's minimum to
  maximum;
- ``minmax``: the image's own minimum to maximum;
- ``window:CENTER,WIDTH``: the DICOM linear window (PS3.3 C.11.2.1.2) in the rescaled units (HU for CT);
- ``voi``: the DICOM file's own window (WindowCenter / WindowWidth, first value) or VOI LUT; only
  when asked, never by default.

Every mapping but a VOI LUT table is affine before its clipping (which only shrinks differences), so
the record's ``unit_per_value`` (times the rescale slope) bounds how far a change of the stored values
moves the [0, 1] image: ``certify`` turns it into the radius on the file (``radius_on_the_file``).

MONOCHROME1 DICOM (white = low values) is inverted after the mapping, so that bone is bright as in
MONOCHROME2 and every PNG radiograph. NIfTI arrays are used as stored: rows are the first remaining
array axis, columns the second, no reorientation; a 3D volume needs a slice (``AXIS:INDEX``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcert_core.data.base import (
    check_float_image,
    drop_alpha,
    file_suffix,
    integer_top,
    read_image,
    read_mask,
    read_raw,
)
from medcert_core.io import error_gist

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MEDICAL_SUFFIXES = DICOM_SUFFIXES + NIFTI_SUFFIXES
INTENSITY_FORMS = "auto, minmax, voi, window:CENTER,WIDTH"


@dataclass(frozen=True)
class Intensity:
    """How stored values map to [0, 1]: mode ``auto`` | ``minmax`` | ``voi`` | ``window`` (center, width)."""

    mode: str = "auto"
    center: float | None = None
    width: float | None = None

    def describe(self) -> str:
        return f"window:{self.center:g},{self.width:g}" if self.mode == "window" else self.mode


def parse_intensity(text: str) -> Intensity:
    """``auto`` | ``minmax`` | ``voi`` | ``window:CENTER,WIDTH`` (width > 1) -> Intensity; ValueError naming the forms."""
    text = text.strip().lower()
    if text in ("auto", "minmax", "voi"):
        return Intensity(text)
    match = re.fullmatch(r"window:\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)", text)
    if match:
        center, width = float(match.group(1)), float(match.group(2))
        if np.isfinite(center) and np.isfinite(width) and width > 1:
            return Intensity("window", center, width)
    raise ValueError(f"intensity {text!r}: expected one of {INTENSITY_FORMS} (finite numbers, WIDTH > 1)")


@dataclass(frozen=True)
class SliceSpec:
    """One 2D slice of a volume: the array axis held fixed and the index along it."""

    axis: int
    index: int


def parse_slice(text: str) -> SliceSpec:
    """``AXIS:INDEX`` (non-negative integers) -> SliceSpec; ValueError naming the form."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"slice {text!r}: expected AXIS:INDEX, e.g. 2:40 for the 41st slice along the third axis")
    return SliceSpec(int(match.group(1)), int(match.group(2)))


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear window to [0, 1]: below c - 0.5 - (w-1)/2 -> 0, above c - 0.5 + (w-1)/2 -> 1."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _per_value(low: float, high: float) -> float:
    """The slope of :func:`scale_to_unit`: [0, 1] units per stored unit (0 for a constant image)."""
    return 1 / (high - low) if high > low else 0.0


def scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(values - low) / (high - low) clipped to [0, 1]; a constant image (high == low) -> zeros."""
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def map_intensity(values: np.ndarray, intensity: Intensity, natural_range: tuple[float, float] | None,
                  path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored (rescaled) values -> float32 [0, 1] and the mapping's record.

    ``natural_range``: the (low, high) the format allows (``auto`` for integers); None for floats.
    """
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"image file {path} holds NaN or infinite values; replace them before certifying")
    low, high = float(values.min()), float(values.max())
    if intensity.mode == "window":
        unit = linear_window(values, intensity.center, intensity.width)
        record = {"intensity": intensity.describe(), "formula": "clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1)",
                  "unit_per_value": 1 / (intensity.width - 1)}
    elif intensity.mode == "minmax" or (natural_range is None and (low < 0 or high > 1)):
        unit = scale_to_unit(values, low, high)
        record = {"intensity": "minmax" if intensity.mode == "minmax" else "auto (minmax: values outside [0, 1])",
                  "formula": f"(v - {low:g}) / ({high:g} - {low:g})", "unit_per_value": _per_value(low, high)}
    elif natural_range is None:
        unit = values
        record = {"intensity": "auto (as stored: values within [0, 1])", "formula": "v", "unit_per_value": 1.0}
    else:
        unit = scale_to_unit(values, *natural_range)
        record = {"intensity": "auto", "formula": f"(v - {natural_range[0]:g}) / ({natural_range[1]:g} - "
                                                  f"{natural_range[0]:g})", "unit_per_value": _per_value(*natural_range)}
    return unit.astype(np.float32), record | {"stored_min": low, "stored_max": high}


# --------------------------------------------------------------------------- DICOM


def _dicom_error(path: Path, what: str) -> ValueError:
    return ValueError(f"cannot read DICOM file {path}: {what}")


def read_dicom(path: Path, intensity: Intensity = Intensity(), slice_spec: SliceSpec | None = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM image -> ((H, W) or (H, W, 3) float32 in [0, 1], mapping); ValueError naming the file."""
    import pydicom
    from pydicom.pixels import apply_rescale

    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        raise _dicom_error(path, f"not a DICOM file or corrupt ({error})") from error
    if "PixelData" not in dataset:
        raise _dicom_error(path, "it holds no pixel data (PixelData element missing)")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        stored = dataset.pixel_array
    except Exception as error:
        name = getattr(syntax, "name", str(syntax))
        raise _dicom_error(path, f"transfer syntax {name}: {_decoding_hint(syntax)} ({error_gist(error)})") from error
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1))
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    mapping: dict[str, Any] = {"format": "dicom", "transfer_syntax": getattr(syntax, "name", str(syntax)),
                               "photometric_interpretation": photometric, "stored_dtype": str(stored.dtype),
                               "bits_stored": int(dataset.get("BitsStored", stored.dtype.itemsize * 8))}
    if frames > 1:
        if slice_spec is None or slice_spec.axis != 0:
            raise _dicom_error(path, f"it holds {frames} frames; choose one with --slice 0:FRAME (0..{frames - 1})")
        if slice_spec.index >= frames:
            raise _dicom_error(path, f"frame {slice_spec.index} asked, it holds {frames} (0..{frames - 1})")
        stored = stored[slice_spec.index]
        mapping["frame"] = slice_spec.index
    if samples == 3:
        return _dicom_colour(dataset, stored, photometric, intensity, path, mapping)
    if samples != 1 or stored.ndim != 2:
        raise _dicom_error(path, f"{samples} samples per pixel, pixel array of shape {stored.shape}: expected one "
                                 f"grey frame (H, W) or RGB")
    if intensity.mode == "voi":
        return _dicom_voi(dataset, stored, photometric, path, mapping)
    values, rescale = apply_rescale(stored, dataset), dicom_rescale(dataset)
    unit, record = map_intensity(values, intensity, _rescaled_range(dataset, **rescale), path)
    return _monochrome(unit, photometric, mapping | {"rescale": rescale} | record)


def dicom_rescale(dataset) -> dict[str, float]:
    """The modality rescale of a DICOM dataset: {"slope": RescaleSlope, "intercept": RescaleIntercept} (1, 0 if absent)."""
    return {"slope": float(dataset.get("RescaleSlope", 1) or 1), "intercept": float(dataset.get("RescaleIntercept", 0) or 0)}


def _decoding_hint(syntax) -> str:
    """Why pixel data would not decode: no decoder installed for a compressed syntax, or broken data."""
    from pydicom.pixels import get_decoder

    if syntax is None or not syntax.is_compressed:
        return "its pixel data does not match its header (truncated or corrupt)"
    try:
        available = get_decoder(syntax).is_available
    except Exception:  # pydicom knows no decoder for this syntax at all
        available = False
    if available:
        return "its compressed pixel data does not decode (truncated or corrupt)"
    return ("it is compressed and no decoder for its transfer syntax is installed: install one (pip install "
            "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or gdcm) or decompress it first (gdcmconv --raw IN "
            "OUT, dcmdjpeg IN OUT)")


def _rescaled_range(dataset, slope: float, intercept: float) -> tuple[float, float]:
    """The (low, high) stored values can take (BitsStored, PixelRepresentation), after the rescale."""
    bits = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return float(ends[0]), float(ends[1])


def _dicom_voi(dataset, stored: np.ndarray, photometric: str, path: Path,
               mapping: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The file's own VOI: its first WindowCenter / WindowWidth, or its VOI LUT (scaled by the LUT's output bits)."""
    from pydicom.pixels import apply_rescale, apply_voi_lut

    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = (float(np.atleast_1d(dataset.WindowCenter)[0]), float(np.atleast_1d(dataset.WindowWidth)[0]))
        values = apply_rescale(stored, dataset)
        unit = linear_window(values.astype(np.float64), center, width).astype(np.float32)
        record = {"rescale": dicom_rescale(dataset), "intensity": "voi", "window_center": center,
                  "window_width": width, "unit_per_value": 1 / (width - 1),
                  "formula": "clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1) on the rescaled values"}
        return _monochrome(unit, photometric, mapping | record)
    if "VOILUTSequence" in dataset:
        item = dataset.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        unit = scale_to_unit(apply_voi_lut(stored, dataset).astype(np.float64), 0, 2 ** bits - 1).astype(np.float32)
        return _monochrome(unit, photometric, mapping | {"intensity": "voi", "voi_lut_bits": bits,
                                                         "formula": f"VOI LUT(v) / {2 ** bits - 1}",
                                                         "unit_per_value": None})  # a table: not linear
    raise _dicom_error(path, "--intensity voi asked, but the file has no WindowCenter / WindowWidth and no VOI LUT "
                             "Sequence; give the window yourself with --intensity window:CENTER,WIDTH")


def _monochrome(unit: np.ndarray, photometric: str, mapping: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Invert a MONOCHROME1 image (1 - v) so that high values are bright; record it."""
    inverted = photometric == "MONOCHROME1"
    return (1.0 - unit if inverted else unit).astype(np.float32), mapping | {"inverted": inverted}


def _dicom_colour(dataset, stored: np.ndarray, photometric: str, intensity: Intensity, path: Path,
                  mapping: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """An RGB (or YBR) DICOM frame -> (H, W, 3) in [0, 1] by its bit depth (auto) or its minimum / maximum."""
    from pydicom.pixels import convert_color_space

    if intensity.mode in ("voi", "window"):
        raise _dicom_error(path, f"--intensity {intensity.describe()} applies to grey images; this one is "
                                 f"{photometric} (use auto or minmax)")
    if photometric.startswith("YBR"):
        stored = convert_color_space(stored, photometric, "RGB")
    bits = int(dataset.get("BitsStored", 8))
    unit, record = map_intensity(stored, intensity, (0.0, float(2 ** bits - 1)), path)
    return unit, mapping | record | {"inverted": False}


# --------------------------------------------------------------------------- NIfTI


def read_nifti(path: Path, intensity: Intensity = Intensity(), slice_spec: SliceSpec | None = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """A 2D NIfTI image, or one slice of a 3D volume -> ((H, W) float32 in [0, 1], mapping)."""
    values, mapping = read_nifti_array(path, slice_spec)
    if intensity.mode == "voi":
        raise ValueError(f"NIfTI file {path}: --intensity voi is a DICOM window; give --intensity window:CENTER,WIDTH")
    floating = np.issubdtype(np.dtype(mapping["stored_dtype"]), np.floating) or mapping["rescale"]["slope"] != 1
    natural = None if floating else (float(values.min()), float(values.max()))
    unit, record = map_intensity(values, intensity, natural, path)
    return unit, mapping | record


def read_nifti_array(path: Path, slice_spec: SliceSpec | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The (H, W) array of a 2D NIfTI file or of one slice of a 3D one (scl_slope / scl_inter applied), and
    the mapping's record; ValueError naming the file for a volume without a slice, 4D data or a bad slice."""
    import nibabel

    try:
        image = nibabel.load(path)
        stored_dtype = str(image.get_data_dtype())
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise ValueError(f"cannot read NIfTI file {path}: {error}") from error
    shape = tuple(data.shape)
    squeezed = tuple(axis for axis, length in enumerate(shape) if length > 1)
    mapping: dict[str, Any] = {"format": "nifti", "stored_dtype": stored_dtype, "array_shape": list(shape)}
    if len(squeezed) <= 2 and slice_spec is None:
        plane = data.reshape([shape[axis] for axis in squeezed] or [1, 1])
        if plane.ndim == 1:
            plane = plane[None]
        mapping["axes"] = "rows = array axis {}, columns = axis {} (as stored, no reorientation)".format(
            *(squeezed + (None, None))[:2])
    elif data.ndim == 3 and slice_spec is not None:
        if slice_spec.axis > 2 or slice_spec.index >= shape[slice_spec.axis]:
            raise ValueError(f"NIfTI file {path}: slice {slice_spec.axis}:{slice_spec.index} is outside the volume "
                             f"of shape {shape} (axis 0..2, index 0..{shape[min(slice_spec.axis, 2)] - 1})")
        plane = np.take(data, slice_spec.index, axis=slice_spec.axis)
        rows, columns = (axis for axis in range(3) if axis != slice_spec.axis)
        mapping |= {"slice": {"axis": slice_spec.axis, "index": slice_spec.index},
                    "axes": f"rows = array axis {rows}, columns = axis {columns} (as stored, no reorientation)"}
    elif slice_spec is None:
        raise ValueError(f"NIfTI file {path} is a volume of shape {shape}: choose a 2D slice with --slice AXIS:INDEX "
                         f"(e.g. --slice 2:{shape[2] // 2 if len(shape) > 2 else 0} for the middle one along axis 2)")
    else:
        raise ValueError(f"NIfTI file {path} has shape {shape}: --slice takes one slice of a 3D volume, not of "
                         f"{data.ndim}D data")
    slope, intercept = image.dataobj.slope, image.dataobj.inter
    mapping["rescale"] = {"slope": float(slope) if np.isfinite(slope) else 1.0,
                          "intercept": float(intercept) if np.isfinite(intercept) else 0.0}
    return np.asarray(plane), mapping


def read_nifti_mask(path: Path) -> np.ndarray:
    """A 2D NIfTI label map -> int64 (H, W) of its class ids; ValueError naming the file for non-integers."""
    values = read_nifti_array(path)[0]
    if not np.array_equal(values, np.round(values)):
        raise ValueError(f"mask file {path} holds non-integer values; a NIfTI mask must hold class ids")
    return values.astype(np.int64)


def read_medical_or_image(path: Path) -> np.ndarray:
    """Any image file -> (H, W) or (H, W, 3) float32 in [0, 1]: DICOM and 2D NIfTI by the ``auto`` mapping,
    the rest as :func:`medcert_core.data.base.read_image` reads it (the ``folder`` dataset's reader)."""
    return read_with_mapping(path)[0] if file_suffix(path) in MEDICAL_SUFFIXES else read_image(path)


def read_medical_or_mask(path: Path) -> np.ndarray:
    """Any mask file -> int64 (H, W): a 2D NIfTI label map, or what :func:`medcert_core.data.base.read_mask` reads."""
    return read_nifti_mask(path) if file_suffix(path) in NIFTI_SUFFIXES else read_mask(path)


# --------------------------------------------------------------------------- any file


def read_with_mapping(path: str | Path, intensity: Intensity = Intensity(), slice_spec: SliceSpec | None = None
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Any supported image file -> ((H, W) or (H, W, 3) float32 in [0, 1], mapping); see the module doc."""
    path = Path(path)
    suffix = file_suffix(path)
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path, intensity, slice_spec)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, intensity, slice_spec)
    if slice_spec is not None:
        raise ValueError(f"--slice applies to NIfTI volumes and multi-frame DICOM, not to {path}")
    if intensity.mode == "voi":
        raise ValueError(f"--intensity voi is a DICOM window; {path} is {suffix}: use auto, minmax or window:C,W")
    raw = check_float_image(read_raw(path, "image"), path) if intensity.mode == "auto" else read_raw(path, "image")
    raw = drop_alpha(raw)
    mapping = {"format": suffix.lstrip("."), "stored_dtype": str(raw.dtype)}
    if np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool:
        top = integer_top(raw.dtype)
        mapping["bits_stored"] = {1.0: 1, 255.0: 8}.get(top, 16)
        unit, record = map_intensity(raw, intensity, (0.0, top), path)
    else:
        unit, record = map_intensity(raw, intensity, None, path)
    return unit, mapping | record
