"""Synthetic stand-ins for the paper's data, laid out exactly as the datasets are distributed.

``write_paper_fixtures(root)`` writes what ``medcert study --profile paper --data-root ROOT`` reads,
so the paper grid runs end to end without the real data (numbers mean nothing)::

    ROOT/
      jsrt/All247images/JPCLN001.IMG ...          2048 x 2048, 12-bit values in 16-bit big-endian
                                                  words, higher = darker (headerless, 8 MiB each)
      jsrt/scr/fold1/masks/<organ>/JPCLN001.gif   SCR: 1024 x 1024 GIF (0 / 255), organs "heart",
      jsrt/scr/fold2/masks/<organ>/...            "left clavicle", "left lung", "right clavicle",
                                                  "right lung"; cases split over SCR's two folds
      montgomery/CXR_png/MCUCXR_0001_0.png        8-bit grayscale, 4020 x 4892 (W x H) or 4892 x 4020
      montgomery/ManualMask/leftMask/<ID>.png     0 / 255, the image's size ("left": the patient's
      montgomery/ManualMask/rightMask/<ID>.png    left, on the image's right)
      shenzhen/CXR_png/CHNCXR_0001_0.png          about 3000 x 3000 (sizes vary), 8-bit (one RGB)
      shenzhen/mask/CHNCXR_0001_0_mask.png        0 / 255; the last image has no mask (as in the
                                                  real set, where 96 of 662 have none: skipped)
      isic2018/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg      RGB JPEG, 1022 x 767 or 4288 x 2848
      isic2018/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png   0 / 255
      cvc_clinicdb/Original/1.tif                 RGB TIFF 384 x 288
      cvc_clinicdb/Ground Truth/1.tif             0 / 255 TIFF
      256x256_diffusion_uncond.pt                 a guided-diffusion UNet state dict (OpenAI's key
                                                  layout) of reduced width with random weights
      MODEL_FLAGS.txt                             its flags, as guided-diffusion users write them
      README.md                                   what this folder is

Images come from the embedded phantoms (:mod:`medcert_core.data.phantom`): chest X-ray-like for
JSRT, Montgomery and Shenzhen, lesion-like RGB for ISIC and CVC, with their label maps as masks,
so segmenters can learn something. Each image is generated at no more than 1024 px on its long side
and enlarged to its file's size (bilinear; masks by nearest neighbour). ``native`` images per
dataset get the distributed sizes; the others (``native`` < ``images``) a quarter of them, sizes
found in no real download but read by the same code. JSRT is always 2048 x 2048 (its format).

The checkpoint's flags (:data:`FIXTURE_MODEL_FLAGS`) are given as a user gives those of any
guided-diffusion model: ``--set "denoiser_flags=<MODEL_FLAGS.txt>"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from medcert_core.data.chest import JSRT_IMG_MAX, JSRT_IMG_SHAPE
from medcert_core.data.phantom import chest_phantom, lesion_phantom
from medcert_core.data.rgb import CVC_IMAGES, CVC_MASKS, ISIC_INPUT, ISIC_TRUTH

FIXTURE_MODEL_FLAGS = ("--attention_resolutions 16,8 --class_cond False --diffusion_steps 1000 --image_size 256 "
                       "--learn_sigma True --noise_schedule linear --num_channels 32 --num_head_channels 32 "
                       "--num_res_blocks 1 --resblock_updown True --use_fp16 False --use_scale_shift_norm True")
"""The fixture checkpoint's flags: the layout of 256x256_diffusion_uncond (256 px, 6 levels, updown
ResBlocks, scale-shift norm, legacy attention) at 1/8 of its width and one ResBlock per level."""

CHECKPOINT_NAME = "256x256_diffusion_uncond.pt"  # where grids/paper.yaml looks for the denoiser
DATASETS = ("jsrt", "montgomery", "shenzhen", "isic2018", "cvc_clinicdb")
SCR_ORGANS = ("heart", "left clavicle", "left lung", "right clavicle", "right lung")
SCR_MASK_SIZE = (1024, 1024)
_WORK_SIDE = 1024  # longest side a phantom is generated at before it is enlarged to its file's size

Size = tuple[int, int]

README = """# Synthetic fixtures for the paper profile (not real data)

Written by `medcert_core.testing.fixtures.write_paper_fixtures` (or `scripts/write_paper_fixtures.py`):
phantom images in the file formats and folder layouts of JSRT + SCR, Montgomery, Shenzhen,
ISIC 2018 and CVC-ClinicDB as distributed, and a guided-diffusion checkpoint of reduced width with
random weights named like OpenAI's. Results computed from them mean nothing. Run the paper grid on
them with the checkpoint's flags (MODEL_FLAGS.txt), e.g.

    python -m medcert_core study --profile paper --data-root {root} --device cpu \\
        --set "denoiser_flags={flags}" \\
        --set test_images=1 --set "sigmas=[0.5]" --set n0=1 --set n=2 --set batch_size=3 \\
        --set "archs=[unet]" --set arch=unet --set "multi_steps=[2]" \\
        --set "training={{epochs: 1, preset: tiny, unet_denoiser_steps: 1, unet_denoiser_batch_size: 2}}"
"""


@dataclass(frozen=True)
class PaperFixtures:
    """Where :func:`write_paper_fixtures` wrote: the data root, each dataset's folder and case ids,
    the checkpoint and its flags."""

    root: Path
    datasets: dict[str, Path]
    case_ids: dict[str, list[str]]
    checkpoint: Path
    model_flags: str


# --------------------------------------------------------------------------- images


def _scaled(size: Size, factor: float) -> Size:
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def _work_size(size: Size) -> Size:
    """The size a phantom of file size ``size`` is generated at (longest side at most _WORK_SIDE)."""
    return _scaled(size, min(1.0, _WORK_SIDE / max(size)))


def _enlarge(array: np.ndarray, size: Size, *, labels: bool = False) -> np.ndarray:
    """(h, w[, 3]) float image (bilinear) or int labels (nearest) -> (size[0], size[1][, 3])."""
    if array.shape[:2] == size:
        return array
    if labels:
        return np.asarray(Image.fromarray(array.astype(np.uint8)).resize(size[::-1], Image.NEAREST)).astype(np.int64)
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[-1])]
    out = [np.asarray(Image.fromarray(c.astype(np.float32)).resize(size[::-1], Image.BILINEAR))
           for c in channels]
    return np.clip(out[0] if array.ndim == 2 else np.stack(out, axis=-1), 0, 1)


def _phantom(generate: Callable[..., tuple[np.ndarray, np.ndarray]], seed: int, index: int,
             size: Size) -> tuple[np.ndarray, np.ndarray]:
    """A phantom (image float [0, 1], labels) at file size ``size``, generated small and enlarged."""
    image, labels = generate(seed, index, _work_size(size))
    return _enlarge(image, size), _enlarge(labels, size, labels=True)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _binary_uint8(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _sides(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient's right, patient's left) halves of a bool mask: image left, image right of the
    mask's own midline (the column halfway between its extreme pixels)."""
    columns = np.flatnonzero(mask.any(axis=0))
    middle = (columns[0] + columns[-1] + 1) / 2 if len(columns) else mask.shape[1] / 2
    image_left = np.arange(mask.shape[1])[None, :] < middle
    return mask & image_left, mask & ~image_left


def chest_organs(labels: np.ndarray) -> dict[str, np.ndarray]:
    """SCR's five organ masks (keys as SCR's folder names) from chest labels (0..3).

    Lungs are the lung pixels with their holes filled (where a clavicle or the heart crosses
    them), so, as in SCR, the lung masks overlap the clavicles; painted back with the JSRT overlap
    rule they give ``labels`` again.
    """
    right_lung, left_lung = (ndimage.binary_fill_holes(side) for side in _sides(labels == 1))
    right_clavicle, left_clavicle = _sides(labels == 3)
    return {"heart": labels == 2, "left clavicle": left_clavicle, "left lung": left_lung,
            "right clavicle": right_clavicle, "right lung": right_lung}


# --------------------------------------------------------------------------- datasets


def _native_count(native: int | None, images: int) -> int:
    return images if native is None else max(0, min(native, images))


def write_jsrt(root: Path, images: int, seed: int) -> list[str]:
    """JSRT as distributed (All247images/<ID>.IMG) with SCR's masks (scr/fold{1,2}/masks/<organ>/<ID>.gif)."""
    nodule = (images + 1) // 2
    ids = [f"JPCLN{i:03d}" for i in range(1, nodule + 1)] + [f"JPCNN{i:03d}" for i in range(1, images - nodule + 1)]
    for index, case_id in enumerate(ids):
        image, labels = chest_phantom(seed, index, SCR_MASK_SIZE)  # generated at the masks' size
        raw = np.round((1 - _enlarge(image, JSRT_IMG_SHAPE)) * JSRT_IMG_MAX).astype(">u2")  # 12-bit, higher = darker
        path = root / "All247images" / f"{case_id}.IMG"
        path.parent.mkdir(parents=True, exist_ok=True)
        raw.tofile(path)
        fold = root / "scr" / f"fold{index % 2 + 1}" / "masks"
        for organ, mask in chest_organs(labels).items():
            gif = fold / organ / f"{case_id}.gif"
            gif.parent.mkdir(parents=True, exist_ok=True)
            # a full grayscale palette, not an optimised one: read back as "L" with 0 / 255, as SCR's GIFs
            Image.fromarray(_binary_uint8(mask)).save(gif, format="GIF", optimize=False)
    return ids


def write_montgomery(root: Path, images: int, native: int | None, seed: int) -> list[str]:
    """Montgomery County: CXR_png/<ID>.png + ManualMask/{left,right}Mask/<ID>.png at the image's size."""
    ids = [f"MCUCXR_{i:04d}_{i % 2}" for i in range(1, images + 1)]
    natives = _native_count(native, images)
    for index, case_id in enumerate(ids):
        size = (4020, 4892) if index % 3 == 1 else (4892, 4020)  # (H, W): portrait, some landscape
        size = size if index < natives else _scaled(size, 0.25)
        image, labels = _phantom(chest_phantom, seed + 1, index, size)
        _save_png(_to_uint8(image), root / "CXR_png" / f"{case_id}.png")
        right, left = _sides(labels == 1)
        _save_png(_binary_uint8(left), root / "ManualMask" / "leftMask" / f"{case_id}.png")
        _save_png(_binary_uint8(right), root / "ManualMask" / "rightMask" / f"{case_id}.png")
    return ids


def write_shenzhen(root: Path, images: int, native: int | None, seed: int) -> list[str]:
    """Shenzhen: CXR_png/<ID>.png + mask/<ID>_mask.png; one more image without a mask (skipped by the loader)."""
    ids = [f"CHNCXR_{i:04d}_{i % 2}" for i in range(1, images + 2)]
    natives = _native_count(native, images)
    sizes = [(2949, 3000), (3000, 2987), (2993, 2966), (2811, 2977)]  # (H, W); the real sizes vary about 3000
    for index, case_id in enumerate(ids):
        size = sizes[index % len(sizes)] if index < natives else _scaled(sizes[index % len(sizes)], 0.25)
        image, labels = _phantom(chest_phantom, seed + 2, index, size)
        pixels = _to_uint8(image)
        if index == 1:  # some Shenzhen files are RGB with equal channels
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        _save_png(pixels, root / "CXR_png" / f"{case_id}.png")
        if index < images:
            _save_png(_binary_uint8(labels == 1), root / "mask" / f"{case_id}_mask.png")
    return ids[:images]


def write_isic2018(root: Path, images: int, native: int | None, seed: int) -> list[str]:
    """ISIC 2018 task 1: <input>/ISIC_<7 digits>.jpg + <ground truth>/ISIC_<7 digits>_segmentation.png."""
    ids = [f"ISIC_{i:07d}" for i in range(images)]
    natives = _native_count(native, images)
    for index, case_id in enumerate(ids):
        size = (2848, 4288) if index == 0 else (767, 1022)  # (H, W): two of the sizes in the training set
        size = size if index < natives else _scaled(size, 0.25)
        image, labels = _phantom(lesion_phantom, seed + 3, index, size)
        path = root / ISIC_INPUT / f"{case_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_to_uint8(image)).save(path, quality=95)
        _save_png(_binary_uint8(labels == 1), root / ISIC_TRUTH / f"{case_id}_segmentation.png")
    return ids


def write_cvc_clinicdb(root: Path, images: int, seed: int) -> list[str]:
    """CVC-ClinicDB: Original/<n>.tif (RGB 384 x 288) + Ground Truth/<n>.tif (0 / 255)."""
    ids = [str(i) for i in range(1, images + 1)]
    for index, case_id in enumerate(ids):
        image, labels = _phantom(lesion_phantom, seed + 4, index, (288, 384))
        for folder, array in ((CVC_IMAGES, _to_uint8(image)), (CVC_MASKS, _binary_uint8(labels == 1))):
            path = root / folder / f"{case_id}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    return ids


# --------------------------------------------------------------------------- guided-diffusion checkpoint


def guided_diffusion_shapes(**flags: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of guided-diffusion's ``UNetModel`` built by ``create_model(**flags)``,
    in its registration order; flags default to 256x256_diffusion_uncond's. The converter's own walk of
    the layout (``guided_diffusion.checkpoint_shapes``), so flags it cannot convert are refused here too."""
    from medcert_core.denoisers.guided_diffusion import checkpoint_shapes

    return checkpoint_shapes(**flags)


def guided_diffusion_state_dict(flags: str | dict[str, Any] = FIXTURE_MODEL_FLAGS, *,
                                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights in guided-diffusion's key layout for ``flags`` (a MODEL_FLAGS string or dict).

    Weights ~ N(0, 1 / fan_in) (no layer is zero, unlike guided-diffusion's initialisation, so every
    weight matters), biases and norm shifts ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.02^2).
    """
    from medcert_core.denoisers import model_flags

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in guided_diffusion_shapes(**model_flags(flags)).items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith(".weight") and len(shape) > 1:  # linear and conv layers
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):  # the only 1-D weights are GroupNorm scales
            state[key] = 1 + 0.02 * noise
        else:
            state[key] = 0.02 * noise
    return state


def write_guided_diffusion_checkpoint(path: str | Path, flags: str = FIXTURE_MODEL_FLAGS, *, seed: int = 0) -> Path:
    """Save :func:`guided_diffusion_state_dict` as guided-diffusion saves its models (a plain ``torch.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(guided_diffusion_state_dict(flags, seed=seed), path)
    return path


# --------------------------------------------------------------------------- all of it


def write_paper_fixtures(root: str | Path, *, images: int = 6, native: int | None = None, seed: int = 0,
                         datasets: tuple[str, ...] = DATASETS, checkpoint: bool = True) -> PaperFixtures:
    """Write the five datasets (``images`` cases each) and the checkpoint under ``root``; see the module doc.

    ``native``: how many images per dataset get the distributed sizes (None: all; the others a
    quarter of them). With the default 70 / 10 / 20 split, 6 images give 4 train, 1 val, 1 test.
    """
    if images < 6:
        raise ValueError(f"images must be >= 6 so that each split (70 / 10 / 20) holds an image, got {images}")
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; valid: {list(DATASETS)}")
    root = Path(root)
    writers = {
        "jsrt": lambda folder: write_jsrt(folder, images, seed),
        "montgomery": lambda folder: write_montgomery(folder, images, native, seed),
        "shenzhen": lambda folder: write_shenzhen(folder, images, native, seed),
        "isic2018": lambda folder: write_isic2018(folder, images, native, seed),
        "cvc_clinicdb": lambda folder: write_cvc_clinicdb(folder, images, seed),
    }
    folders = {name: root / name for name in datasets}
    case_ids = {name: writers[name](folder) for name, folder in folders.items()}
    model = root / CHECKPOINT_NAME
    if checkpoint:
        write_guided_diffusion_checkpoint(model, FIXTURE_MODEL_FLAGS, seed=seed)
        (root / "MODEL_FLAGS.txt").write_text(FIXTURE_MODEL_FLAGS + "\n")
    (root / "README.md").write_text(README.format(root=root, flags=FIXTURE_MODEL_FLAGS))
    return PaperFixtures(root, folders, case_ids, model, FIXTURE_MODEL_FLAGS)
