"""Segmentation datasets: ``load_dataset(name, root, split)`` -> (image, mask) torch Dataset.

Items are ``(image float32 (C, H, W) in [0, 1], mask int64 (H, W))``. Splits are a
deterministic 70 / 10 / 20 train / val / test shuffle of the sorted case ids by ``seed``.
X-ray datasets are 3 channels (grayscale replicated) by default, as the paper reads them; the
certified radius depends on this input space, so ``channels=1`` is a different experiment.

Layouts and class conventions: :mod:`.chest` (jsrt, montgomery, shenzhen), :mod:`.rgb`
(isic2018, isic2017, cvc_clinicdb), :mod:`.folder` (users' own data), :mod:`.phantom` (embedded default).

Volumes: "hippocampus" (the Decathlon's Task04, :mod:`.decathlon`, any task of that layout) gives
``(image float32 (1, D, H, W) in [0, 1], mask int64 (D, H, W))``, split by case the same way, every
volume mapped by its intensity group's window (groups chosen on the training split) and padded to one shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from medcert_core.data.base import SPLITS, SegmentationDataset, Size, Source, as_size, split_ids
from medcert_core.data.decathlon import VolumeDataset, load_decathlon
from medcert_core.data.chest import (
    jsrt_source,
    montgomery_source,
    read_jsrt_img,
    read_scr_gif,
    shenzhen_source,
)
from medcert_core.data.folder import folder_source
from medcert_core.data.phantom import chest_phantom, lesion_phantom, phantom_source
from medcert_core.data.rgb import cvc_clinicdb_source, isic2017_source, isic2018_source

_SOURCES: dict[str, Callable[..., Source]] = {
    "jsrt": jsrt_source,
    "montgomery": montgomery_source,
    "shenzhen": shenzhen_source,
    "isic2018": isic2018_source,
    "isic2017": isic2017_source,
    "cvc_clinicdb": cvc_clinicdb_source,
    "folder": folder_source,
    "phantom": phantom_source,
}
_VOLUME_DATASETS = ("hippocampus",)  # Decathlon tasks: load_decathlon
DATASET_NAMES = (*_SOURCES, *_VOLUME_DATASETS)
IMAGE_DATASET_NAMES = tuple(_SOURCES)  # the 2D sets: what the study's chapters and 2D training take

# The paper's input sizes (H, W); isic2017 (not in the paper) the native size of the shared copy's
# files; "folder" uses the native size of its first image.
_DEFAULT_SIZES: dict[str, Size | None] = {
    "jsrt": (512, 512),
    "montgomery": (512, 512),
    "shenzhen": (512, 512),
    "isic2018": (384, 512),
    "isic2017": (256, 256),
    "cvc_clinicdb": (288, 384),
    "folder": None,
    "phantom": (128, 128),
    "hippocampus": None,  # (D, H, W): the largest extent of each axis over the dataset's volumes
}


def _check_name(name: str) -> None:
    """Raise ValueError listing the valid names if ``name`` is not a dataset."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def default_image_size(name: str) -> Size | None:
    """Default (H, W) of dataset ``name``; None for "folder" (native size of its first image) and for volumes
    (padded to the largest extent of each axis)."""
    _check_name(name)
    return _DEFAULT_SIZES[name]


def load_dataset(name: str, root: str | Path | None, split: str, *,
                 image_size: int | Sequence[int] | None = None, seed: int = 0,
                 channels: int | None = None, split_block: int = 0,
                 **options: Any) -> SegmentationDataset | VolumeDataset:
    """One split of dataset ``name`` read from ``root``.

    Args:
        name: one of :data:`DATASET_NAMES`.
        root: the dataset folder (ignored by "phantom").
        split: "train", "val", "test" or "all".
        image_size: output (H, W) or an int for a square; default :func:`default_image_size`; for a
            volume dataset the padded (D, H, W).
        seed: seed of the split shuffle (and, for "phantom", of the generated images).
        channels: 1 or 3 (default 3: grayscale replicated; RGB with 1 -> mean of R, G, B).
        split_block: 0 (a random split per case) or k: runs of k consecutive ids stay in one split
            (:func:`split_ids`; video frames, CVC-ClinicDB).
        options: dataset-specific: jsrt ``layout`` ("auto", "png", "original"); montgomery and
            shenzhen ``layout`` ("auto", "merged", "original"); folder
            ``class_names``; phantom ``variant`` ("chest", "lesion") and ``num_images``; volume
            datasets ``window`` (a given (low, high) intensity window) and ``percentiles``.

    Returns:
        a :class:`SegmentationDataset` with ``.class_names``, ``.ids``, ``.name``, ``.split``,
        ``.image_size`` and ``.channels``.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if name in _VOLUME_DATASETS:
        if channels not in (None, 1):
            raise ValueError(f"{name} volumes have one channel, got channels={channels!r}")
        return load_decathlon(name, root, split, image_size=image_size, seed=seed, split_block=split_block,
                              **options)
    channels = 3 if channels is None else channels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    size = as_size(image_size) if image_size is not None else _DEFAULT_SIZES[name]
    if name == "phantom":
        options = {"seed": seed, **options}
    source = _SOURCES[name](root, size, **options)
    ids = split_ids(source.ids, split, seed, split_block)
    if not ids:
        raise ValueError(f"{name}: split {split!r} of {len(source.ids)} cases is empty")
    return SegmentationDataset(name, ids, source.load, source.class_names, source.image_size,
                               channels, split, source.files)


__all__ = [
    "DATASET_NAMES",
    "IMAGE_DATASET_NAMES",
    "SPLITS",
    "SegmentationDataset",
    "VolumeDataset",
    "chest_phantom",
    "default_image_size",
    "lesion_phantom",
    "load_dataset",
    "read_jsrt_img",
    "read_scr_gif",
    "split_ids",
]
