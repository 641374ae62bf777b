"""Chest X-ray datasets: JSRT (+ SCR organ masks), Montgomery and Shenzhen.

Images are read as grayscale in [0, 1] (RGB files are averaged) and replicated to 3 channels by
the dataset unless ``channels=1``.

JSRT overlap rule (one rule for every JSRT reader and for the chest phantom): the SCR organ
masks overlap (clavicles lie over the lungs, the heart over the medial lower lungs). Labels are
painted in this order, each later class overwriting the earlier ones:

    1 lung = left lung OR right lung,  then  2 heart,  then  3 clavicle = left OR right clavicle

so a clavicle pixel over the lung is "clavicle" and a heart pixel over the lung is "heart".

JSRT is read from either layout, detected automatically (``layout="auto"``; force one with
``layout="png"`` or ``layout="original"``):

- PNG layout: ``images/<ID>.png`` + ``masks/<organ>/<ID>.png`` (binary 0/255);
- original distribution: ``<ID>.IMG`` anywhere below root (2048 x 2048, 12-bit values in 16-bit
  big-endian words, higher = darker) and the SCR masks as 1024 x 1024 GIFs in per-organ folders
  (``heart``, ``left lung`` or ``left_lung``, ...) next to a ``heart`` folder anywhere below root
  (several such mask folders, e.g. SCR's fold1/fold2, are merged). The masks are painted at
  1024 x 1024 and resized to the image size by nearest neighbour.

Montgomery and Shenzhen (class lung = both lungs) are read from either layout, detected the same way
(``layout="auto"``: ``images/`` present -> merged, else ``CXR_png/`` -> original; force one with
``layout="merged"`` or ``layout="original"``):

- merged layout: ``images/<ID>.png`` + ``masks/<ID>.png``, one binary mask holding both lungs (the
  Kaggle "Chest Xray Masks and Labels" release, and the copies in ``../shared/data``);
- original distribution: Montgomery ``CXR_png/<ID>.png`` + ``ManualMask/leftMask/<ID>.png`` and
  ``ManualMask/rightMask/<ID>.png`` (lung = their union); Shenzhen ``CXR_png/<ID>.png`` +
  ``mask/<ID>_mask.png``.

A Montgomery image without its mask(s) is an error naming the missing file; Shenzhen images without
a mask are skipped with a warning, in either layout (96 of the 662 originals have none).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from medcert_core.data.base import (
    CaseFiles,
    Loader,
    Size,
    Source,
    files_per_case,
    binary_mask,
    check_same_shape,
    index_files,
    layout_error,
    paint_labels,
    read_gray,
    read_mask,
    require_cases,
    require_dir,
    require_file,
)

CHEST_CLASSES = ("background", "lung", "heart", "clavicle")
LUNG_CLASSES = ("background", "lung")
JSRT_ORGANS = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
JSRT_IMG_SHAPE = (2048, 2048)
JSRT_IMG_MAX = 4095

JSRT_LAYOUT = """\
<root>/                          PNG layout
  images/<ID>.png
  masks/left_lung/<ID>.png       (also right_lung/, heart/, left_clavicle/, right_clavicle/)
or the original distribution:
<root>/
  .../<ID>.IMG                   2048 x 2048, 16-bit big-endian, higher = darker
  .../<masks>/heart/<ID>.gif     SCR masks, 1024 x 1024 (also "left lung"/left_lung, "right lung",
                                 "left clavicle", "right clavicle")
"""
LUNG_LAYOUTS = ("merged", "original")
MERGED_LUNG_LAYOUT = """\
<root>/                          merged layout: one mask holding both lungs
  images/<ID>.png
  masks/<ID>.png                 binary 0/255, the image's size
"""
MONTGOMERY_LAYOUT = MERGED_LUNG_LAYOUT + """\
or the original distribution:
<root>/
  CXR_png/<ID>.png
  ManualMask/leftMask/<ID>.png
  ManualMask/rightMask/<ID>.png
"""
SHENZHEN_LAYOUT = MERGED_LUNG_LAYOUT + """\
or the original distribution:
<root>/
  CXR_png/<ID>.png
  mask/<ID>_mask.png
(in either layout, images without a mask are skipped)
"""


def chest_labels(lung: np.ndarray, heart: np.ndarray, clavicle: np.ndarray) -> np.ndarray:
    """Bool masks (H, W) -> int64 labels by the overlap rule: lung 1, heart 2, clavicle 3 on top."""
    return paint_labels([lung, heart, clavicle])


def jsrt_labels(organs: dict[str, np.ndarray]) -> np.ndarray:
    """The five SCR organ masks (bool (H, W), keys :data:`JSRT_ORGANS`) -> int64 labels (H, W)."""
    return chest_labels(
        organs["left_lung"] | organs["right_lung"],
        organs["heart"],
        organs["left_clavicle"] | organs["right_clavicle"],
    )


def read_jsrt_img(path: str | Path) -> np.ndarray:
    """Original JSRT ``.IMG`` file -> float32 (2048, 2048) in [0, 1], bones bright.

    The file is headerless: 2048 x 2048 big-endian uint16 words holding 12-bit values where a
    higher value is darker; returns ``(4095 - v) / 4095``.
    """
    path = Path(path)
    expected = JSRT_IMG_SHAPE[0] * JSRT_IMG_SHAPE[1] * 2
    size = path.stat().st_size
    if size != expected:
        raise ValueError(
            f"not a JSRT .IMG file: {path} has {size} bytes, expected {expected} "
            f"(2048 x 2048 16-bit big-endian words)"
        )
    raw = np.fromfile(path, dtype=">u2").reshape(JSRT_IMG_SHAPE)
    inverted = JSRT_IMG_MAX - np.minimum(raw, JSRT_IMG_MAX).astype(np.float32)
    return inverted / np.float32(JSRT_IMG_MAX)


def read_scr_gif(path: str | Path) -> np.ndarray:
    """SCR organ mask GIF (or any binary mask image) -> bool (H, W)."""
    return binary_mask(read_mask(Path(path)), Path(path))


def _organ_key(folder_name: str) -> str:
    """SCR organ folder name ("left lung", "Left_Lung", "left-lung") -> "left_lung"."""
    return folder_name.strip().lower().replace(" ", "_").replace("-", "_")


def _jsrt_organ_loader(images: dict[str, Path], masks: dict[str, dict[str, Path]],
                       read_image: Callable[[Path], np.ndarray], *, scaled_ok: bool) -> Loader:
    """Loader reading the image with ``read_image`` and painting its five organ masks.

    With ``scaled_ok`` the masks may have another resolution than the image (same aspect ratio,
    as SCR's 1024 x 1024 masks of the 2048 x 2048 images) but must agree with each other.
    """

    def load(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image_path, paths = images[case_id], masks[case_id]
        image = read_image(image_path)
        organs = {organ: read_scr_gif(path) for organ, path in paths.items()}
        first = JSRT_ORGANS[0]
        for organ, mask in organs.items():
            check_same_shape(image_path, image.shape, paths[organ], mask.shape, scaled_ok=scaled_ok)
            if mask.shape != organs[first].shape:
                raise ValueError(f"mask shape {mask.shape} of {paths[organ]} differs from mask "
                                 f"shape {organs[first].shape} of {paths[first]}")
        return image, jsrt_labels(organs)

    return load


def _jsrt_png(root: Path) -> tuple[list[str], Loader, CaseFiles]:
    """Case ids and loader of the PNG layout (``images/`` + ``masks/<organ>/``)."""
    image_dir = require_dir(root / "images", "jsrt", JSRT_LAYOUT)
    images = index_files(image_dir, (".png",))
    organ_dirs = {o: require_dir(root / "masks" / o, "jsrt", JSRT_LAYOUT) for o in JSRT_ORGANS}
    masks = {
        case_id: {o: require_file(organ_dirs[o] / f"{case_id}.png", path) for o in JSRT_ORGANS}
        for case_id, path in images.items()
    }
    ids = require_cases(sorted(images), "jsrt", image_dir, JSRT_LAYOUT)
    return ids, _jsrt_organ_loader(images, masks, read_gray, scaled_ok=False), files_per_case(images, masks)


def _scan_original(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """All ``*.IMG`` files below root (id -> path) and every folder holding a ``heart/*.gif``."""
    images: dict[str, Path] = {}
    mask_roots: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        for name in sorted(filenames):
            if name.lower().endswith(".img"):
                path = folder / name
                if path.stem in images:
                    raise ValueError(
                        f"two JSRT images with the same id: {images[path.stem]} and {path}")
                images[path.stem] = path
        if folder.name.lower() == "heart" and any(n.lower().endswith(".gif") for n in filenames):
            mask_roots.append(folder.parent)
    return images, mask_roots


def _index_scr_masks(mask_roots: list[Path]) -> dict[str, dict[str, Path]]:
    """id -> organ -> GIF path over the organ folders of every SCR mask folder."""
    index: dict[str, dict[str, Path]] = {}
    for mask_root in mask_roots:
        for organ_dir in sorted(p for p in mask_root.iterdir() if p.is_dir()):
            organ = _organ_key(organ_dir.name)
            if organ not in JSRT_ORGANS:
                continue
            for gif in organ_dir.iterdir():
                if gif.suffix.lower() == ".gif":
                    index.setdefault(gif.stem, {})[organ] = gif
    return index


def _jsrt_original(root: Path) -> tuple[list[str], Loader, CaseFiles]:
    """Case ids and loader of the original distribution (``.IMG`` + SCR GIF masks)."""
    images, mask_roots = _scan_original(root)
    if not images:
        raise layout_error("jsrt", root, JSRT_LAYOUT, what="images/ folder or *.IMG files below")
    if not mask_roots:
        raise layout_error("jsrt", root, JSRT_LAYOUT,
                           what="SCR mask folders (<masks>/heart/<ID>.gif) below")
    index = _index_scr_masks(mask_roots)
    masks = {}
    for case_id, image_path in sorted(images.items()):
        found = index.get(case_id, {})
        for organ in JSRT_ORGANS:
            if organ not in found:
                expected = mask_roots[0] / organ / f"{case_id}.gif"
                raise FileNotFoundError(
                    f"mask file not found: {expected} (or '{organ.replace('_', ' ')}' folder; "
                    f"for image {image_path})"
                )
        masks[case_id] = {organ: found[organ] for organ in JSRT_ORGANS}
    return (sorted(images), _jsrt_organ_loader(images, masks, read_jsrt_img, scaled_ok=True),
            files_per_case(images, masks))


def jsrt_source(root: str | Path | None, image_size: Size, *, layout: str = "auto") -> Source:
    """JSRT with SCR masks; classes background, lung, heart, clavicle (see module docstring)."""
    root = require_dir(root, "jsrt", JSRT_LAYOUT)
    if layout == "auto":
        layout = "png" if (root / "images").is_dir() else "original"
    if layout == "png":
        ids, load, files = _jsrt_png(root)
    elif layout == "original":
        ids, load, files = _jsrt_original(root)
    else:
        raise ValueError(f"unknown jsrt layout {layout!r}; valid: auto, png, original")
    return Source(ids, load, CHEST_CLASSES, image_size, files)


def lung_layout(root: Path, dataset: str, layout_text: str, layout: str = "auto") -> str:
    """"merged" or "original": ``layout``, or with "auto" the one ``root`` is in (``images/`` -> merged,
    else ``CXR_png/`` -> original); a root in neither raises FileNotFoundError naming it and showing both."""
    if layout not in ("auto", *LUNG_LAYOUTS):
        raise ValueError(f"unknown {dataset} layout {layout!r}; valid: auto, {', '.join(LUNG_LAYOUTS)}")
    if layout != "auto":
        return layout
    if (root / "images").is_dir():
        return "merged"
    if (root / "CXR_png").is_dir():
        return "original"
    raise FileNotFoundError(f"{dataset}: {root} is in neither layout: it holds no images/ folder (merged layout) "
                            f"and no CXR_png/ folder (original distribution)\nExpected layout:\n{layout_text.rstrip()}")


def _lung_images(root: Path, layout: str, dataset: str, layout_text: str) -> tuple[Path, dict[str, Path]]:
    """The image folder of ``layout`` (``images/`` or ``CXR_png/``) and its PNGs (stem -> path)."""
    image_dir = require_dir(root / ("images" if layout == "merged" else "CXR_png"), dataset, layout_text)
    return image_dir, index_files(image_dir, (".png",))


def _lung_loader(files: CaseFiles) -> Loader:
    """Loader of cases ``[image, mask, ...]``: the image in grayscale, lung = union of its binary masks."""

    def load(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image_path, *mask_paths = files[case_id]
        image = read_gray(image_path)
        lung = np.zeros(image.shape, dtype=bool)
        for mask_path in mask_paths:
            mask = read_mask(mask_path)
            check_same_shape(image_path, image.shape, mask_path, mask.shape)
            lung |= binary_mask(mask, mask_path)
        return image, paint_labels([lung])

    return load


def _lung_source(dataset: str, image_dir: Path, images: dict[str, Path],
                 masks: dict[str, Path] | dict[str, dict[str, Path]], layout_text: str,
                 image_size: Size) -> Source:
    """Source of lung cases (classes background, lung) from their image and mask file(s)."""
    ids = require_cases(sorted(images), dataset, image_dir, layout_text)
    files = files_per_case(images, masks)
    return Source(ids, _lung_loader(files), LUNG_CLASSES, image_size, files)


def montgomery_source(root: str | Path | None, image_size: Size, *, layout: str = "auto") -> Source:
    """Montgomery County CXR, either layout (module docstring): lung = the merged mask, or the union
    of ``leftMask`` and ``rightMask``; an image without its mask(s) raises naming the missing file."""
    root = require_dir(root, "montgomery", MONTGOMERY_LAYOUT)
    layout = lung_layout(root, "montgomery", MONTGOMERY_LAYOUT, layout)
    image_dir, images = _lung_images(root, layout, "montgomery", MONTGOMERY_LAYOUT)
    folders = ({"lung": root / "masks"} if layout == "merged"
               else {side: root / "ManualMask" / side for side in ("leftMask", "rightMask")})
    mask_dirs = {key: require_dir(folder, "montgomery", MONTGOMERY_LAYOUT) for key, folder in folders.items()}
    masks = {
        case_id: {key: require_file(folder / f"{case_id}.png", path) for key, folder in mask_dirs.items()}
        for case_id, path in images.items()
    }
    return _lung_source("montgomery", image_dir, images, masks, MONTGOMERY_LAYOUT, image_size)


def shenzhen_source(root: str | Path | None, image_size: Size, *, layout: str = "auto") -> Source:
    """Shenzhen CXR, either layout (module docstring): ``masks/<ID>.png`` or ``mask/<ID>_mask.png``;
    images without a mask are skipped with a warning."""
    root = require_dir(root, "shenzhen", SHENZHEN_LAYOUT)
    layout = lung_layout(root, "shenzhen", SHENZHEN_LAYOUT, layout)
    image_dir, all_images = _lung_images(root, layout, "shenzhen", SHENZHEN_LAYOUT)
    mask_dir = require_dir(root / ("masks" if layout == "merged" else "mask"), "shenzhen", SHENZHEN_LAYOUT)
    suffix = "" if layout == "merged" else "_mask"
    masks = {stem: mask_dir / f"{stem}{suffix}.png" for stem in all_images}
    images = {stem: path for stem, path in all_images.items() if masks[stem].is_file()}
    skipped = len(all_images) - len(images)
    if skipped:
        warnings.warn(
            f"shenzhen: skipped {skipped} of {len(all_images)} images without a mask in {mask_dir}",
            stacklevel=3,
        )
    masks = {stem: masks[stem] for stem in images}
    return _lung_source("shenzhen", image_dir, images, masks, SHENZHEN_LAYOUT, image_size)
