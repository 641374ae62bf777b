"""Shared pieces of the dataset loaders: file reading, splits, resizing and the dataset class.

Every loader builds a :class:`Source` (all case ids of the dataset, a function that reads one
case at its native size, the class names and the output size);
:func:`medcert_core.data.load_dataset` picks the split and wraps the source in a
:class:`SegmentationDataset`, which resizes, sets the channel count and caches every decoded
item in memory.

Every reader checks the image size its file's header declares against a pixel budget
(:data:`MAX_PIXELS` elements: rows x columns x channels x frames) before it decodes any pixel data,
since a small file can declare a huge image (a decompression bomb); PIL's own bomb limit gives way
to that budget. Running out of memory while reading becomes :class:`ImageTooLarge` naming the file.
"""

from __future__ import annotations

import re

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from medcert_core.io import file_digest

SPLITS = ("train", "val", "test", "all")
SPLIT_FRACTIONS = (0.7, 0.1)  # train, val; test is the rest
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
MAX_PIXELS = 2 ** 28  # the pixel budget: elements (rows x columns x channels x frames) a file may declare
RAISE_MAX_PIXELS = "--max-pixels N (certify) or max_pixels=N (read_with_mapping, read_image_file, certify_image_file)"

Size = tuple[int, int]
Loader = Callable[[str], tuple[np.ndarray, np.ndarray]]
CaseFiles = dict[str, list[Path]]  # case id -> the files it is read from (image first, then its masks)
LabelFn = Callable[[np.ndarray, Path], np.ndarray]


# --------------------------------------------------------------------------- errors and files


def layout_error(dataset: str, path: Path, layout: str, what: str = "folder") -> FileNotFoundError:
    """FileNotFoundError naming the missing ``path`` and showing the dataset's expected layout."""
    return FileNotFoundError(
        f"{dataset}: {what} not found: {path}\nExpected layout:\n{layout.rstrip()}"
    )


def require_dir(path: str | Path | None, dataset: str, layout: str) -> Path:
    """``path`` as a Path if it is a directory, else :func:`layout_error`."""
    if path is None:
        raise layout_error(dataset, Path("<root=None>"), layout, what="root folder (not given)")
    path = Path(path)
    if not path.is_dir():
        raise layout_error(dataset, path, layout)
    return path


def file_suffix(path: str | Path) -> str:
    """The lower-case suffix, ``.nii.gz`` as one: ``a.nii.gz`` -> ``.nii.gz``, ``A.PNG`` -> ``.png``."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def file_stem(path: str | Path) -> str:
    """The name without its suffix, ``.nii.gz`` as one: ``ct.nii.gz`` -> ``ct``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def index_files(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Map file stem -> path for the files of ``folder`` with one of ``extensions`` (any case).

    Hidden files are ignored; two files with the same stem raise ValueError naming both.
    """
    index: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if file_suffix(path) not in extensions:
            continue
        stem = file_stem(path)
        if stem in index:
            raise ValueError(f"two files with the same stem: {index[stem]} and {path}")
        index[stem] = path
    return index


def missing_mask_error(mask: Path | str, image_path: Path) -> FileNotFoundError:
    """FileNotFoundError naming the expected mask and the image that lacks it."""
    return FileNotFoundError(f"mask file not found: {mask} (for image {image_path})")


def require_file(path: Path, image_path: Path) -> Path:
    """``path`` if it is a file, else :func:`missing_mask_error`."""
    if not path.is_file():
        raise missing_mask_error(path, image_path)
    return path


def match_masks(images: dict[str, Path], masks: dict[str, Path], mask_dir: Path) -> dict[str, Path]:
    """The mask path of every image stem; a missing one raises :func:`missing_mask_error`."""
    for stem, image_path in images.items():
        if stem not in masks:
            raise missing_mask_error(mask_dir / f"{stem}.*", image_path)
    return {stem: masks[stem] for stem in images}


def require_cases(ids: Sequence[str], dataset: str, folder: Path, layout: str) -> list[str]:
    """``ids`` as a list, or :func:`layout_error` naming ``folder`` if there are none."""
    if not ids:
        raise layout_error(dataset, folder, layout, what="image files (no cases)")
    return list(ids)


def check_same_shape(image_path: Path, image_shape: Sequence[int], mask_path: Path,
                     mask_shape: Sequence[int], *, scaled_ok: bool = False) -> None:
    """Raise ValueError naming both files if the (H, W) of image and mask differ.

    With ``scaled_ok`` a mask of another resolution with the same aspect ratio is accepted.
    """
    (ih, iw), (mh, mw) = tuple(image_shape[:2]), tuple(mask_shape[:2])
    if (ih, iw) == (mh, mw) or (scaled_ok and ih * mw == iw * mh):
        return
    raise ValueError(
        f"mask shape {(mh, mw)} of {mask_path} differs from image shape {(ih, iw)} of {image_path}"
    )


# --------------------------------------------------------------------------- the pixel budget


class ImageTooLarge(ValueError):
    """An image file that declares more elements than the pixel budget, or that ran out of memory being read."""


def pixel_budget(max_pixels: int | None = None) -> int:
    """``max_pixels``, or :data:`MAX_PIXELS` when None; ValueError unless an integer >= 1."""
    if max_pixels is None:
        return MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be an integer >= 1 (elements an image file may declare), got {max_pixels!r}")
    return int(max_pixels)


def check_pixel_budget(path: Path, shape: Sequence[int], axes: str, max_pixels: int | None = None) -> None:
    """:class:`ImageTooLarge` naming ``path``, the ``shape`` its header declares (``axes`` says what its numbers
    are), the limit and how to raise it, when ``shape`` holds more than ``max_pixels`` elements (default
    :data:`MAX_PIXELS`). Called before any pixel data is decoded."""
    limit = pixel_budget(max_pixels)
    elements = math.prod(int(length) for length in shape)
    if elements > limit:
        raise ImageTooLarge(
            f"image file {path}: its header declares {' x '.join(str(int(n)) for n in shape)} ({axes}) = "
            f"{elements:,} elements, more than the limit of {limit:,}; refused before decoding (a small file can "
            f"declare a huge image). If the image is genuine and fits in memory, raise the limit: {RAISE_MAX_PIXELS}")


@contextmanager
def memory_error_names(path: Path) -> Iterator[None]:
    """A MemoryError inside the block becomes :class:`ImageTooLarge` naming ``path`` (reading it, or mapping
    its values to [0, 1], needed more memory than there is)."""
    try:
        yield
    except MemoryError as error:
        detail = f": {error}" if str(error) else ""
        raise ImageTooLarge(f"image file {path}: out of memory while reading it and mapping its values to [0, 1] "
                            f"(MemoryError{detail}); free memory, or refuse such files with a lower pixel "
                            f"budget: {RAISE_MAX_PIXELS}") from error


_PIL_LIMIT = threading.Lock()


@contextmanager
def pil_without_its_bomb_limit() -> Iterator[None]:
    """PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS) off inside the block, so that the pixel
    budget, checked from the header, is the one limit (and ``max_pixels`` can raise it)."""
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


# --------------------------------------------------------------------------- reading arrays


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(path: Path) -> bytes:
    """The first 26 bytes of a PNG (signature + IHDR up to the colour type), b"" for other files."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    return head if head.startswith(PNG_SIGNATURE) and len(head) == 26 else b""


def png_bit_depth(path: Path) -> int | None:
    """A PNG's bit depth per sample (IHDR byte 24), None if ``path`` is not a PNG."""
    head = _png_header(path)
    return head[24] if head else None


def png_colour_type(path: Path) -> int | None:
    """A PNG's colour type (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA), None if not a PNG."""
    head = _png_header(path)
    return head[25] if head else None


def read_png16_colour(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """A 16-bit RGB / RGBA PNG -> (H, W, 3 or 4) uint16 at full depth (pypng; PIL reads it as 8 bits).

    The size in its header (IHDR) is checked against the pixel budget before any row is decoded.
    """
    import png

    with open(path, "rb") as handle:
        reader = png.Reader(file=handle)
        reader.preamble()
        shape = (reader.height, reader.width, reader.planes)
        check_pixel_budget(path, shape, "rows x columns x channels", max_pixels)
        width, height, rows, info = reader.asDirect()
        array = np.empty((height, width * info["planes"]), dtype=np.uint16)
        for index, row in enumerate(rows):
            array[index] = row
    return array.reshape(height, width, info["planes"])


def read_tiff(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """A TIFF file's first series -> array of its stored dtype (what ``tifffile.imread`` reads), its shape
    checked against the pixel budget before any strip or tile is decoded."""
    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        check_pixel_budget(path, series.shape, f"TIFF axes {series.axes}", max_pixels)
        return np.asarray(series.asarray())


def read_pil(path: Path, kind: str, max_pixels: int | None = None) -> np.ndarray:
    """PNG, JPEG, BMP, GIF (first frame) through PIL -> array; ``kind`` as in :func:`read_raw`. The size
    and bands in the header are checked against the pixel budget before the pixel data is decoded."""
    with pil_without_its_bomb_limit(), Image.open(path) as im:
        to_rgb = (im.mode == "P" and kind == "image") or im.mode == "PA"
        channels = 3 if to_rgb else len(im.getbands())
        check_pixel_budget(path, (im.height, im.width, channels), "rows x columns x channels", max_pixels)
        im.load()
        if im.mode in ("1", "LA"):
            im = im.convert("L")
        elif to_rgb:
            im = im.convert("RGB")
        elif im.mode not in ("L", "P", "RGB", "I", "F") and not im.mode.startswith("I;16"):
            im = im.convert("RGB")
        if im.mode == "I" and png_bit_depth(path) == 16:  # older Pillow: a 16-bit grey PNG as int32
            return np.array(im).astype(np.uint16)  # unsigned 16-bit, as stored (not the int32 range)
        return np.array(im)


def read_raw(path: Path, kind: str, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to an array (H, W) or (H, W, C) of its stored dtype.

    ``kind`` "image" turns palette images into RGB; "mask" keeps palette indices (label values).
    TIFF goes through tifffile, 16-bit colour PNG through pypng, everything else through PIL. The
    header's size is checked against ``max_pixels`` (default :data:`MAX_PIXELS`) first
    (:class:`ImageTooLarge`); any decoding failure becomes a ValueError naming the file; a
    MemoryError passes through (see :func:`memory_error_names`).
    """
    try:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            array = read_tiff(path, max_pixels)
        elif png_bit_depth(path) == 16 and png_colour_type(path) in (2, 6):
            array = read_png16_colour(path, max_pixels)  # PIL would truncate 16-bit colour to 8 bits
        else:
            array = read_pil(path, kind, max_pixels)
    except (ImageTooLarge, MemoryError):
        raise
    except Exception as exc:  # PIL / tifffile raise many types for broken files
        raise ValueError(f"cannot read {kind} file {path}: {exc}; replace it with a complete "
                         f"PNG, JPEG, TIFF, BMP or GIF file") from exc
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF (C, H, W)
    if array.ndim not in (2, 3) or min(array.shape[:2]) == 0:
        raise ValueError(f"cannot read {kind} file {path}: unexpected array shape {array.shape}")
    return array


def integer_range(dtype: np.dtype) -> tuple[float, float]:
    """The stored values that map to 0 and 1: (0, 1) for bool, (0, 255) for 8-bit unsigned, (0, 65535) for
    wider unsigned (16-bit PNG / TIFF), the dtype's own range for signed integers (int16: -32768, 32767)."""
    dtype = np.dtype(dtype)
    if dtype == bool:
        return 0.0, 1.0
    if np.issubdtype(dtype, np.signedinteger):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 255.0 if dtype.itemsize == 1 else 65535.0


def integer_bits(dtype: np.dtype) -> int:
    """The bit depth :func:`integer_range` maps: 1 for bool, 8 / 16 for unsigned, the dtype's width for signed."""
    low, high = integer_range(dtype)
    return int(round(np.log2(high - low + 1)))


def to_unit(array: np.ndarray) -> np.ndarray:
    """Stored values -> float32 [0, 1]: integers by :func:`integer_range` (8-bit /255, 16-bit /65535, signed
    integers from their dtype's minimum), floats as they are."""
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        low, high = integer_range(array.dtype)
        if low == 0:  # in float32, as the study has always read its 8-bit files
            return np.clip(array.astype(np.float32) / np.float32(high), 0.0, 1.0)
        return ((array.astype(np.float64) - low) / (high - low)).astype(np.float32)
    return array.astype(np.float32)


def drop_alpha(array: np.ndarray) -> np.ndarray:
    """(H, W, 2|4) -> (H, W) grey or (H, W, 3) colour: the alpha channel dropped."""
    if array.ndim == 3:
        return array[..., 0] if array.shape[-1] < 3 else array[..., :3]
    return array


def check_float_image(array: np.ndarray, path: Path) -> np.ndarray:
    """``array``; a float image must be finite and within [0, 1] (ValueError naming ``path``)."""
    if not np.issubdtype(array.dtype, np.floating):
        return array
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ValueError(f"image file {path} holds {bad} NaN or infinite values; "
                         f"replace them, or save the image as 8- or 16-bit integers")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ValueError(f"image file {path} holds float values in [{low:g}, {high:g}], outside [0, 1]; "
                         f"scale it to [0, 1], or save it as 8- or 16-bit integers")
    return array


def read_image(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Image file -> float32 (H, W) grayscale or (H, W, 3) RGB in [0, 1] (alpha dropped).

    Float images must hold finite values in [0, 1] (see :func:`check_float_image`); the header's size must
    be within ``max_pixels`` (:func:`check_pixel_budget`); running out of memory raises :class:`ImageTooLarge`.
    """
    with memory_error_names(path):
        return drop_alpha(to_unit(check_float_image(read_raw(path, "image", max_pixels=max_pixels), path)))


def read_gray(path: Path) -> np.ndarray:
    """Image file -> float32 (H, W) in [0, 1]; RGB is averaged over its channels."""
    array = read_image(path)
    return array.mean(axis=-1) if array.ndim == 3 else array


def read_mask(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Mask file -> integer array (H, W) of its stored values (colour: maximum over R, G, B)."""
    with memory_error_names(path):
        array = read_raw(path, "mask", max_pixels=max_pixels)
        if array.ndim == 3:
            array = array[..., :3].max(axis=-1)
        if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
            array = np.rint(array * (255 if array.max() <= 1 else 1))
        return array.astype(np.int64)


def binarize(mask: np.ndarray) -> np.ndarray:
    """Stored mask values (H, W) -> bool: ``>= 128`` for 0/255-style masks, ``> 0`` for 0/1."""
    return mask >= 128 if mask.max(initial=0) > 1 else mask > 0


def binary_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    """:func:`binarize` a binary mask file's values; ValueError naming ``path`` for values it would misread.

    Negative values, or a maximum between 2 and 127 (e.g. class ids 0, 1, 2, which thresholding at
    128 would turn into an empty mask), are not a 0/1 or 0/255 binary mask.
    """
    high = int(mask.max(initial=0))
    if mask.min(initial=0) < 0 or 1 < high < 128:
        values = np.unique(mask)
        shown = values[:8].tolist() + (["..."] if len(values) > 8 else [])
        raise ValueError(f"mask {path} holds values {shown}; a binary mask holds 0/255 (binarized at 128) or 0/1 "
                         f"(masks of class ids 0..K-1 go in the 'folder' dataset)")
    return binarize(mask)


def binary_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """Stored mask values (H, W) of the file ``path`` -> int64 labels {0, 1} (see :func:`binary_mask`)."""
    return binary_mask(mask, path).astype(np.int64)


def files_per_case(images: Mapping[str, Path], masks: Mapping[str, Path | Mapping[str, Path]]) -> CaseFiles:
    """case id -> [image file, mask file(s)] for cases read from one image and one mask file, or a
    mapping of mask files (organ or side -> file, taken in sorted key order)."""
    def mask_files(value: Path | Mapping[str, Path]) -> list[Path]:
        return [value] if isinstance(value, Path) else [value[key] for key in sorted(value)]

    return {case: [image, *mask_files(masks[case])] for case, image in images.items() if case in masks}


def paired_loader(images: dict[str, Path], masks: dict[str, Path],
                  read: Callable[[Path], np.ndarray], to_labels: LabelFn,
                  read_masks: Callable[[Path], np.ndarray] | None = None) -> Loader:
    """Loader of cases made of one image file and one mask file with the same (H, W).

    ``read`` decodes the image (e.g. :func:`read_image`, :func:`read_gray`); ``to_labels``
    turns the stored mask values (and the mask path, for error messages) into class ids;
    ``read_masks`` decodes a mask (default :func:`read_mask`).
    """
    read_masks = read_masks or read_mask

    def load(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = images[case_id], masks[case_id]
        image, mask = read(image_path), read_masks(mask_path)
        check_same_shape(image_path, image.shape, mask_path, mask.shape)
        return image, to_labels(mask, mask_path)

    return load


def paint_labels(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Bool masks (H, W), painting order -> int64 labels; layer k paints k + 1 over earlier ones."""
    labels = np.zeros(layers[0].shape, dtype=np.int64)
    for class_id, layer in enumerate(layers, start=1):
        labels[layer] = class_id
    return labels


# --------------------------------------------------------------------------- splits and sizes


def split_ids(ids: Sequence[str], split: str, seed: int, block: int = 0) -> list[str]:
    """The ``split`` ("train", "val", "test" or "all") of ``ids``, sorted.

    ``block`` 0: the sorted ids are shuffled with ``numpy.random.default_rng(seed)``; the first
    round(0.7 N) are train, the next round(0.1 N) val, the rest test. ``block`` k > 0 keeps runs of k
    consecutive ids together (frames of one video are near-duplicates, CVC-ClinicDB): the ids in
    natural order ("2" before "10") are cut into runs of k, the runs are shuffled with the same
    generator and given whole to train until it holds at least round(0.7 N) ids, then to val until
    train and val hold round(0.8 N), the rest to test.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 0:
        raise ValueError(f"split block must be an integer >= 0 (0: a random split per case), got {block!r}")
    ordered = sorted(ids)
    if split == "all":
        return ordered
    n = len(ordered)
    n_train, n_val = (round(fraction * n) for fraction in SPLIT_FRACTIONS)
    if block:
        return sorted(_blocked_split(ordered, split, seed, block, (n_train, n_train + n_val)), key=natural_key)
    order = np.random.default_rng(seed).permutation(n)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n)}
    start, stop = bounds[split]
    return sorted(ordered[i] for i in order[start:stop])


def natural_key(text: str) -> list:
    """Sort key that orders the digit runs of ``text`` by value: "2" < "10", "frame9" < "frame10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _blocked_split(ordered: list[str], split: str, seed: int, block: int, ends: tuple[int, int]) -> list[str]:
    """The ids of ``split`` when runs of ``block`` consecutive ids stay together (:func:`split_ids`)."""
    natural = sorted(ordered, key=natural_key)
    runs = [natural[start:start + block] for start in range(0, len(natural), block)]
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    taken = 0
    for index in np.random.default_rng(seed).permutation(len(runs)):
        part = "train" if taken < ends[0] else "val" if taken < ends[1] else "test"
        parts[part] += runs[index]
        taken += len(runs[index])
    if not parts[split]:
        sizes = ", ".join(f"{name} {len(ids)}" for name, ids in parts.items())
        raise ValueError(f"a split in runs of {block} consecutive ids leaves {split} empty: {len(ordered)} ids make "
                         f"{len(runs)} runs ({sizes}); use a smaller split_block (0: a random split per case)")
    return parts[split]


def as_size(image_size: int | Sequence[int]) -> Size:
    """``image_size`` as (H, W): an int n means (n, n)."""
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return int(size[0]), int(size[1])


def resize_image(image: torch.Tensor, size: Size) -> torch.Tensor:
    """(C, H, W) float -> (C, *size), bilinear with antialiasing, clipped to [0, 1]."""
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def resize_mask(mask: torch.Tensor, size: Size) -> torch.Tensor:
    """(H, W) int64 labels -> (*size), nearest neighbour (pixel-centre aligned)."""
    if tuple(mask.shape) == size:
        return mask
    out = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].round().long()


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Source:
    """One dataset on disk (or generated): every case id, a reader and its metadata.

    ``load(id)`` returns the image float32 (H, W) or (H, W, 3) in [0, 1] and the mask int64
    (H', W') of class ids, both at their native size (a mask may have another resolution with
    the same aspect ratio; it is resized to ``image_size`` by nearest neighbour).
    """

    ids: list[str]
    load: Loader
    class_names: tuple[str, ...]
    image_size: Size
    files: CaseFiles = field(default_factory=dict)  # empty for a generated dataset (phantom)


class SegmentationDataset(Dataset):
    """``(image float32 (C, H, W) in [0, 1], mask int64 (H, W))`` items of one split.

    Items are read on first access, resized to ``image_size`` (image bilinear + antialias, mask
    nearest) and cached in memory; grayscale images are cached with one channel and replicated
    to ``channels`` on access, RGB images with ``channels=1`` become the mean of R, G and B.
    """

    def __init__(self, name: str, ids: Sequence[str], load: Loader, class_names: Sequence[str],
                 image_size: Size, channels: int = 3, split: str = "all",
                 files: Mapping[str, list[Path]] | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.name = name
        self.split = split
        self.ids = list(ids)
        self.class_names = tuple(class_names)
        self.image_size = as_size(image_size)
        self.channels = channels
        self._load = load
        self.files: CaseFiles = {case: list(files[case]) for case in self.ids} if files else {}
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        if index not in self._cache:
            self._cache[index] = self._prepare(self.ids[index])
        image, mask = self._cache[index]
        if image.shape[0] != self.channels:
            return image.repeat(self.channels, 1, 1), mask.clone()
        return image.clone(), mask.clone()

    def _prepare(self, case_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one case; image (1 or ``channels``, H, W), mask (H, W), both at ``image_size``."""
        image, mask = self._load(case_id)
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        if tensor.shape[0] == 3 and self.channels == 1:
            tensor = tensor.mean(dim=0, keepdim=True)
        labels = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        return (resize_image(tensor, self.image_size).contiguous(),
                resize_mask(labels, self.image_size))

    def __repr__(self) -> str:
        return (f"SegmentationDataset(name={self.name!r}, split={self.split!r}, items={len(self)}, "
                f"image_size={self.image_size}, channels={self.channels}, "
                f"class_names={self.class_names})")


# --------------------------------------------------------------------------- digests (keys of results and caches)

def dataset_digest(dataset: SegmentationDataset) -> str:
    """sha256 (hex) of the data a split reads: its case ids, in order, and the bytes of each case's files,
    named by their path relative to the dataset's files' common folder (a moved root keeps the digest).

    A generated dataset (no files: phantom) is digested by its ids; its seed and size belong in the
    caller's key. A file-based dataset with a case whose files cannot be found raises ValueError.
    """
    files = {case: dataset.files.get(case, []) for case in dataset.ids}
    every = [path for paths in files.values() for path in paths]
    missing = [case for case, paths in files.items() if not paths]
    if every and missing:
        raise ValueError(f"{dataset.name}: cannot tell which files case {missing[0]!r} is read from, so its "
                         f"data cannot be digested")
    common = Path(os.path.commonpath([os.path.abspath(path) for path in every])) if every else None
    if common is not None and len(every) == 1:
        common = common.parent
    cases = [[case, [[Path(os.path.abspath(path)).relative_to(common).as_posix(), file_digest(path)]
                     for path in files[case]]] for case in dataset.ids]
    text = json.dumps({"dataset": dataset.name, "cases": cases}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
