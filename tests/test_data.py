"""Tests of medcert_core.data: real JSRT data, the original JSRT/SCR format, every loader on a
small fixture written in its dataset's layout, error messages, and the phantom generator."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from medcert_core.data import (
    DATASET_NAMES,
    chest_phantom,
    default_image_size,
    lesion_phantom,
    load_dataset,
    read_jsrt_img,
    split_ids,
)
from medcert_core.data.chest import JSRT_ORGANS

# The real data lies in ../shared/data/jsrt beside the repository (MEDCERT_JSRT_ROOT overrides);
# CI has it, so there a missing folder is an error, not a skip.
JSRT_ROOT = Path(os.environ.get("MEDCERT_JSRT_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "jsrt"))
if os.environ.get("CI") and not (JSRT_ROOT / "images").is_dir():
    raise RuntimeError(f"CI must test the real JSRT data, but {JSRT_ROOT} has no images/")
needs_jsrt = pytest.mark.skipif(
    not (JSRT_ROOT / "images").is_dir(), reason=f"real JSRT data not found at {JSRT_ROOT} (set MEDCERT_JSRT_ROOT)"
)
SCR_SAMPLE_IDS = ("JPCLN001", "JPCNN001")
SIZE = (40, 48)  # fixture images, H x W


# --------------------------------------------------------------------------- fixture helpers


def save(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8/uint16, (H, W) or (H, W, 3)) to ``path``; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def gray_image(i: int) -> np.ndarray:
    """Distinct 8-bit grayscale (H, W) test image number ``i``."""
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    return ((xx * 3 + yy * 2 + 17 * i) % 256).astype(np.uint8)


def rgb_image(i: int) -> np.ndarray:
    """Smooth 8-bit RGB (H, W, 3) test image number ``i`` (smooth so JPEG keeps it close)."""
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    return np.stack([xx * 4 + i, yy * 5, np.full(SIZE, 100 + i)], axis=-1).astype(np.uint8)


def disc_mask(i: int, value: int = 255) -> np.ndarray:
    """(H, W) uint8 disc of ``value`` on 0 whose centre depends on ``i``."""
    yy, xx = np.mgrid[: SIZE[0], : SIZE[1]]
    inside = (yy - 20) ** 2 + (xx - 14 - 2 * (i % 10)) ** 2 < 100
    return (inside * value).astype(np.uint8)


def best_threshold_dice(image: np.ndarray, target: np.ndarray) -> float:
    """Best Dice of ``image < t`` or ``image > t`` against bool ``target`` over 99 quantiles."""
    best = 0.0
    for t in np.quantile(image, np.linspace(0.01, 0.99, 99)):
        for pred in (image < t, image > t):
            best = max(best, 2 * (pred & target).sum() / (pred.sum() + target.sum()))
    return float(best)


# --------------------------------------------------------------------------- splits and API


def test_split_ids_sizes_disjoint_and_deterministic() -> None:
    ids = [f"case{i:02d}" for i in range(10)]
    parts = {s: split_ids(ids, s, seed=3) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [7, 1, 2]
    assert sorted(sum(parts.values(), [])) == ids
    assert split_ids(ids[::-1], "train", seed=3) == parts["train"]  # order of ids is irrelevant
    assert split_ids(ids, "all", seed=3) == ids
    assert any(split_ids(ids, "train", seed=s) != parts["train"] for s in range(4, 8))


def test_a_blocked_split_keeps_runs_of_consecutive_ids_together() -> None:
    ids = [str(i) for i in range(1, 48)]  # "1".."47": string order is not the frames' order
    parts = {s: split_ids(ids, s, seed=5, block=5) for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), []), key=int) == sorted(ids, key=int)
    # a direct construction: runs 1-5, 6-10, ..., 46-47, shuffled by the seed, filled to 33 then 38 ids
    runs = [list(range(start, min(start + 5, 48))) for start in range(1, 48, 5)]
    expected, taken = {"train": [], "val": [], "test": []}, 0
    for index in np.random.default_rng(5).permutation(len(runs)):
        expected["train" if taken < 33 else "val" if taken < 38 else "test"] += runs[index]
        taken += len(runs[index])
    assert {s: [int(i) for i in parts[s]] for s in parts} == {s: sorted(v) for s, v in expected.items()}
    where = {i: s for s, members in parts.items() for i in members}
    assert all(len({where[str(i)] for i in run}) == 1 for run in runs)  # no run is cut
    assert split_ids(ids, "train", seed=5, block=0) == split_ids(ids, "train", seed=5)  # 0: the random split
    with pytest.raises(ValueError, match="split block must be an integer >= 0"):
        split_ids(ids, "train", seed=5, block=-1)
    with pytest.raises(ValueError, match=r"runs of 20 consecutive ids leaves test empty: 6 ids make 1 runs"):
        split_ids([str(i) for i in range(1, 7)], "test", seed=0, block=20)  # a clear error, not an empty chapter


def test_cvc_clinicdb_blocked_split_puts_no_neighbouring_frame_of_a_test_frame_in_train() -> None:
    if not (CVC_ROOT / "Original").is_dir():
        pytest.skip(f"CVC-ClinicDB not found at {CVC_ROOT}")
    train = {int(i) for i in load_dataset("cvc_clinicdb", CVC_ROOT, "train", split_block=20).ids}
    test = {int(i) for i in load_dataset("cvc_clinicdb", CVC_ROOT, "test", split_block=20).ids}
    random_train = {int(i) for i in load_dataset("cvc_clinicdb", CVC_ROOT, "train").ids}
    random_test = {int(i) for i in load_dataset("cvc_clinicdb", CVC_ROOT, "test").ids}
    touching = sum(bool({i - 1, i + 1} & train) for i in test)
    # only the frames at the edge of a run can touch train: at most 2 per run of 20 test frames
    assert len(test) == 120 and touching <= 2 * len(test) / 20
    assert sum(bool({i - 1, i + 1} & random_train) for i in random_test) > 0.8 * len(random_test)


def test_names_and_default_sizes() -> None:
    assert DATASET_NAMES == ("jsrt", "montgomery", "shenzhen", "isic2018", "isic2017", "cvc_clinicdb",
                             "folder", "phantom", "hippocampus")
    assert default_image_size("jsrt") == (512, 512)
    assert default_image_size("shenzhen") == (512, 512)
    assert default_image_size("isic2018") == (384, 512)
    assert default_image_size("isic2017") == (256, 256)  # the shared copy's native size
    assert default_image_size("cvc_clinicdb") == (288, 384)
    assert default_image_size("phantom") == (128, 128)
    assert default_image_size("folder") is None
    assert default_image_size("hippocampus") is None  # volumes: padded to the largest extent of each axis


def test_unknown_name_and_bad_split_list_valid_values() -> None:
    with pytest.raises(ValueError, match="valid names: jsrt, montgomery, shenzhen, isic2018"):
        load_dataset("mnist", None, "train")
    with pytest.raises(ValueError, match="valid splits: train, val, test, all"):
        load_dataset("phantom", None, "validation")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_dataset("phantom", None, "train", channels=2)


# --------------------------------------------------------------------------- real JSRT


@pytest.fixture(scope="module")
def jsrt_all():
    return load_dataset("jsrt", JSRT_ROOT, "all")


@needs_jsrt
def test_jsrt_counts_and_splits(jsrt_all) -> None:
    assert len(jsrt_all) == 247
    assert jsrt_all.class_names == ("background", "lung", "heart", "clavicle")
    assert jsrt_all.image_size == (512, 512) and jsrt_all.channels == 3
    parts = {s: load_dataset("jsrt", JSRT_ROOT, s, seed=0).ids for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [173, 25, 49]
    assert sorted(sum(parts.values(), [])) == jsrt_all.ids
    assert not set(parts["train"]) & set(parts["test"])
    assert not set(parts["val"]) & (set(parts["train"]) | set(parts["test"]))
    assert load_dataset("jsrt", JSRT_ROOT, "train", seed=0).ids == parts["train"]
    assert load_dataset("jsrt", JSRT_ROOT, "train", seed=1).ids != parts["train"]


@needs_jsrt
def test_jsrt_items_classes_and_alignment(jsrt_all) -> None:
    for index in (0, 120, 246):
        image, mask = jsrt_all[index]
        assert image.shape == (3, 512, 512) and image.dtype == torch.float32
        assert mask.shape == (512, 512) and mask.dtype == torch.int64
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert torch.equal(image[0], image[2])
        assert set(mask.unique().tolist()) == {0, 1, 2, 3}
        lung, heart = image[0][mask == 1].mean(), image[0][mask == 2].mean()
        assert lung < heart - 0.05
    png = np.array(Image.open(JSRT_ROOT / "images" / f"{jsrt_all.ids[0]}.png"))
    assert np.allclose(jsrt_all[0][0][0].numpy(), png / 255.0, atol=1e-6)


@needs_jsrt
def test_jsrt_overlap_rule(jsrt_all) -> None:
    """Later classes overwrite earlier ones: clavicle over lung is 3, heart over lung is 2."""
    case = jsrt_all.ids[0]
    organ = {o: np.array(Image.open(JSRT_ROOT / "masks" / o / f"{case}.png")) > 127
             for o in JSRT_ORGANS}
    mask = jsrt_all[0][1].numpy()
    lung = organ["left_lung"] | organ["right_lung"]
    clavicle = organ["left_clavicle"] | organ["right_clavicle"]
    assert (lung & clavicle).sum() > 0
    assert (mask[clavicle] == 3).all()
    assert (mask[organ["heart"] & ~clavicle] == 2).all()
    assert (mask[lung & ~organ["heart"] & ~clavicle] == 1).all()
    assert (mask[~lung & ~organ["heart"] & ~clavicle] == 0).all()


@needs_jsrt
def test_jsrt_resize_and_one_channel(jsrt_all) -> None:
    small = load_dataset("jsrt", JSRT_ROOT, "test", image_size=256)
    image, mask = small[0]
    assert image.shape == (3, 256, 256) and mask.shape == (256, 256)
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3} and len(mask.unique()) == 4
    one = load_dataset("jsrt", JSRT_ROOT, "test", channels=1)
    assert one[0][0].shape == (1, 512, 512) and one.channels == 1
    rect = load_dataset("jsrt", JSRT_ROOT, "val", image_size=(128, 96))
    assert rect[0][0].shape == (3, 128, 96) and rect[0][1].shape == (128, 96)


# --------------------------------------------------------------------------- original JSRT format


def write_img(path: Path, values: np.ndarray) -> Path:
    """Write (2048, 2048) integer ``values`` as a headerless big-endian uint16 JSRT .IMG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values.astype(">u2").tofile(path)
    return path


def test_read_jsrt_img_inverts_and_scales(tmp_path: Path) -> None:
    values = (np.arange(2048 * 2048) % 4096).reshape(2048, 2048)
    image = read_jsrt_img(write_img(tmp_path / "X.IMG", values))
    assert image.shape == (2048, 2048) and image.dtype == np.float32
    assert image[0, 0] == 1.0 and image[0, 1] == np.float32(4094 / 4095)
    assert image[1, 2047] == 0.0  # value 4095 -> black
    np.testing.assert_array_equal(image, ((4095 - values) / 4095).astype(np.float32))
    bad = tmp_path / "short.IMG"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match="short.IMG"):
        read_jsrt_img(bad)


def build_original_jsrt(root: Path, mask_dir: str, organ_name, ids=SCR_SAMPLE_IDS) -> None:
    """JSRT original layout in ``root``: .IMG made from the PNG images + the SCR sample GIFs."""
    for case in ids:
        png = np.array(Image.open(JSRT_ROOT / "images" / f"{case}.png")).astype(np.float64)
        full = np.kron(png / 255.0, np.ones((4, 4)))  # 512 -> 2048
        write_img(root / "All247images" / f"{case}.IMG", np.rint(4095 * (1 - full)))
        for organ in JSRT_ORGANS:
            target = root / mask_dir / organ_name(organ) / f"{case}.gif"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(JSRT_ROOT / "scr_original_sample" / organ / f"{case}.gif", target)


@needs_jsrt
@pytest.mark.parametrize("mask_dir, organ_name", [
    ("scr/masks", lambda organ: organ.replace("_", " ")),  # SCR spelling: "left lung"
    ("fold1/masks", lambda organ: organ),
], ids=["scr-masks-spaces", "fold1-masks-underscores"])
def test_jsrt_original_layout_matches_png_layout(tmp_path: Path, jsrt_all, mask_dir,
                                                 organ_name) -> None:
    build_original_jsrt(tmp_path, mask_dir, organ_name)
    original = load_dataset("jsrt", tmp_path, "all")
    assert original.ids == list(SCR_SAMPLE_IDS)
    for index, case in enumerate(SCR_SAMPLE_IDS):
        image, mask = original[index]
        ref_image, ref_mask = jsrt_all[jsrt_all.ids.index(case)]
        assert image.shape == (3, 512, 512) and mask.shape == (512, 512)
        assert set(mask.unique().tolist()) == {0, 1, 2, 3}
        assert (mask == ref_mask).float().mean() > 0.95
        assert (image - ref_image).abs().mean() < 0.02  # inversion and scaling of .IMG values


@needs_jsrt
def test_jsrt_original_layout_missing_mask_names_file(tmp_path: Path) -> None:
    build_original_jsrt(tmp_path, "scr/masks", lambda organ: organ, ids=SCR_SAMPLE_IDS[:1])
    (tmp_path / "scr/masks/heart/JPCLN001.gif").unlink()
    (tmp_path / "scr/masks/heart/other.gif").write_bytes(b"GIF89a")  # keeps the folder found
    with pytest.raises(FileNotFoundError, match=r"heart.JPCLN001\.gif"):
        load_dataset("jsrt", tmp_path, "all")


def test_jsrt_missing_root_and_missing_masks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("jsrt", tmp_path / "nowhere", "all")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert "Expected layout" in str(info.value) and "masks/left_lung/<ID>.png" in str(info.value)
    save(tmp_path / "png" / "images" / "A.png", gray_image(0))
    with pytest.raises(FileNotFoundError, match=r"masks.left_lung"):
        load_dataset("jsrt", tmp_path / "png", "all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.IMG"):
        load_dataset("jsrt", tmp_path / "empty", "all")
    with pytest.raises(FileNotFoundError, match=r"empty.images"):
        load_dataset("jsrt", tmp_path / "empty", "all", layout="png")
    with pytest.raises(ValueError, match="valid: auto, png, original"):
        load_dataset("jsrt", tmp_path / "empty", "all", layout="dicom")


# --------------------------------------------------------------------------- other loaders


def test_montgomery(tmp_path: Path) -> None:
    for i in range(10):
        stem = f"MCUCXR_{i:04d}_{i % 2}"
        save(tmp_path / "CXR_png" / f"{stem}.png", gray_image(i))
        left = np.zeros(SIZE, np.uint8)
        left[5:30, 30:44] = 255
        right = np.zeros(SIZE, np.uint8)
        right[5:30, 4:18] = 255
        save(tmp_path / "ManualMask" / "leftMask" / f"{stem}.png", left)
        save(tmp_path / "ManualMask" / "rightMask" / f"{stem}.png", right)
    splits = [len(load_dataset("montgomery", tmp_path, s)) for s in ("train", "val", "test")]
    assert splits == [7, 1, 2]
    ds = load_dataset("montgomery", tmp_path, "all", image_size=SIZE)
    assert ds.class_names == ("background", "lung")
    image, mask = ds[3]
    assert image.shape == (3, *SIZE) and mask.shape == SIZE
    np.testing.assert_allclose(image[1].numpy(), gray_image(3) / 255.0, atol=1e-6)
    assert mask.sum() == 2 * 25 * 14 and mask[10, 35] == 1 and mask[10, 10] == 1
    assert mask[10, 24] == 0
    default = load_dataset("montgomery", tmp_path, "test")
    assert default[0][0].shape == (3, 512, 512)


def test_montgomery_missing_mask_and_subfolder(tmp_path: Path) -> None:
    save(tmp_path / "CXR_png" / "A.png", gray_image(0))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("montgomery", tmp_path, "all")
    message = str(info.value)
    assert str(tmp_path / "ManualMask" / "leftMask") in message
    assert "ManualMask/rightMask/<ID>.png" in message  # the layout diagram
    save(tmp_path / "ManualMask" / "rightMask" / "A.png", disc_mask(0))
    (tmp_path / "ManualMask" / "leftMask").mkdir()
    with pytest.raises(FileNotFoundError, match=r"leftMask.A\.png"):
        load_dataset("montgomery", tmp_path, "all")


def test_shenzhen_skips_images_without_mask(tmp_path: Path) -> None:
    for i in range(12):
        stem = f"CHNCXR_{i:04d}_{i % 2}"
        rgb = np.repeat(gray_image(i)[..., None], 3, axis=-1)  # Shenzhen stores some as RGB
        save(tmp_path / "CXR_png" / f"{stem}.png", rgb)
        if i not in (4, 7):
            save(tmp_path / "mask" / f"{stem}_mask.png", disc_mask(i))
    with pytest.warns(UserWarning, match="skipped 2 of 12"):
        ds = load_dataset("shenzhen", tmp_path, "all", image_size=SIZE)
    assert len(ds) == 10 and "CHNCXR_0004_0" not in ds.ids
    image, mask = ds[0]
    assert image.shape == (3, *SIZE)
    np.testing.assert_allclose(image[0].numpy(), gray_image(0) / 255.0, atol=1e-6)
    assert torch.equal(mask, torch.from_numpy(disc_mask(0) // 255).long())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [len(load_dataset("shenzhen", tmp_path, s)) for s in ("train", "val", "test")] \
            == [7, 1, 2]


def test_isic2018(tmp_path: Path) -> None:
    for i in range(10):
        stem = f"ISIC_{i:07d}"
        save(tmp_path / "ISIC2018_Task1-2_Training_Input" / f"{stem}.jpg", rgb_image(i))
        save(tmp_path / "ISIC2018_Task1_Training_GroundTruth" / f"{stem}_segmentation.png",
             disc_mask(i))
    (tmp_path / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("x")
    ds = load_dataset("isic2018", tmp_path, "all")
    assert len(ds) == 10 and ds.class_names == ("background", "lesion")
    image, mask = ds[2]
    assert image.shape == (3, 384, 512) and mask.shape == (384, 512)
    assert set(mask.unique().tolist()) == {0, 1}
    native = load_dataset("isic2018", tmp_path, "all", image_size=SIZE)
    image, mask = native[2]
    assert np.abs(image.permute(1, 2, 0).numpy() * 255 - rgb_image(2)).mean() < 3  # JPEG
    assert torch.equal(mask, torch.from_numpy(disc_mask(2) // 255).long())
    gray = load_dataset("isic2018", tmp_path, "all", image_size=SIZE, channels=1)
    assert gray[2][0].shape == (1, *SIZE)
    assert torch.allclose(gray[2][0][0], image.mean(dim=0), atol=1e-6)
    sizes = [len(load_dataset("isic2018", tmp_path, s)) for s in ("train", "val", "test")]
    assert sizes == [7, 1, 2]


def test_cvc_clinicdb_tiff(tmp_path: Path) -> None:
    for i in range(1, 11):
        save(tmp_path / "Original" / f"{i}.tif", rgb_image(i))
        save(tmp_path / "Ground Truth" / f"{i}.tif", disc_mask(i))
    ds = load_dataset("cvc_clinicdb", tmp_path, "all", image_size=SIZE)
    assert ds.class_names == ("background", "polyp") and len(ds) == 10
    image, mask = ds[ds.ids.index("3")]
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), rgb_image(3) / 255.0, atol=1e-6)
    assert torch.equal(mask, torch.from_numpy(disc_mask(3) // 255).long())
    assert load_dataset("cvc_clinicdb", tmp_path, "test")[0][0].shape == (3, 288, 384)


def test_folder_binary_jpeg_masks(tmp_path: Path) -> None:
    for i in range(10):
        save(tmp_path / "images" / f"img{i}.png", gray_image(i))
        save(tmp_path / "masks" / f"img{i}.jpg", disc_mask(i))
    ds = load_dataset("folder", tmp_path, "all")
    assert ds.image_size == SIZE and ds.class_names == ("background", "foreground")
    image, mask = ds[1]
    assert image.shape == (3, *SIZE) and torch.equal(image[0], image[1])
    truth = torch.from_numpy(disc_mask(1) // 255).long()
    assert set(mask.unique().tolist()) == {0, 1} and (mask == truth).float().mean() > 0.99
    assert load_dataset("folder", tmp_path, "all", channels=1)[1][0].shape == (1, *SIZE)


def test_folder_sixteen_bit_images_scaled_by_65535(tmp_path: Path) -> None:
    values = (np.arange(SIZE[0] * SIZE[1]).reshape(SIZE) * 997 % 65536).astype(np.uint16)
    for i in range(3):
        save(tmp_path / "images" / f"s{i}.png", values)
        save(tmp_path / "masks" / f"s{i}.png", disc_mask(i))
    image, mask = load_dataset("folder", tmp_path, "all")[0]
    assert values.max() > 60000 and image.shape == (3, *SIZE)
    np.testing.assert_allclose(image[0].numpy(), values / 65535.0, atol=1e-6)


def test_folder_label_masks_and_class_names(tmp_path: Path) -> None:
    for i in range(10):
        save(tmp_path / "images" / f"c{i}.png", rgb_image(i))
        labels = (disc_mask(i, 1) + 2 * (np.arange(SIZE[1]) > 40)[None, :]).astype(np.uint8)
        save(tmp_path / "masks" / f"c{i}.png", labels)
    ds = load_dataset("folder", tmp_path, "train", image_size=(20, 24))
    assert len(ds) == 7 and ds.class_names == ("background", "class_1", "class_2")
    image, mask = ds[0]
    assert image.shape == (3, 20, 24) and set(mask.unique().tolist()) == {0, 1, 2}
    named = load_dataset("folder", tmp_path, "all", class_names=("bg", "a", "b", "c"))
    assert named.class_names == ("bg", "a", "b", "c")
    with pytest.raises(ValueError, match="class_names has only 2"):
        load_dataset("folder", tmp_path, "all", class_names=("bg", "a"))
    bad = np.full(SIZE, 5, np.uint8)  # a later mask holding a class id the first ones lacked
    save(tmp_path / "masks" / "c9.png", bad)
    ds = load_dataset("folder", tmp_path, "all")
    with pytest.raises(ValueError, match=r"c9\.png"):
        ds[ds.ids.index("c9")]


def test_errors_name_files(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / "images" / f"k{i}.png", gray_image(i))
        save(tmp_path / "masks" / f"k{i}.png", disc_mask(i))
    (tmp_path / "images" / "k1.png").write_bytes(b"\x89PNG not really")
    ds = load_dataset("folder", tmp_path, "all")
    with pytest.raises(ValueError, match=r"cannot read image file .*k1\.png"):
        ds[1]
    save(tmp_path / "masks" / "k2.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"masks.k2\.png differs .*images.k2\.png"):
        ds[2]
    (tmp_path / "images" / "k3.bmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*k3\.\* .*k3\.bmp"):
        load_dataset("folder", tmp_path, "all")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="no cases"):
        load_dataset("folder", tmp_path / "empty", "all")
    with pytest.raises(FileNotFoundError, match=r"Ground Truth/<ID>\.tif"):
        load_dataset("cvc_clinicdb", tmp_path, "all")


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    for i in range(3):  # 3 cases: train round(2.1) = 2, val round(0.3) = 0, test 1
        save(tmp_path / "images" / f"k{i}.png", gray_image(i))
        save(tmp_path / "masks" / f"k{i}.png", disc_mask(i))
    assert len(load_dataset("folder", tmp_path, "test")) == 1
    with pytest.raises(ValueError, match="split 'val' of 3 cases is empty"):
        load_dataset("folder", tmp_path, "val")


# --------------------------------------------------------------------------- phantom


def test_phantom_deterministic_and_seeded() -> None:
    a = load_dataset("phantom", None, "train", seed=0)
    b = load_dataset("phantom", "/ignored", "train", seed=0)
    assert len(a) == 42 and a.ids == b.ids
    assert [len(load_dataset("phantom", None, s)) for s in ("val", "test")] == [6, 12]
    assert a.image_size == (128, 128)
    assert a.class_names == ("background", "lung", "heart", "clavicle")
    image, mask = a[0]
    assert image.shape == (3, 128, 128) and mask.shape == (128, 128)
    assert image.dtype == torch.float32 and mask.dtype == torch.int64
    assert 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, b[0][0]) and torch.equal(mask, b[0][1])
    index = int(a.ids[0].split("_")[1])
    raw_image, raw_mask = chest_phantom(0, index)
    assert np.array_equal(raw_image, image[0].numpy()) and np.array_equal(raw_mask, mask.numpy())
    other, other_mask = chest_phantom(1, index)
    assert not np.array_equal(other_mask, raw_mask) and np.abs(other - raw_image).mean() > 0.02
    assert not np.array_equal(chest_phantom(0, index + 1)[1], raw_mask)
    one = load_dataset("phantom", None, "all", channels=1, num_images=5)
    assert one[0][0].shape == (1, 128, 128)


def test_phantom_chest_anatomy_not_a_threshold_problem() -> None:
    dice, all_classes, lung_means, heart_means, tissue_means = [], 0, [], [], []
    for i in range(12):
        image, labels = chest_phantom(7, i)
        all_classes += set(np.unique(labels).tolist()) == {0, 1, 2, 3}
        lung_means.append(image[labels == 1].mean())
        heart_means.append(image[labels == 2].mean())
        lung = labels == 1
        ring = binary_dilation(lung, iterations=4) & ~lung & (labels == 0)
        tissue_means.append(image[ring].mean())
        dice.append(best_threshold_dice(image, labels == 1))
    assert all_classes >= 11
    assert np.mean(lung_means) < np.mean(heart_means) - 0.1
    assert np.mean(lung_means) < np.mean(tissue_means)
    assert max(dice) < 0.85, dice
    sizes = [(chest_phantom(7, i)[1] == 1).mean() for i in range(6)]
    assert 0.12 < min(sizes) and max(sizes) < 0.45 and np.std(sizes) > 0.005  # varied anatomy


def test_phantom_lesion_variant() -> None:
    ds = load_dataset("phantom", None, "all", variant="lesion", num_images=8, image_size=(96, 128))
    assert ds.class_names == ("background", "lesion") and len(ds) == 8
    image, mask = ds[0]
    assert image.shape == (3, 96, 128) and mask.shape == (96, 128)
    assert set(mask.unique().tolist()) == {0, 1}
    assert (image[0] - image[2]).abs().mean() > 0.05  # coloured, not gray
    assert image[:, mask == 1].mean() < image[:, mask == 0].mean()
    with pytest.raises(ValueError, match="valid: chest, lesion"):
        load_dataset("phantom", None, "all", variant="brain")


def test_phantom_generation_is_fast() -> None:
    for generate in (chest_phantom, lesion_phantom):
        generate(0, 0)
        best = min(_timed(generate, i) for i in range(5))
        assert best < 0.02, f"{generate.__name__}: {best * 1000:.1f} ms per 128x128 image"


def _timed(generate, index: int) -> float:
    """Seconds one call of ``generate(0, index)`` takes."""
    start = time.perf_counter()
    generate(0, index)
    return time.perf_counter() - start


CVC_ROOT = JSRT_ROOT.parent / "cvc_clinicdb"


@pytest.mark.skipif(not (CVC_ROOT / "tif_sample").is_dir(), reason="the shared CVC-ClinicDB copy is not on this machine")
def test_cvc_clinicdb_png_and_tiff_editions_give_the_same_arrays() -> None:
    """The shared PNG edition and the three TIFF pairs decode to identical images and labels; the soft
    mask edges are binarized at 128 (checked against PIL / tifffile directly)."""
    import tifffile
    from PIL import Image

    png = load_dataset("cvc_clinicdb", CVC_ROOT, "all")
    tif = load_dataset("cvc_clinicdb", CVC_ROOT / "tif_sample", "all")
    assert len(png) == 612 and tif.ids == ["1", "2", "3"]
    for index, case in enumerate(tif.ids):
        (png_image, png_labels), (tif_image, tif_labels) = png[png.ids.index(case)], tif[index]
        assert png_image.shape == (3, 288, 384) and torch.equal(png_image, tif_image)
        assert torch.equal(png_labels, tif_labels)
        stored = np.asarray(Image.open(CVC_ROOT / "Ground Truth" / f"{case}.png"))[..., 0]
        soft = (stored > 0) & (stored < 255)
        assert soft.any(), "the PNG masks have soft edges"
        assert np.array_equal(png_labels.numpy(), (stored >= 128).astype(np.int64))
        assert np.array_equal(tifffile.imread(CVC_ROOT / "tif_sample" / "Ground Truth" / f"{case}.tif") >= 128,
                              tif_labels.numpy() == 1)
        expected = np.asarray(Image.open(CVC_ROOT / "Original" / f"{case}.png"), dtype=np.float32) / 255
        assert torch.allclose(png_image, torch.from_numpy(expected).permute(2, 0, 1))
