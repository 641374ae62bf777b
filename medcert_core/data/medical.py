"""Medical image files: DICOM, NIfTI and 16-bit PNG / TIFF, each read to a [0, 1] image with a record
of how its stored values became that image.

A certificate is about the tensor the model receives, so :func:`read_with_mapping` returns, next to
the (H, W) or (H, W, 3) float32 image, the ``mapping``: the format, the stored dtype and bit depth,
the rescale (DICOM slope / intercept, NIfTI scl_slope / scl_inter), the intensity mapping to [0, 1]
(:class:`Intensity`), the MONOCHROME1 inversion and, for a volume, the slice. ``certify`` adds the
resize and the channels and writes the whole mapping into each certificate's JSON.

Intensity (``--intensity``):

- ``auto`` (default): unsigned integer PNG / TIFF: value / (2^bits - 1) for the file's dtype (8 or 16
  bit, kept at full depth); signed integer TIFF (int8, int16, int32): its dtype's range (int16:
  -32768 -> 0, 32767 -> 1); DICOM: the range its BitsStored / PixelRepresentation allow, after the
  rescale; integer NIfTI: its dtype's range after scl_slope / scl_inter (uint8: 0..255, int16:
  -32768..32767); float files and float NIfTI: as stored when within [0, 1], else the image's own
  minimum to maximum;
- ``minmax``: the image's own minimum to maximum;
- ``window:CENTER,WIDTH``: the DICOM linear window (PS3.3 C.11.2.1.2) in the rescaled units (HU for CT);
- ``voi``: the DICOM file's own window (WindowCenter / WindowWidth, first value) or VOI LUT; only
  when asked, never by default.

Every mapping but a table (VOI LUT, colour palette) is affine before its clipping (which only shrinks
differences), so the record's ``unit_per_value`` (times the rescale slope) bounds how far a change of
the stored values moves the [0, 1] image, and ``certify`` turns it into a radius in stored values
(``radius_on_the_file``), but only when the mapping does not depend on the image: a fixed window, the
dtype's or the declared bit range, a given affine map. ``minmax`` (and ``auto`` on floats outside
[0, 1]) reads the image's own minimum and maximum, so changing one stored value can move every pixel;
its record says ``"image_dependent": true`` and no stored-value radius is given for it.

Colour DICOM: RGB as stored; YBR_FULL / YBR_FULL_422 are converted to RGB once, by pydicom's decoding;
PALETTE COLOR through its palette (a table). A DICOM rescale must have a finite non-zero slope and a
finite intercept, and a Modality LUT Sequence is refused (the rescale is applied here, as recorded).

Before any pixel data is decoded, the image size in the file's header is checked against the pixel
budget (``max_pixels``, :data:`medcert_core.data.base.MAX_PIXELS` by default; frames and slices count).
A Deflated DICOM is inflated with a cap (pydicom would inflate it whole before reading an element):
at most :data:`DEFLATED_HEADER_BYTES` for its header, then what its pixel data needs.

MONOCHROME1 DICOM (white = low values) is inverted after the mapping, so that bone is bright as in
MONOCHROME2 and every PNG radiograph. NIfTI arrays are used as stored: rows are the first remaining
array axis, columns the second, no reorientation; a 3D volume needs a slice (``AXIS:INDEX``) to be read
as an image. Whole volumes (the Decathlon datasets, :mod:`medcert_core.data.decathlon`) are read by
:func:`read_nifti_volume` through the same checks (:func:`open_nifti`: the pixel budget on the header), and
mapped to [0, 1] for ``certify`` by :func:`read_nifti_unit_volume` with the same intensity options as a slice.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcert_core.data.base import (
    ImageTooLarge,
    check_float_image,
    check_pixel_budget,
    drop_alpha,
    file_suffix,
    integer_bits,
    integer_range,
    memory_error_names,
    pixel_budget,
    read_image,
    read_mask,
    read_raw,
)
from medcert_core.io import error_gist

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MEDICAL_SUFFIXES = DICOM_SUFFIXES + NIFTI_SUFFIXES
INTENSITY_FORMS = "auto, minmax, voi, window:CENTER,WIDTH"
DEFLATED_HEADER_BYTES = 16 * 2 ** 20  # inflated bytes read for a Deflated DICOM's header (and allowed after its pixels)
DICOM_AXES = "frames x rows x columns x channels"
LABEL_ROUNDING = 0.01  # a label volume stored as floats: values within this of an integer are that class id


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

    ``natural_range``: the (low, high) the format allows (``auto`` for integers); None for floats. The
    record's ``image_dependent`` says whether the mapping reads the image itself (its minimum and maximum).
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"image file {path} holds NaN or infinite values; replace them before certifying")
    low, high = float(values.min()), float(values.max())
    if intensity.mode == "window":
        unit = linear_window(values, intensity.center, intensity.width)
        record = {"intensity": intensity.describe(), "formula": "clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1)",
                  "unit_per_value": 1 / (intensity.width - 1), "image_dependent": False}
    elif intensity.mode == "minmax" or (natural_range is None and (low < 0 or high > 1)):
        unit = scale_to_unit(values, low, high)
        record = {"intensity": "minmax" if intensity.mode == "minmax" else "auto (minmax: values outside [0, 1])",
                  "formula": f"(v - {low:g}) / ({high:g} - {low:g})", "unit_per_value": _per_value(low, high),
                  "image_dependent": True}
    elif natural_range is None:
        unit = values
        record = {"intensity": "auto (as stored: values within [0, 1])", "formula": "v", "unit_per_value": 1.0,
                  "image_dependent": False}
    else:
        unit = scale_to_unit(values, *natural_range)
        record = {"intensity": "auto", "formula": f"(v - {natural_range[0]:g}) / ({natural_range[1]:g} - "
                                                  f"{natural_range[0]:g})",
                  "unit_per_value": _per_value(*natural_range), "image_dependent": False}
    return unit.astype(np.float32), record | {"stored_min": low, "stored_max": high}


# --------------------------------------------------------------------------- DICOM


def _dicom_error(path: Path, what: str) -> ValueError:
    return ValueError(f"cannot read DICOM file {path}: {what}")


def read_dicom(path: Path, intensity: Intensity = Intensity(), slice_spec: SliceSpec | None = None, *,
               max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM image -> ((H, W) or (H, W, 3) float32 in [0, 1], mapping); ValueError naming the file.

    The header's size is checked against ``max_pixels`` before the pixel data is read (:func:`read_dicom_dataset`).
    """
    dataset = read_dicom_dataset(path, max_pixels)
    if "PixelData" not in dataset:
        raise _dicom_error(path, "it holds no pixel data (PixelData element missing)")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        stored = dataset.pixel_array  # YBR_FULL / YBR_FULL_422 come out as RGB (pydicom's as_rgb default)
    except MemoryError:
        raise
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
    if photometric == "PALETTE COLOR":
        rgb = _palette_rgb(dataset, stored, path)
        return _dicom_colour(rgb, rgb.dtype.itemsize * 8, intensity, path,
                             mapping | {"colour": "the file's palette applied (a table)"}, table=True)
    if samples == 3:
        note = f"{photometric} converted to RGB once, by pydicom" if photometric.startswith("YBR") else "as stored"
        return _dicom_colour(stored, int(dataset.get("BitsStored", 8)), intensity, path, mapping | {"colour": note})
    if samples != 1 or stored.ndim != 2:
        raise _dicom_error(path, f"{samples} samples per pixel, pixel array of shape {stored.shape}: expected one "
                                 f"grey frame (H, W) or RGB")
    if intensity.mode == "voi":
        return _dicom_voi(dataset, stored, photometric, path, mapping)
    rescale = dicom_rescale(dataset, path)
    unit, record = map_intensity(rescaled(stored, rescale), intensity, _rescaled_range(dataset, **rescale), path)
    return _monochrome(unit, photometric, mapping | {"rescale": rescale} | record)


def dicom_shape(dataset) -> tuple[int, int, int, int]:
    """The size a DICOM header declares: (frames, rows, columns, channels); a palette image counts 3 channels."""
    palette = str(dataset.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR"
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    return (int(dataset.get("NumberOfFrames", 1) or 1), int(dataset.get("Rows", 0) or 0),
            int(dataset.get("Columns", 0) or 0), 3 if palette else samples)


def read_dicom_dataset(path: Path, max_pixels: int | None = None):
    """The whole dataset of a DICOM file, read once the size its header declares (:func:`dicom_shape`) is within
    ``max_pixels``: the header first (up to the pixel data), then the file. A Deflated file is inflated with a cap
    (:func:`_read_deflated`). ValueError naming the file when it is no DICOM file or corrupt."""
    from pydicom import dcmread
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with _corrupt_dicom(path):
        meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return _read_deflated(path, max_pixels)
    with _corrupt_dicom(path):
        header = dcmread(path, stop_before_pixels=True)
    check_pixel_budget(path, dicom_shape(header), DICOM_AXES, max_pixels)
    with _corrupt_dicom(path):
        return dcmread(path)


@contextmanager
def _corrupt_dicom(path: Path) -> Iterator[None]:
    """Any failure of pydicom inside the block (but running out of memory) -> ValueError naming the file."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as error:
        raise _dicom_error(path, f"not a DICOM file or corrupt ({error})") from error


def _read_deflated(path: Path, max_pixels: int | None):
    """A Deflated Explicit VR Little Endian DICOM file's dataset. pydicom inflates the whole file before it reads
    one element, so a small file could inflate to any size; here at most :data:`DEFLATED_HEADER_BYTES` are
    inflated to read the header and check the pixel budget, then at most the bytes its declared pixel data
    needs plus twice that much again for the elements around it (:class:`ImageTooLarge` beyond)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset, read_preamble

    with open(path, "rb") as handle, _corrupt_dicom(path):
        read_preamble(handle, False)
        meta = FileMetaDataset(read_dataset(handle, False, True, stop_when=lambda tag, vr, length: tag.group != 2))
        compressed = handle.read()
    prefix = _inflate(compressed, DEFLATED_HEADER_BYTES, path)[0]
    with _corrupt_dicom(path):
        header = _explicit_little_endian(prefix, to_pixels=True)
    shape = dicom_shape(header)
    check_pixel_budget(path, shape, DICOM_AXES, max_pixels)
    bits = int(header.get("BitsAllocated", 16) or 16)
    cap = -(-int(np.prod(shape, dtype=np.int64)) * bits // 8) + 2 * DEFLATED_HEADER_BYTES
    body, complete = _inflate(compressed, cap, path)
    if not complete:
        raise ImageTooLarge(f"image file {path}: its deflated dataset inflates to more than {cap:,} bytes, more than "
                            f"the {' x '.join(map(str, shape))} ({DICOM_AXES}) {bits}-bit pixels its header declares "
                            f"need, with {2 * DEFLATED_HEADER_BYTES:,} bytes for the other elements; refused (a "
                            f"deflate bomb, or a file whose header does not describe its pixel data)")
    with _corrupt_dicom(path):
        dataset = _explicit_little_endian(body, to_pixels=False)
    dataset.file_meta = meta
    return dataset


def _inflate(compressed: bytes, limit: int, path: Path) -> tuple[bytes, bool]:
    """(at most ``limit`` bytes of the raw deflate stream ``compressed``, whether that is the whole stream);
    ValueError naming the file when the stream is corrupt or ends early."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(compressed, limit)
    except zlib.error as error:
        raise _dicom_error(path, f"its deflated data does not inflate ({error})") from error
    if not inflater.eof and len(data) < limit:
        raise _dicom_error(path, "its deflated data ends early (truncated)")
    return data, inflater.eof


def _explicit_little_endian(data: bytes, *, to_pixels: bool):
    """The dataset encoded in ``data`` (Explicit VR Little Endian), up to its pixel data with ``to_pixels``
    (``data`` may then end inside an element: what was read is kept)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    stop = (lambda tag, vr, length: tag == 0x7FE00010) if to_pixels else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a header prefix ends inside an element
        return read_dataset(DicomBytesIO(data), False, True, stop_when=stop)


def dicom_rescale(dataset, path: Path) -> dict[str, float]:
    """The modality rescale of a DICOM dataset: {"slope": RescaleSlope, "intercept": RescaleIntercept} (1, 0 where
    absent or empty); ValueError naming the file for a slope of 0, a non-finite value or a Modality LUT Sequence."""
    if dataset.get("ModalityLUTSequence"):
        raise _dicom_error(path, "its values go through a Modality LUT Sequence (a lookup table), which medcert does "
                                 "not apply; convert the file to a rescale slope / intercept, or to the LUT's values")
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    rescale = {"slope": 1.0 if slope in (None, "") else float(slope),
               "intercept": 0.0 if intercept in (None, "") else float(intercept)}
    if not (np.isfinite(rescale["slope"]) and np.isfinite(rescale["intercept"])) or rescale["slope"] == 0:
        raise _dicom_error(path, f"RescaleSlope {rescale['slope']:g}, RescaleIntercept {rescale['intercept']:g}: the "
                                 f"slope must be a finite number other than 0 and the intercept finite (a slope of 0 "
                                 f"maps every value to the intercept); fix the file's rescale")
    return rescale


def rescaled(stored: np.ndarray, rescale: dict[str, float]) -> np.ndarray:
    """Stored values x slope + intercept, float64: the modality rescale exactly as :func:`dicom_rescale` records it."""
    return stored.astype(np.float64) * rescale["slope"] + rescale["intercept"]


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
    from pydicom.pixels import apply_voi_lut

    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center, width = (float(np.atleast_1d(dataset.WindowCenter)[0]), float(np.atleast_1d(dataset.WindowWidth)[0]))
        rescale = dicom_rescale(dataset, path)
        unit = linear_window(rescaled(stored, rescale), center, width).astype(np.float32)
        record = {"rescale": rescale, "intensity": "voi", "window_center": center,
                  "window_width": width, "unit_per_value": 1 / (width - 1), "image_dependent": False,
                  "formula": "clip((v - (center - 0.5)) / (width - 1) + 0.5, 0, 1) on the rescaled values"}
        return _monochrome(unit, photometric, mapping | record)
    if "VOILUTSequence" in dataset:
        item = dataset.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        unit = scale_to_unit(apply_voi_lut(stored, dataset).astype(np.float64), 0, 2 ** bits - 1).astype(np.float32)
        return _monochrome(unit, photometric, mapping | {"intensity": "voi", "voi_lut_bits": bits,
                                                         "formula": f"VOI LUT(v) / {2 ** bits - 1}",
                                                         "unit_per_value": None,  # a table: not linear
                                                         "image_dependent": False})
    raise _dicom_error(path, "--intensity voi asked, but the file has no WindowCenter / WindowWidth and no VOI LUT "
                             "Sequence; give the window yourself with --intensity window:CENTER,WIDTH")


def _monochrome(unit: np.ndarray, photometric: str, mapping: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Invert a MONOCHROME1 image (1 - v) so that high values are bright; record it."""
    inverted = photometric == "MONOCHROME1"
    return (1.0 - unit if inverted else unit).astype(np.float32), mapping | {"inverted": inverted}


def _dicom_colour(rgb: np.ndarray, bits: int, intensity: Intensity, path: Path, mapping: dict[str, Any], *,
                  table: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """An RGB DICOM frame -> (H, W, 3) in [0, 1] by its ``bits`` (auto) or its minimum / maximum; ``table``: the
    RGB came out of a palette, so the mapping from the stored values is not affine (no ``unit_per_value``)."""
    if intensity.mode in ("voi", "window"):
        raise _dicom_error(path, f"--intensity {intensity.describe()} applies to grey images; this one is "
                                 f"{mapping['photometric_interpretation']} (use auto or minmax)")
    unit, record = map_intensity(rgb, intensity, (0.0, float(2 ** bits - 1)), path)
    if table:
        record |= {"formula": f"p = palette(v), then {record['formula'].replace('v', 'p', 1)}", "unit_per_value": None}
    return unit, mapping | record | {"inverted": False}


def _palette_rgb(dataset, stored: np.ndarray, path: Path) -> np.ndarray:
    """A PALETTE COLOR frame's indices -> (H, W, 3) RGB through the file's palette (8- or 16-bit entries)."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(stored, dataset)
    except MemoryError:
        raise
    except Exception as error:
        raise _dicom_error(path, f"PALETTE COLOR: its palette cannot be applied ({error_gist(error)}); convert the "
                                 f"file to RGB") from error
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise _dicom_error(path, f"PALETTE COLOR: its palette gives an array of shape {rgb.shape}, not (H, W, 3)")
    return rgb


# --------------------------------------------------------------------------- NIfTI


def read_nifti(path: Path, intensity: Intensity = Intensity(), slice_spec: SliceSpec | None = None, *,
               max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A 2D NIfTI image, or one slice of a 3D volume -> ((H, W) float32 in [0, 1], mapping). ``auto`` maps an
    integer dtype by its range after scl_slope / scl_inter (:func:`nifti_range`), never by the image's values."""
    values, mapping = read_nifti_array(path, slice_spec, max_pixels=max_pixels)
    return map_nifti_values(values, mapping, intensity, path)


def map_nifti_values(values: np.ndarray, mapping: dict[str, Any], intensity: Intensity,
                     path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A NIfTI plane (H, W) or volume (D, H, W) of rescaled values and the record of how it was read -> float32
    in [0, 1] of the same shape and the record with the intensity mapping added; ``auto`` maps an integer dtype
    by its range after scl_slope / scl_inter (:func:`nifti_range`), never by the values."""
    if intensity.mode == "voi":
        raise ValueError(f"NIfTI file {path}: --intensity voi is a DICOM window; give --intensity window:CENTER,WIDTH")
    unit, record = map_intensity(values, intensity, nifti_range(np.dtype(mapping["stored_dtype"]), mapping["rescale"]),
                                 path)
    return unit, mapping | record


def nifti_range(dtype: np.dtype, rescale: dict[str, float]) -> tuple[float, float] | None:
    """The (low, high) an integer NIfTI dtype can hold after scl_slope / scl_inter (int16: -32768..32767 x slope +
    inter); None for floats (mapped as stored within [0, 1], else by the image's own minimum to maximum)."""
    if not np.issubdtype(dtype, np.integer):
        return None
    info = np.iinfo(dtype)
    ends = sorted(float(value) * rescale["slope"] + rescale["intercept"] for value in (info.min, info.max))
    return ends[0], ends[1]


def read_nifti_array(path: Path, slice_spec: SliceSpec | None = None, *, max_pixels: int | None = None
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """The (H, W) array of a 2D NIfTI file or of one slice of a 3D one (scl_slope / scl_inter applied), and
    the mapping's record; ValueError naming the file for a volume without a slice, 4D data or a bad slice.

    The shape in the header is checked against ``max_pixels`` (the whole array) before any data is read; of a
    volume only the slice asked is read.
    """
    image, stored_dtype, shape = open_nifti(path, max_pixels)
    squeezed = tuple(axis for axis, length in enumerate(shape) if length > 1)
    mapping: dict[str, Any] = {"format": "nifti", "stored_dtype": stored_dtype, "array_shape": list(shape)}
    if len(squeezed) <= 2 and slice_spec is None:
        plane = _nifti_data(image, path).reshape([shape[axis] for axis in squeezed] or [1, 1])
        if plane.ndim == 1:
            plane = plane[None]
        mapping["axes"] = "rows = array axis {}, columns = axis {} (as stored, no reorientation)".format(
            *(squeezed + (None, None))[:2])
    elif len(shape) == 3 and slice_spec is not None:
        if slice_spec.axis > 2 or slice_spec.index >= shape[slice_spec.axis]:
            raise ValueError(f"NIfTI file {path}: slice {slice_spec.axis}:{slice_spec.index} is outside the volume "
                             f"of shape {shape} (axis 0..2, index 0..{shape[min(slice_spec.axis, 2)] - 1})")
        index: list[int | slice] = [slice(None)] * 3
        index[slice_spec.axis] = slice_spec.index
        plane = _nifti_data(image, path, tuple(index))
        rows, columns = (axis for axis in range(3) if axis != slice_spec.axis)
        mapping |= {"slice": {"axis": slice_spec.axis, "index": slice_spec.index},
                    "axes": f"rows = array axis {rows}, columns = axis {columns} (as stored, no reorientation)"}
    elif slice_spec is None:
        raise ValueError(f"NIfTI file {path} is a volume of shape {shape}: choose a 2D slice with --slice AXIS:INDEX "
                         f"(e.g. --slice 2:{shape[2] // 2 if len(shape) > 2 else 0} for the middle one along axis 2)")
    else:
        raise ValueError(f"NIfTI file {path} has shape {shape}: --slice takes one slice of a 3D volume, not of "
                         f"{len(shape)}D data")
    mapping["rescale"] = nifti_rescale(image)
    return plane, mapping


def open_nifti(path: Path, max_pixels: int | None = None) -> tuple[Any, str, tuple[int, ...]]:
    """A NIfTI file's nibabel image (no data read yet), stored dtype and shape; the shape in the header is
    checked against the pixel budget (``max_pixels``, default MAX_PIXELS) before any data is read."""
    import nibabel

    try:
        image = nibabel.load(path)
        stored_dtype = str(image.get_data_dtype())
        shape = tuple(int(length) for length in image.header.get_data_shape())
    except MemoryError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read NIfTI file {path}: {error}") from error
    check_pixel_budget(path, shape, "the NIfTI array's dimensions", max_pixels)
    return image, stored_dtype, shape


def nifti_rescale(image) -> dict[str, float]:
    """The scl_slope / scl_inter nibabel applies to a NIfTI image's stored values (1 and 0 when unset)."""
    slope, intercept = image.dataobj.slope, image.dataobj.inter
    return {"slope": float(slope) if np.isfinite(slope) else 1.0,
            "intercept": float(intercept) if np.isfinite(intercept) else 0.0}


def read_nifti_volume(path: Path, *, max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A 3D NIfTI volume -> its (D, H, W) array (scl_slope / scl_inter applied; D, H, W the array axes 0, 1, 2
    as stored, no reorientation) and the record of how it was read; the pixel budget is checked on the
    header first (:func:`open_nifti`). ValueError naming the file when it is not 3D or cannot be read."""
    with memory_error_names(path):
        image, stored_dtype, shape = open_nifti(path, max_pixels)
        if len(shape) != 3:
            raise ValueError(f"NIfTI file {path} has shape {shape}: expected a 3D volume (D, H, W)"
                             + (f"; {len(shape)}D data (time points, modalities) are not read: save each 3D volume "
                                f"in a file of its own" if len(shape) > 3 else ""))
        values = _nifti_data(image, path)
    return values, {"format": "nifti", "stored_dtype": stored_dtype, "array_shape": list(shape),
                    "rescale": nifti_rescale(image),
                    "axes": "D, H, W = array axes 0, 1, 2 (as stored, no reorientation)"}


def is_nifti_volume(path: str | Path, max_pixels: int | None = None) -> bool:
    """Whether ``path`` is a NIfTI file whose header declares more than two axes longer than 1 (a volume, or 4D
    data), read from the header only (pixel budget checked, :func:`open_nifti`); False for any other file."""
    if file_suffix(path) not in NIFTI_SUFFIXES:
        return False
    shape = open_nifti(Path(path), max_pixels)[2]
    return sum(length > 1 for length in shape) > 2


def read_nifti_unit_volume(path: str | Path, intensity: Intensity = Intensity(), *,
                           max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A 3D NIfTI volume -> ((D, H, W) float32 in [0, 1], mapping): :func:`read_nifti_volume` (axes as stored,
    pixel budget on the header), then the intensity mapping of :func:`map_nifti_values`, as for a slice.
    ValueError naming the file for 4D data."""
    path = Path(path)
    pixel_budget(max_pixels)
    values, mapping = read_nifti_volume(path, max_pixels=max_pixels)
    with memory_error_names(path):
        return map_nifti_values(values, mapping, intensity, path)


def read_nifti_labels(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """A 3D NIfTI label volume -> int64 (D, H, W) class ids; labels stored as floats are rounded, and
    ValueError names the file when a value is negative or more than LABEL_ROUNDING from an integer."""
    values = read_nifti_volume(path, max_pixels=max_pixels)[0]
    labels = np.rint(values)
    if not np.isfinite(values).all() or (values.size and (np.abs(values - labels).max() > LABEL_ROUNDING
                                                         or labels.min() < 0)):
        raise ValueError(f"label file {path} holds values that are not class ids (non-negative integers): "
                         f"{float(values.min()):g}..{float(values.max()):g}")
    return labels.astype(np.int64)


def _nifti_data(image, path: Path, index: tuple | None = None) -> np.ndarray:
    """The NIfTI image's array (scaled), or only ``index`` of it; ValueError naming the file when it cannot be read."""
    try:
        return np.asarray(image.dataobj if index is None else image.dataobj[index])
    except MemoryError:
        raise
    except Exception as error:
        raise ValueError(f"cannot read NIfTI file {path}: {error}") from error


def read_nifti_mask(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """A 2D NIfTI label map -> int64 (H, W) of its class ids; ValueError naming the file for non-integers."""
    with memory_error_names(path):
        values = read_nifti_array(path, max_pixels=max_pixels)[0]
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


def read_with_mapping(path: str | Path, intensity: Intensity = Intensity(), slice_spec: SliceSpec | None = None, *,
                      max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Any supported image file -> ((H, W) or (H, W, 3) float32 in [0, 1], mapping); see the module doc.

    ``max_pixels``: the pixel budget (default :data:`medcert_core.data.base.MAX_PIXELS`), checked from the file's
    header before decoding; :class:`medcert_core.data.base.ImageTooLarge` beyond it or when memory runs out.
    """
    path = Path(path)
    pixel_budget(max_pixels)
    with memory_error_names(path):
        return _read_with_mapping(path, intensity, slice_spec, max_pixels)


def _read_with_mapping(path: Path, intensity: Intensity, slice_spec: SliceSpec | None,
                       max_pixels: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_with_mapping` without its MemoryError handling."""
    suffix = file_suffix(path)
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path, intensity, slice_spec, max_pixels=max_pixels)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, intensity, slice_spec, max_pixels=max_pixels)
    if slice_spec is not None:
        raise ValueError(f"--slice applies to NIfTI volumes and multi-frame DICOM, not to {path}")
    if intensity.mode == "voi":
        raise ValueError(f"--intensity voi is a DICOM window; {path} is {suffix}: use auto, minmax or window:C,W")
    raw = read_raw(path, "image", max_pixels=max_pixels)
    raw = drop_alpha(check_float_image(raw, path) if intensity.mode == "auto" else raw)
    mapping = {"format": suffix.lstrip("."), "stored_dtype": str(raw.dtype)}
    if np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool:
        mapping["bits_stored"] = integer_bits(raw.dtype)
        unit, record = map_intensity(raw, intensity, integer_range(raw.dtype), path)
    else:
        unit, record = map_intensity(raw, intensity, None, path)
    return unit, mapping | record
