"""Users' own data: ``<root>/images/`` + ``<root>/masks/`` with matching file stems.

Files may be png, jpg, jpeg, tif, tiff, bmp, DICOM (.dcm) or 2D NIfTI (.nii, .nii.gz; masks too),
read with the default mapping to [0, 1] of :mod:`medcert_core.data.medical` (MONOCHROME1 inverted;
16-bit at full depth). The mask encoding is decided once per dataset
from the first :data:`PROBE_MASKS` masks (sorted by stem):

- JPEG masks, or stored values within {0, 255}: binary, binarized at 128 (JPEG noise tolerated);
- all values < 64: label-valued, class id = stored value, K = max + 1 classes
  (or ``len(class_names)`` when given); a later mask with a value >= K is an error;
- otherwise: binary, binarized at 128.

Default class names: ("background", "foreground") for binary masks, ("background", "class_1",
..., "class_{K-1}") for label masks. Grayscale images are replicated to ``channels`` (default 3),
RGB images are kept. The default image size is the native size of the first image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medcert_core.data.base import (
    IMAGE_EXTENSIONS,
    LabelFn,
    Size,
    Source,
    binary_labels,
    files_per_case,
    index_files,
    match_masks,
    paired_loader,
    require_cases,
    require_dir,
)
from medcert_core.data.medical import (
    MEDICAL_SUFFIXES,
    NIFTI_SUFFIXES,
    read_medical_or_image,
    read_medical_or_mask,
)

FOLDER_IMAGE_SUFFIXES = IMAGE_EXTENSIONS + MEDICAL_SUFFIXES
FOLDER_MASK_SUFFIXES = IMAGE_EXTENSIONS + NIFTI_SUFFIXES
PROBE_MASKS = 8
MAX_LABELS = 64
JPEG_EXTENSIONS = (".jpg", ".jpeg")

FOLDER_LAYOUT = """\
<root>/
  images/<ID>.png                (or .jpg .jpeg .tif .tiff .bmp .dcm .nii .nii.gz)
  masks/<ID>.png                 (same stem; binary 0/255 or class ids 0..K-1; or .tif .nii .nii.gz)
"""


def infer_num_labels(mask_paths: Sequence[Path]) -> int | None:
    """None for binary masks, else the number K of classes of label-valued masks (module doc)."""
    if any(path.suffix.lower() in JPEG_EXTENSIONS for path in mask_paths):
        return None
    values = np.unique(np.concatenate([np.unique(read_medical_or_mask(path)) for path in mask_paths]))
    if set(values.tolist()) <= {0, 255} or values.max() >= MAX_LABELS:
        return None
    return int(values.max()) + 1


def label_values(num_classes: int) -> LabelFn:
    """Mask -> labels function that keeps stored values and rejects any value >= ``num_classes``."""

    def to_labels(mask: np.ndarray, path: Path) -> np.ndarray:
        if mask.min() < 0 or mask.max() >= num_classes:
            raise ValueError(
                f"mask {path} holds values {np.unique(mask).tolist()} outside 0..{num_classes - 1} "
                f"(number of classes inferred from the first masks; pass class_names to set it)"
            )
        return mask

    return to_labels


def folder_source(root: str | Path | None, image_size: Size | None, *,
                  class_names: Sequence[str] | None = None) -> Source:
    """Images and masks with matching stems; see the module docstring for the mask rules."""
    root = require_dir(root, "folder", FOLDER_LAYOUT)
    image_dir = require_dir(root / "images", "folder", FOLDER_LAYOUT)
    mask_dir = require_dir(root / "masks", "folder", FOLDER_LAYOUT)
    images = index_files(image_dir, FOLDER_IMAGE_SUFFIXES)
    masks = match_masks(images, index_files(mask_dir, FOLDER_MASK_SUFFIXES), mask_dir)
    ids = require_cases(sorted(images), "folder", image_dir, FOLDER_LAYOUT)
    num_labels = infer_num_labels([masks[i] for i in ids[:PROBE_MASKS]])
    if num_labels is None:
        names = tuple(class_names or ("background", "foreground"))
        if len(names) != 2:
            raise ValueError(
                f"folder: masks are binary but class_names has {len(names)} names: {names}")
        to_labels = binary_labels
    else:
        names = tuple(class_names or ["background"] + [f"class_{k}" for k in range(1, num_labels)])
        if len(names) < num_labels:
            raise ValueError(f"folder: masks hold class ids up to {num_labels - 1} but class_names "
                             f"has only {len(names)} names: {names}")
        to_labels = label_values(len(names))
    size = image_size or tuple(read_medical_or_image(images[ids[0]]).shape[:2])
    loader = paired_loader(images, masks, read_medical_or_image, to_labels, read_medical_or_mask)
    return Source(ids, loader, names, size, files_per_case(images, masks))
