"""RGB datasets: ISIC 2018 (task 1, skin lesions) and CVC-ClinicDB (colonoscopy polyps).

Images keep their 3 colour channels; with ``channels=1`` the dataset uses the plain mean of
R, G and B (not a weighted luminance). Masks are binary (0/255, binarized at 128).
"""

from __future__ import annotations

from pathlib import Path

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
CVC_IMAGES = "Original"
CVC_MASKS = "Ground Truth"
CVC_EXTENSIONS = (".tif", ".tiff", ".png")

ISIC_LAYOUT = f"""\
<root>/
  {ISIC_INPUT}/<ID>.jpg
  {ISIC_TRUTH}/<ID>_segmentation.png
"""
CVC_LAYOUT = f"""\
<root>/
  {CVC_IMAGES}/<ID>.tif          (or .png)
  {CVC_MASKS}/<ID>.tif      (or .png; same stems)
"""


def isic2018_source(root: str | Path | None, image_size: Size) -> Source:
    """ISIC 2018 task 1 training set; classes background, lesion."""
    root = require_dir(root, "isic2018", ISIC_LAYOUT)
    image_dir = require_dir(root / ISIC_INPUT, "isic2018", ISIC_LAYOUT)
    mask_dir = require_dir(root / ISIC_TRUTH, "isic2018", ISIC_LAYOUT)
    images = index_files(image_dir, (".jpg",))
    masks = {s: require_file(mask_dir / f"{s}_segmentation.png", p) for s, p in images.items()}
    ids = require_cases(sorted(images), "isic2018", image_dir, ISIC_LAYOUT)
    return Source(ids, paired_loader(images, masks, read_image, binary_labels),
                  ("background", "lesion"), image_size, files_per_case(images, masks))


def cvc_clinicdb_source(root: str | Path | None, image_size: Size) -> Source:
    """CVC-ClinicDB (TIFF or PNG); classes background, polyp."""
    root = require_dir(root, "cvc_clinicdb", CVC_LAYOUT)
    image_dir = require_dir(root / CVC_IMAGES, "cvc_clinicdb", CVC_LAYOUT)
    mask_dir = require_dir(root / CVC_MASKS, "cvc_clinicdb", CVC_LAYOUT)
    images = index_files(image_dir, CVC_EXTENSIONS)
    masks = match_masks(images, index_files(mask_dir, CVC_EXTENSIONS), mask_dir)
    ids = require_cases(sorted(images), "cvc_clinicdb", image_dir, CVC_LAYOUT)
    return Source(ids, paired_loader(images, masks, read_image, binary_labels),
                  ("background", "polyp"), image_size, files_per_case(images, masks))
