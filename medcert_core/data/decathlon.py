"""Medical Segmentation Decathlon tasks: 3D NIfTI volumes with labels, as (1, D, H, W) volumes in [0, 1].

Any task in the Decathlon's own layout (:data:`DECATHLON_LAYOUT`) is read: the cases are the
``training`` entries of its ``dataset.json`` (the test cases have no labels), the class names its
``labels``. Volumes are read by :func:`medcert_core.data.medical.read_nifti_volume` (the pixel budget
checked on the header first), axes as stored (D, H, W = array axes 0, 1, 2), one channel.

Intensity: one affine map and clip for the whole dataset, ``clip((v - low) / (high - low), 0, 1)``,
never depending on the volume mapped, so a certified radius in [0, 1] units is ``(high - low)`` times
a radius in the file's own values. By default ``low`` and ``high`` are the
:data:`WINDOW_PERCENTILES` of every voxel of the training split's volumes (split by case with
:func:`medcert_core.data.base.split_ids` and the dataset's seed), computed once and recorded in
``dataset.intensity``; every split uses the training split's window. A given window (``window=(low,
high)``) is used as is.

Padding: every volume is padded at the end of each axis (image 0, label background 0) to one shape,
``image_size`` (D, H, W) or the largest extent of each axis over all the task's cases; the original
shape of each case is kept (``dataset.shapes``) and ``dataset.real_voxels(i)`` is the (D, H, W) mask of
its own voxels, for scoring real voxels only (``metrics.segmentation_scores(..., valid=...)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medcert_core.data.base import CaseFiles, file_stem, layout_error, require_dir, split_ids
from medcert_core.data.medical import open_nifti, read_nifti_labels, read_nifti_volume, scale_to_unit

DECATHLON_LAYOUT = """\
<root>/
  dataset.json            {"labels": {"0": "background", "1": ..., ...},
                           "training": [{"image": "./imagesTr/<case>.nii.gz",
                                         "label": "./labelsTr/<case>.nii.gz"}, ...]}
  imagesTr/<case>.nii.gz  3D volume (D, H, W), one channel
  labelsTr/<case>.nii.gz  label volume of the same shape, class ids 0..K-1
"""
WINDOW_PERCENTILES = (0.5, 99.5)  # the default window: these percentiles of the training split's voxels
Shape = tuple[int, int, int]


@dataclass(frozen=True)
class DecathlonTask:
    """One Decathlon task on disk: case id -> image and label files, the class names of dataset.json."""

    root: Path
    images: dict[str, Path]
    labels: dict[str, Path]
    class_names: tuple[str, ...]

    @property
    def ids(self) -> list[str]:
        return sorted(self.images)


def _inside(root: Path, entry: Any, folder: str, dataset: str) -> Path:
    """The file a dataset.json entry names, which must lie in ``root/folder``; else a layout error."""
    if not isinstance(entry, str):
        raise ValueError(f"{dataset}: {root / 'dataset.json'}: a training entry's path must be a string, got "
                         f"{entry!r}\nExpected layout:\n{DECATHLON_LAYOUT}")
    path = (root / entry).resolve()
    if path.parent != (root / folder).resolve():
        raise ValueError(f"{dataset}: {root / 'dataset.json'} names {entry!r}, which is not a file in {folder}/"
                         f"\nExpected layout:\n{DECATHLON_LAYOUT}")
    if not path.is_file():
        raise layout_error(dataset, path, DECATHLON_LAYOUT, what=f"file named in dataset.json ({folder})")
    return path


def _class_names(labels: Any, description: Path, dataset: str) -> tuple[str, ...]:
    """dataset.json's ``labels`` {"0": name, ...} -> names in id order (ids 0..K-1, K >= 2), lower case."""
    try:
        names = {int(key): str(value).lower() for key, value in labels.items()}
    except (AttributeError, ValueError) as error:
        raise ValueError(f"{dataset}: {description}: 'labels' must map class ids to names, got {labels!r}"
                         f"\nExpected layout:\n{DECATHLON_LAYOUT}") from error
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise ValueError(f"{dataset}: {description}: 'labels' must name the classes 0..K-1 (K >= 2), got ids "
                         f"{sorted(names)}\nExpected layout:\n{DECATHLON_LAYOUT}")
    return tuple(names[index] for index in range(len(names)))


def read_decathlon(root: str | Path | None, dataset: str = "decathlon") -> DecathlonTask:
    """The cases and classes of a Decathlon task folder; errors name the missing or bad part and show
    :data:`DECATHLON_LAYOUT`."""
    root = require_dir(root, dataset, DECATHLON_LAYOUT)
    for folder in ("imagesTr", "labelsTr"):
        require_dir(root / folder, dataset, DECATHLON_LAYOUT)
    description = root / "dataset.json"
    if not description.is_file():
        raise layout_error(dataset, description, DECATHLON_LAYOUT, what="file")
    try:
        meta = json.loads(description.read_text())
        entries, labels = meta["training"], meta["labels"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{dataset}: {description} must be JSON with 'labels' and 'training' ({error!r})"
                         f"\nExpected layout:\n{DECATHLON_LAYOUT}") from error
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{dataset}: {description}: 'training' must be a non-empty list of "
                         f"{{'image': ..., 'label': ...}}\nExpected layout:\n{DECATHLON_LAYOUT}")
    images, masks = {}, {}
    for entry in entries:
        image = _inside(root, entry.get("image"), "imagesTr", dataset)
        case = file_stem(image)
        if case in images:
            raise ValueError(f"{dataset}: {description} lists case {case!r} twice")
        images[case], masks[case] = image, _inside(root, entry.get("label"), "labelsTr", dataset)
    return DecathlonTask(root, images, masks, _class_names(labels, description, dataset))


def volume_shape(path: Path) -> Shape:
    """A 3D NIfTI file's (D, H, W) from its header (pixel budget checked); ValueError when it is not 3D."""
    shape = open_nifti(path)[2]
    if len(shape) != 3:
        raise ValueError(f"NIfTI file {path} has shape {shape}: expected a 3D volume (D, H, W)")
    return shape


@dataclass(frozen=True)
class IntensityWindow:
    """The dataset's one intensity map: stored value v -> clip((v - low) / (high - low), 0, 1)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"an intensity window needs finite low < high, got ({self.low!r}, {self.high!r})")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """float32 values in [0, 1], the same map for every volume."""
        return scale_to_unit(np.asarray(values, dtype=np.float64), self.low, self.high).astype(np.float32)

    def record(self) -> dict[str, Any]:
        return {"formula": "clip((v - low) / (high - low), 0, 1)", "low": self.low, "high": self.high,
                "unit_per_value": 1 / (self.high - self.low), "image_dependent": False}


def percentile_window(paths: Sequence[Path], percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> IntensityWindow:
    """The window between two percentiles of every voxel of the volumes in ``paths`` (their own voxels only)."""
    values = np.concatenate([read_nifti_volume(path)[0].astype(np.float32).reshape(-1) for path in paths])
    low, high = np.percentile(values, percentiles)
    return IntensityWindow(float(low), float(high))


@lru_cache(maxsize=8)
def _training_window(paths: tuple[Path, ...], percentiles: tuple[float, float]) -> IntensityWindow:
    """:func:`percentile_window`, computed once per set of training files (every split of a dataset asks)."""
    return percentile_window(paths, percentiles)


def pad_to(array: np.ndarray, shape: Shape) -> np.ndarray:
    """(D, H, W) -> ``shape``, zeros appended at the end of each axis."""
    return np.pad(array, [(0, total - length) for length, total in zip(array.shape, shape)])


class VolumeDataset(Dataset):
    """``(image float32 (1, D, H, W) in [0, 1], mask int64 (D, H, W))`` items of one split of a volume dataset.

    Every volume is mapped by the dataset's one window (``.intensity`` records it and where it was chosen),
    padded to ``.image_size`` (D, H, W) at the end of each axis; ``.shapes`` holds each case's own shape and
    :meth:`real_voxels` its mask. Decoded volumes are cached in memory unpadded.
    """

    def __init__(self, name: str, ids: Sequence[str], task: DecathlonTask, window: IntensityWindow,
                 image_size: Shape, shapes: dict[str, Shape], split: str, intensity: dict[str, Any]) -> None:
        self.name = name
        self.split = split
        self.ids = list(ids)
        self.class_names = task.class_names
        self.image_size = image_size
        self.channels = 1
        self.window = window
        self.intensity = intensity
        self.shapes = {case: shapes[case] for case in self.ids}
        self.files: CaseFiles = {case: [task.images[case], task.labels[case]] for case in self.ids}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _case(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.ids[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self._case(index)
        if case not in self._cache:
            self._cache[case] = self._read(case)
        image, labels = self._cache[case]
        return (torch.from_numpy(pad_to(image, self.image_size))[None],
                torch.from_numpy(pad_to(labels, self.image_size).astype(np.int64)))

    def _read(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        """One case's mapped volume (float32) and labels (uint8), unpadded; shapes and class ids checked."""
        image_path, label_path = self.files[case]
        image = self.window.apply(read_nifti_volume(image_path)[0])
        labels = read_nifti_labels(label_path)
        if labels.shape != image.shape:
            raise ValueError(f"label shape {labels.shape} of {label_path} differs from image shape {image.shape} "
                             f"of {image_path}")
        if labels.max(initial=0) >= len(self.class_names):
            raise ValueError(f"label file {label_path} holds class id {int(labels.max())}; dataset.json names "
                             f"{len(self.class_names)} classes {self.class_names}")
        return image, labels.astype(np.uint8)

    def real_voxels(self, index: int) -> torch.Tensor:
        """bool (D, H, W): True on the item's own voxels, False on the padding."""
        mask = torch.zeros(self.image_size, dtype=torch.bool)
        mask[tuple(slice(0, length) for length in self.shapes[self._case(index)])] = True
        return mask

    def __repr__(self) -> str:
        return (f"VolumeDataset(name={self.name!r}, split={self.split!r}, items={len(self)}, "
                f"image_size={self.image_size}, class_names={self.class_names})")


def as_volume_size(image_size: Sequence[int]) -> Shape:
    """``image_size`` as (D, H, W) of positive ints; ValueError otherwise."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"image_size of a volume dataset must be (D, H, W) of positive ints, got {image_size!r}")
    return int(size[0]), int(size[1]), int(size[2])


def load_decathlon(name: str, root: str | Path | None, split: str, *, image_size: Sequence[int] | None = None,
                   seed: int = 0, split_block: int = 0, window: tuple[float, float] | None = None,
                   percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> VolumeDataset:
    """One split of a Decathlon task (cases split by :func:`split_ids` with ``seed``), see the module doc.

    image_size: the common (D, H, W) (default: the largest extent of each axis over every case);
    window: a given (low, high) intensity window; default the ``percentiles`` of the training split's voxels.
    """
    task = read_decathlon(root, name)
    shapes = {case: volume_shape(task.images[case]) for case in task.ids}
    size = as_volume_size(image_size) if image_size is not None else tuple(
        int(max(shape[axis] for shape in shapes.values())) for axis in range(3))
    too_large = [case for case, shape in shapes.items() if any(s > t for s, t in zip(shape, size))]
    if too_large:
        raise ValueError(f"{name}: case {too_large[0]!r} has shape {shapes[too_large[0]]}, larger than image_size "
                         f"{size} ({len(too_large)} such cases); volumes are padded, never cropped")
    if window is not None:
        chosen = IntensityWindow(*map(float, window))
        intensity = chosen.record() | {"chosen_on": "given"}
    else:
        train = split_ids(task.ids, "train", seed, split_block)
        chosen = _training_window(tuple(task.images[case] for case in train), tuple(percentiles))
        intensity = chosen.record() | {"chosen_on": {"split": "train", "seed": seed, "cases": len(train),
                                                     "percentiles": list(percentiles)}}
    ids = split_ids(task.ids, split, seed, split_block)
    if not ids:
        raise ValueError(f"{name}: split {split!r} of {len(task.ids)} cases is empty")
    return VolumeDataset(name, ids, task, chosen, size, shapes, split, intensity)
