"""RGB datasets: ISIC 2018 (task 1) and ISIC 2017 (part 1), skin lesions; CVC-ClinicDB (colonoscopy polyps).

Images keep their 3 colour channels; with ``channels=1`` the dataset uses the plain mean of
R, G and B (not a weighted luminance). Masks are binary (0/255, binarized at 128).

ISIC 2017 pools its training (2,000) and validation (150) folders into one set of cases, split like
every dataset; its test masks are not part of the layout. Only ``<ID>.jpg`` files are images, so the
official release's ``<ID>_superpixels.png`` and metadata CSV files beside them are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medcert_core.data.base import (
    Size,
    Source,
    binary_labels,
    files_per_case,
    index_files,
    match_masks,
    paired_loader,
    read_image,
    require_cases,
    require_dir,
    require_file,
)

ISIC_INPUT = "ISIC2018_Task1-2_Training_Input"
ISIC_TRUTH = "ISIC2018_Task1_Training_GroundTruth"
ISIC2017_PARTS = (  # (images, ground truth) folders, pooled in this order
    ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
    ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
)
LESION_CLASSES = ("background", "lesion")
CVC_IMAGES = "Original"
CVC_MASKS = "Ground Truth"
CVC_EXTENSIONS = (".tif", ".tiff", ".png")

ISIC_LAYOUT = f"""\
<root>/
  {ISIC_INPUT}/<ID>.jpg
  {ISIC_TRUTH}/<ID>_segmentation.png
"""
ISIC2017_LAYOUT = f"""\
<root>/
  {ISIC2017_PARTS[0][0]}/<ID>.jpg           (other files, e.g. <ID>_superpixels.png, are ignored)
  {ISIC2017_PARTS[0][1]}/<ID>_segmentation.png
  {ISIC2017_PARTS[1][0]}/<ID>.jpg
  {ISIC2017_PARTS[1][1]}/<ID>_segmentation.png
(training and validation are pooled into one set of cases)
"""
CVC_LAYOUT = f"""\
<root>/
  {CVC_IMAGES}/<ID>.tif          (or .png)
  {CVC_MASKS}/<ID>.tif      (or .png; same stems)
"""


def _isic_part(root: Path, dataset: str, image_folder: str, truth_folder: str,
               layout: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """The ``<ID>.jpg`` images of ``root/image_folder`` and their ``<ID>_segmentation.png`` masks in
    ``root/truth_folder``; a missing folder or mask raises naming it."""
    image_dir = require_dir(root / image_folder, dataset, layout)
    mask_dir = require_dir(root / truth_folder, dataset, layout)
    images = index_files(image_dir, (".jpg",))
    masks = {s: require_file(mask_dir / f"{s}_segmentation.png", p) for s, p in images.items()}
    return images, masks


def _pool_parts(parts: Sequence[tuple[dict[str, Path], dict[str, Path]]]) -> tuple[dict[str, Path], dict[str, Path]]:
    """The (images, masks) of several parts as one; an id in two parts raises ValueError naming both files."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for part_images, part_masks in parts:
        for stem, path in part_images.items():
            if stem in images:
                raise ValueError(f"two files with the same stem: {images[stem]} and {path}")
            images[stem], masks[stem] = path, part_masks[stem]
    return images, masks


def _binary_source(dataset: str, folder: Path, images: dict[str, Path], masks: dict[str, Path],
                   layout: str, image_size: Size, class_names: tuple[str, str]) -> Source:
    """Source of RGB images with one binary mask each; no image raises :func:`require_cases` naming ``folder``."""
    ids = require_cases(sorted(images), dataset, folder, layout)
    return Source(ids, paired_loader(images, masks, read_image, binary_labels),
                  class_names, image_size, files_per_case(images, masks))


def isic2018_source(root: str | Path | None, image_size: Size) -> Source:
    """ISIC 2018 task 1 training set; classes background, lesion."""
    root = require_dir(root, "isic2018", ISIC_LAYOUT)
    images, masks = _isic_part(root, "isic2018", ISIC_INPUT, ISIC_TRUTH, ISIC_LAYOUT)
    return _binary_source("isic2018", root / ISIC_INPUT, images, masks, ISIC_LAYOUT, image_size, LESION_CLASSES)


def isic2017_source(root: str | Path | None, image_size: Size) -> Source:
    """ISIC 2017 part 1, training and validation folders pooled (module docstring); classes background, lesion."""
    root = require_dir(root, "isic2017", ISIC2017_LAYOUT)
    parts = [_isic_part(root, "isic2017", images, truth, ISIC2017_LAYOUT) for images, truth in ISIC2017_PARTS]
    images, masks = _pool_parts(parts)
    return _binary_source("isic2017", root, images, masks, ISIC2017_LAYOUT, image_size, LESION_CLASSES)


def cvc_clinicdb_source(root: str | Path | None, image_size: Size) -> Source:
    """CVC-ClinicDB (TIFF or PNG); classes background, polyp."""
    root = require_dir(root, "cvc_clinicdb", CVC_LAYOUT)
    image_dir = require_dir(root / CVC_IMAGES, "cvc_clinicdb", CVC_LAYOUT)
    mask_dir = require_dir(root / CVC_MASKS, "cvc_clinicdb", CVC_LAYOUT)
    images = index_files(image_dir, CVC_EXTENSIONS)
    masks = match_masks(images, index_files(mask_dir, CVC_EXTENSIONS), mask_dir)
    return _binary_source("cvc_clinicdb", image_dir, images, masks, CVC_LAYOUT, image_size, ("background", "polyp"))
