"""Medical Segmentation Decathlon tasks: 3D NIfTI volumes with labels, as (1, D, H, W) volumes in [0, 1].

Any task in the Decathlon's own layout (:data:`DECATHLON_LAYOUT`) is read: the cases are the
``training`` entries of its ``dataset.json`` (the test cases have no labels), the class names its
``labels``. Volumes are read by :func:`medcert_core.data.medical.read_nifti_volume` (the pixel budget
checked on the header first), axes as stored (D, H, W = array axes 0, 1, 2), one channel.

Intensity: an affine map and clip per *intensity group*, ``clip((v - low) / (high - low), 0, 1)``, chosen on
the training split and never on the volume mapped. One window cannot serve every task: Task04's volumes
come in three populations (uint8 files with medians near 60, float32 files near 500 and float32 files
near 200,000), and one window over all of them leaves most volumes near black. So the training
volumes are grouped by storage dtype and then by their median, a new group starting where the sorted
medians jump by more than :data:`GROUP_GAP` times (:func:`choose_intensity_map`); each group's window
is the :data:`WINDOW_PERCENTILES` of its training voxels, and a volume is mapped by the group of its
dtype whose median range (edges halfway, geometrically, between neighbouring groups) holds its own
median. The map is therefore fixed per group, not per volume, and a certificate carries over to the
file's own values (:func:`radius_in_file_values`): the window is (1 / (high - low))-Lipschitz, and a
volume's median moves by at most the L-infinity, hence the L2, norm of a perturbation, so no
perturbation smaller than the distance from the median to its group's edges (``margin``) changes the
group: radius on the file = min(R (high - low), margin). A given window (``window=(low, high)``) is one
group for every volume (margin infinite). ``dataset.intensity`` records the groups and where they were
chosen, ``dataset.volume_intensity(i)`` one volume's group, median and margin.

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
WINDOW_PERCENTILES = (0.5, 99.5)  # a group's window: these percentiles of its training volumes' voxels
GROUP_GAP = 10.0  # a jump by this factor between sorted training medians starts a new intensity group
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
    """One affine map and clip: stored value v -> clip((v - low) / (high - low), 0, 1)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"an intensity window needs finite low < high, got ({self.low!r}, {self.high!r})")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """float32 values in [0, 1]."""
        return scale_to_unit(np.asarray(values, dtype=np.float64), self.low, self.high).astype(np.float32)

    def record(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "unit_per_value": 1 / (self.high - self.low)}


ANY_DTYPE = "any"  # the dtype of a group that serves every storage dtype (a given window)


@dataclass(frozen=True)
class IntensityGroup:
    """The window of the volumes stored as ``dtype`` whose median lies in [median_from, median_to)."""

    dtype: str
    median_from: float
    median_to: float
    window: IntensityWindow
    training_volumes: int = 0

    def holds(self, dtype: str, median: float) -> bool:
        return self.dtype in (ANY_DTYPE, dtype) and self.median_from <= median < self.median_to

    def margin(self, median: float) -> float:
        """Distance from ``median`` to the nearest finite edge of the group (inf when it has none)."""
        return float(min(median - self.median_from, self.median_to - median))

    def record(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "median_from": finite_or_none(self.median_from),
                "median_to": finite_or_none(self.median_to),
                **self.window.record(), "training_volumes": self.training_volumes}


@dataclass(frozen=True)
class IntensityMap:
    """A dataset's intensity groups; a volume is mapped by the one that holds its dtype and median."""

    groups: tuple[IntensityGroup, ...]

    def group_of(self, dtype: str, median: float) -> int:
        """Index of the group for a volume stored as ``dtype`` with this median; ValueError when none is."""
        for index, group in enumerate(self.groups):
            if group.holds(dtype, median):
                return index
        served = sorted({group.dtype for group in self.groups})
        raise ValueError(f"no intensity group for a volume stored as {dtype} (median {median:g}): the training "
                         f"split has volumes stored as {', '.join(served)}; give window=(low, high) to map every "
                         "volume with one window")

    def map_volume(self, values: np.ndarray, dtype: str) -> tuple[np.ndarray, dict[str, Any]]:
        """(D, H, W) stored values -> float32 in [0, 1] and the record of the group that mapped them."""
        median = float(np.median(values))
        index = self.group_of(dtype, median)
        group = self.groups[index]
        return group.window.apply(values), {"group": index, "stored_dtype": dtype, "median": median,
                                            "margin": finite_or_none(group.margin(median)), **group.window.record()}

    def record(self) -> dict[str, Any]:
        return {"formula": "clip((v - low) / (high - low), 0, 1), low and high of the volume's group",
                "image_dependent": False, "groups": [group.record() for group in self.groups],
                "radius_on_the_file": "min(R * (high - low), margin): margin is the distance from the volume's "
                                      "median to its group's edges"}


def radius_in_file_values(radius: float, volume: dict[str, Any]) -> float:
    """A certified L2 radius in [0, 1] units -> one in the file's own values, for the volume whose
    :meth:`IntensityMap.map_volume` record is ``volume``: min(R (high - low), margin) (module doc; a margin
    of None is infinite)."""
    margin = np.inf if volume["margin"] is None else volume["margin"]
    return float(min(radius * (volume["high"] - volume["low"]), margin))


def finite_or_none(value: float) -> float | None:
    """``value``, or None for an infinite one (JSON has no infinity)."""
    return float(value) if np.isfinite(value) else None


def given_intensity_map(low: float, high: float) -> IntensityMap:
    """One window for every volume, whatever its dtype and median."""
    return IntensityMap((IntensityGroup(ANY_DTYPE, -np.inf, np.inf, IntensityWindow(float(low), float(high))),))


def median_groups(medians: Sequence[float], gap: float) -> list[list[int]]:
    """Indices of ``medians`` in groups: sorted by median, a new group where the next median exceeds
    ``gap`` times the previous (a positive) one."""
    order = sorted(range(len(medians)), key=lambda index: medians[index])
    groups = [[order[0]]]
    for previous, index in zip(order, order[1:]):
        if medians[previous] > 0 and medians[index] > gap * medians[previous]:
            groups.append([])
        groups[-1].append(index)
    return groups


def choose_intensity_map(volumes: Sequence[tuple[np.ndarray, str]], percentiles: tuple[float, float] = WINDOW_PERCENTILES,
                         gap: float = GROUP_GAP) -> IntensityMap:
    """The intensity groups of training ``volumes`` ((D, H, W) stored values, storage dtype): by dtype,
    then by :func:`median_groups`; each group's window the ``percentiles`` of its volumes' voxels, its median
    range from the geometric midpoints to the neighbouring groups (the outer edges infinite)."""
    groups: list[IntensityGroup] = []
    for dtype in sorted({dtype for _, dtype in volumes}):
        arrays = [values for values, stored in volumes if stored == dtype]
        medians = [float(np.median(values)) for values in arrays]
        parts = median_groups(medians, gap)
        edges = [-np.inf] + [float(np.sqrt(max(medians[i] for i in low) * min(medians[i] for i in high)))
                             for low, high in zip(parts, parts[1:])] + [np.inf]
        for part, median_from, median_to in zip(parts, edges, edges[1:]):
            voxels = np.concatenate([arrays[index].astype(np.float32).reshape(-1) for index in part])
            low, high = np.percentile(voxels, percentiles)
            groups.append(IntensityGroup(dtype, median_from, median_to, IntensityWindow(float(low), float(high)),
                                         len(part)))
    return IntensityMap(tuple(groups))


def stored_volume(path: Path) -> tuple[np.ndarray, str]:
    """A NIfTI volume's (D, H, W) values and its storage dtype (the key of its intensity group)."""
    values, record = read_nifti_volume(path)
    return values, str(record["stored_dtype"])


@lru_cache(maxsize=8)
def _training_map(paths: tuple[Path, ...], percentiles: tuple[float, float]) -> IntensityMap:
    """:func:`choose_intensity_map` of these training files, computed once (every split of a dataset asks)."""
    return choose_intensity_map([stored_volume(path) for path in paths], percentiles)


def pad_to(array: np.ndarray, shape: Shape) -> np.ndarray:
    """(D, H, W) -> ``shape``, zeros appended at the end of each axis."""
    return np.pad(array, [(0, total - length) for length, total in zip(array.shape, shape)])


class VolumeDataset(Dataset):
    """``(image float32 (1, D, H, W) in [0, 1], mask int64 (D, H, W))`` items of one split of a volume dataset.

    Every volume is mapped by its group of the dataset's intensity map (``.intensity`` records the groups and
    where they were chosen, :meth:`volume_intensity` one volume's group and margin), padded to ``.image_size``
    (D, H, W) at the end of each axis; ``.shapes`` holds each case's own shape and :meth:`real_voxels` its
    mask. Decoded volumes are cached in memory unpadded.
    """

    def __init__(self, name: str, ids: Sequence[str], task: DecathlonTask, intensity_map: IntensityMap,
                 image_size: Shape, shapes: dict[str, Shape], split: str, intensity: dict[str, Any]) -> None:
        self.name = name
        self.split = split
        self.ids = list(ids)
        self.class_names = task.class_names
        self.image_size = image_size
        self.channels = 1
        self.intensity_map = intensity_map
        self.intensity = intensity
        self.shapes = {case: shapes[case] for case in self.ids}
        self.files: CaseFiles = {case: [task.images[case], task.labels[case]] for case in self.ids}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _case(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.ids[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels, _ = self._decoded(self._case(index))
        return (torch.from_numpy(pad_to(image, self.image_size))[None],
                torch.from_numpy(pad_to(labels, self.image_size).astype(np.int64)))

    def _decoded(self, case: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if case not in self._cache:
            self._cache[case] = self._read(case)
        return self._cache[case]

    def volume_intensity(self, index: int) -> dict[str, Any]:
        """How item ``index`` was mapped: its group, window, median and margin (:func:`radius_in_file_values`)."""
        return dict(self._decoded(self._case(index))[2])

    def _read(self, case: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One case's mapped volume (float32), labels (uint8), unpadded, and its intensity record; shapes and
        class ids checked."""
        image_path, label_path = self.files[case]
        try:
            image, mapping = self.intensity_map.map_volume(*stored_volume(image_path))
        except ValueError as error:
            raise ValueError(f"{image_path}: {error}") from error
        labels = read_nifti_labels(label_path)
        if labels.shape != image.shape:
            raise ValueError(f"label shape {labels.shape} of {label_path} differs from image shape {image.shape} "
                             f"of {image_path}")
        if labels.max(initial=0) >= len(self.class_names):
            raise ValueError(f"label file {label_path} holds class id {int(labels.max())}; dataset.json names "
                             f"{len(self.class_names)} classes {self.class_names}")
        return image, labels.astype(np.uint8), mapping

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
    window: a given (low, high) intensity window for every volume; default the intensity groups of the
    training split (:func:`choose_intensity_map`, each window the ``percentiles`` of its group's voxels).
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
        chosen = given_intensity_map(*map(float, window))
        intensity = chosen.record() | {"chosen_on": "given"}
    else:
        train = split_ids(task.ids, "train", seed, split_block)
        chosen = _training_map(tuple(task.images[case] for case in train), tuple(percentiles))
        intensity = chosen.record() | {"chosen_on": {"split": "train", "seed": seed, "cases": len(train),
                                                     "percentiles": list(percentiles), "group_gap": GROUP_GAP}}
    ids = split_ids(task.ids, split, seed, split_block)
    if not ids:
        raise ValueError(f"{name}: split {split!r} of {len(task.ids)} cases is empty")
    return VolumeDataset(name, ids, task, chosen, size, shapes, split, intensity)
