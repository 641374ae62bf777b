"""Loaders of Montgomery, Shenzhen (merged and original layouts) and ISIC 2017: the shared copies in
../shared/data (skipped where absent) and small fixtures of every layout written here."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medcert_core.data import DATASET_NAMES, default_image_size, load_dataset
from test_data import SIZE, gray_image, rgb_image, save  # the data tests' fixture images (H x W = SIZE)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("train", "val", "test")


def shared_root(name: str, probe: str) -> Path:
    """``../shared/data/<name>``, or skip the test when it (its ``probe`` folder) is not on this machine."""
    root = SHARED_DATA / name
    if not (root / probe).is_dir():
        pytest.skip(f"shared {name} data not found at {root}")
    return root


def box_mask(top: int, left: int, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask, 255 inside the box and 0 outside."""
    mask = np.zeros(SIZE, np.uint8)
    mask[top:top + height, left:left + width] = 255
    return mask


def labels_of(mask: np.ndarray) -> torch.Tensor:
    """The int64 labels a loader gives a 0/255 mask."""
    return torch.from_numpy((mask >= 128).astype(np.int64))


def split_sizes(name: str, root: Path) -> list[int]:
    """Sizes of the train, val and test splits (seed 0), warnings (Shenzhen's skipped images) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [len(load_dataset(name, root, split)) for split in SPLITS]


# --------------------------------------------------------------------------- the shared copies

PAPER_SETS = [  # name, a folder that must exist, cases, train / val / test at seed 0, classes
    ("montgomery", "images", 138, [97, 14, 27], ("background", "lung")),
    ("shenzhen", "images", 566, [396, 57, 113], ("background", "lung")),
    ("isic2017", "ISIC-2017_Validation_Data", 2150, [1505, 215, 430], ("background", "lesion")),
]
SAMPLE_CASES = {  # name -> (case id, its image file, its mask file), relative to the root
    "montgomery": ("MCUCXR_0001_0", "images/MCUCXR_0001_0.png", "masks/MCUCXR_0001_0.png"),
    "shenzhen": ("CHNCXR_0001_0", "images/CHNCXR_0001_0.png", "masks/CHNCXR_0001_0.png"),
    "isic2017": ("ISIC_0001769", "ISIC-2017_Validation_Data/ISIC_0001769.jpg",
                 "ISIC-2017_Validation_Part1_GroundTruth/ISIC_0001769_segmentation.png"),
}


@pytest.mark.parametrize("name, probe, cases, splits, classes", PAPER_SETS, ids=[s[0] for s in PAPER_SETS])
def test_shared_counts_splits_and_classes(name: str, probe: str, cases: int, splits: list[int],
                                          classes: tuple[str, str]) -> None:
    root = shared_root(name, probe)
    everything = load_dataset(name, root, "all")
    assert len(everything) == cases and everything.class_names == classes
    parts = {split: load_dataset(name, root, split).ids for split in SPLITS}
    assert [len(parts[split]) for split in SPLITS] == splits and sum(splits) == cases
    assert sorted(sum(parts.values(), [])) == everything.ids  # disjoint and complete


def test_shared_isic2017_pools_training_and_validation() -> None:
    root = shared_root("isic2017", "ISIC-2017_Validation_Data")
    ids = load_dataset("isic2017", root, "all").ids
    on_disk = {part: {p.stem for p in (root / part).glob("*.jpg")}
               for part in ("ISIC-2017_Training_Data", "ISIC-2017_Validation_Data")}
    assert [len(v) for v in on_disk.values()] == [2000, 150]
    assert set(ids) == on_disk["ISIC-2017_Training_Data"] | on_disk["ISIC-2017_Validation_Data"]
    assert default_image_size("isic2017") == Image.open(root / SAMPLE_CASES["isic2017"][1]).size[::-1] == (256, 256)


@pytest.mark.parametrize("name, probe, low, high", [
    ("montgomery", "images", 0.05, 0.5), ("shenzhen", "images", 0.05, 0.5),
    ("isic2017", "ISIC-2017_Validation_Data", 0.001, 0.99)])
def test_shared_mask_fractions_are_sensible(name: str, probe: str, low: float, high: float) -> None:
    dataset = load_dataset(name, shared_root(name, probe), "test", image_size=256)
    for index in range(0, len(dataset), len(dataset) // 4)[:4]:  # four images spread over the test split
        image, mask = dataset[index]
        assert image.shape == (3, 256, 256) and mask.shape == (256, 256)
        assert set(mask.unique().tolist()) <= {0, 1}
        assert low < mask.float().mean().item() < high, dataset.ids[index]


@pytest.mark.parametrize("name, probe", [(s[0], s[1]) for s in PAPER_SETS], ids=[s[0] for s in PAPER_SETS])
def test_shared_case_equals_its_files(name: str, probe: str) -> None:
    """One named case, at native size, is its files as PIL reads them (grayscale replicated)."""
    root = shared_root(name, probe)
    case, image_file, mask_file = SAMPLE_CASES[name]
    dataset = load_dataset(name, root, "all", image_size=256)
    image, mask = dataset[dataset.ids.index(case)]
    pixels = np.asarray(Image.open(root / image_file), dtype=np.float32) / np.float32(255)
    expected = pixels[None].repeat(3, 0) if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    assert torch.equal(image, torch.from_numpy(np.ascontiguousarray(expected)))
    assert torch.equal(mask, labels_of(np.asarray(Image.open(root / mask_file))))
    assert dataset.files[case] == [root / image_file, root / mask_file]


@pytest.mark.parametrize("name", ["montgomery", "shenzhen"])
def test_shared_case_reads_the_same_in_the_original_layout(tmp_path: Path, name: str) -> None:
    """Two real cases rewritten in the original distribution's layout (Montgomery's mask cut into a left
    and a right half) load to the same tensors as from the merged layout."""
    root = shared_root(name, "images")
    cases = load_dataset(name, root, "all").ids[:2]
    for case in cases:
        image = np.asarray(Image.open(root / "images" / f"{case}.png"))
        mask = np.asarray(Image.open(root / "masks" / f"{case}.png"))
        save(tmp_path / "CXR_png" / f"{case}.png", image)
        if name == "shenzhen":
            save(tmp_path / "mask" / f"{case}_mask.png", mask)
            continue
        half = mask.shape[1] // 2  # the patient's left lung is on the image's right
        save(tmp_path / "ManualMask" / "leftMask" / f"{case}.png", np.where(np.arange(mask.shape[1]) >= half, mask, 0))
        save(tmp_path / "ManualMask" / "rightMask" / f"{case}.png", np.where(np.arange(mask.shape[1]) < half, mask, 0))
    merged = load_dataset(name, root, "all", image_size=128)
    original = load_dataset(name, tmp_path, "all", image_size=128)
    assert original.ids == list(cases)
    for index, case in enumerate(cases):
        expected = merged[merged.ids.index(case)]
        assert all(torch.equal(a, b) for a, b in zip(original[index], expected))


# --------------------------------------------------------------------------- fixtures: chest layouts


def write_montgomery_original(root: Path, count: int) -> None:
    """``count`` Montgomery cases in the original layout; left and right masks overlap in one column."""
    for i in range(count):
        stem = f"MCUCXR_{i:04d}_{i % 2}"
        save(root / "CXR_png" / f"{stem}.png", gray_image(i))
        save(root / "ManualMask" / "leftMask" / f"{stem}.png", box_mask(4, 16, 14, 12))
        save(root / "ManualMask" / "rightMask" / f"{stem}.png", box_mask(4 + i % 3, 3, 14, 14))


def write_merged(root: Path, prefix: str, count: int, without_mask: tuple[int, ...] = ()) -> None:
    """``count`` cases in the merged layout (``images/`` + ``masks/``, same names), except masks ``without_mask``."""
    for i in range(count):
        stem = f"{prefix}_{i:04d}_{i % 2}"
        save(root / "images" / f"{stem}.png", gray_image(i))
        if i not in without_mask:
            save(root / "masks" / f"{stem}.png", box_mask(3 + i, 2, 10, 20))


def test_montgomery_original_layout_merges_left_and_right(tmp_path: Path) -> None:
    write_montgomery_original(tmp_path, 10)
    dataset = load_dataset("montgomery", tmp_path, "all", image_size=SIZE)
    assert len(dataset) == 10 and dataset.class_names == ("background", "lung")
    image, mask = dataset[4]
    np.testing.assert_allclose(image[2].numpy(), gray_image(4) / 255.0, atol=1e-6)
    union = np.maximum(box_mask(4, 16, 14, 12), box_mask(5, 3, 14, 14))
    assert torch.equal(mask, labels_of(union)) and mask.sum() == 14 * 12 + 14 * 14 - 13  # one column overlaps
    side = tmp_path / "ManualMask"
    assert dataset.files["MCUCXR_0004_0"] == [tmp_path / "CXR_png" / "MCUCXR_0004_0.png",
                                              side / "leftMask" / "MCUCXR_0004_0.png",
                                              side / "rightMask" / "MCUCXR_0004_0.png"]
    assert split_sizes("montgomery", tmp_path) == [7, 1, 2]


def test_montgomery_merged_layout(tmp_path: Path) -> None:
    write_merged(tmp_path, "MCUCXR", 10)
    dataset = load_dataset("montgomery", tmp_path, "all", image_size=SIZE)
    assert len(dataset) == 10 and dataset.class_names == ("background", "lung")
    image, mask = dataset[6]
    np.testing.assert_allclose(image[0].numpy(), gray_image(6) / 255.0, atol=1e-6)
    assert torch.equal(mask, labels_of(box_mask(9, 2, 10, 20)))
    assert split_sizes("montgomery", tmp_path) == [7, 1, 2]
    (tmp_path / "masks" / "MCUCXR_0003_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*masks.MCUCXR_0003_1\.png"):
        load_dataset("montgomery", tmp_path, "all")


def test_shenzhen_merged_layout_skips_images_without_a_mask(tmp_path: Path) -> None:
    write_merged(tmp_path, "CHNCXR", 11, without_mask=(7,))
    with pytest.warns(UserWarning, match="skipped 1 of 11"):
        dataset = load_dataset("shenzhen", tmp_path, "all", image_size=SIZE)
    assert len(dataset) == 10 and "CHNCXR_0007_1" not in dataset.ids
    image, mask = dataset[dataset.ids.index("CHNCXR_0004_0")]
    np.testing.assert_allclose(image[0].numpy(), gray_image(4) / 255.0, atol=1e-6)
    assert torch.equal(mask, labels_of(box_mask(7, 2, 10, 20)))


@pytest.mark.parametrize("name, original", [
    ("montgomery", ("CXR_png/<ID>.png", "ManualMask/leftMask/<ID>.png", "ManualMask/rightMask/<ID>.png")),
    ("shenzhen", ("CXR_png/<ID>.png", "mask/<ID>_mask.png"))])
def test_a_folder_in_neither_layout_names_it_and_both_layouts(tmp_path: Path, name: str,
                                                              original: tuple[str, ...]) -> None:
    save(tmp_path / "pictures" / "a.png", gray_image(0))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(name, tmp_path, "all")
    message = str(info.value)
    assert message.startswith(f"{name}: {tmp_path} is in neither layout: it holds no images/ folder (merged layout) "
                              f"and no CXR_png/ folder (original distribution)\nExpected layout:\n")
    for entry in ("merged layout", "images/<ID>.png", "masks/<ID>.png", "or the original distribution", *original):
        assert entry in message


def test_chest_layout_forced_auto_precedence_and_bad_value(tmp_path: Path) -> None:
    write_merged(tmp_path, "MCUCXR", 3)
    (tmp_path / "CXR_png").mkdir()  # both layouts' image folders: auto reads the merged one
    assert len(load_dataset("montgomery", tmp_path, "all")) == 3
    with pytest.raises(FileNotFoundError, match=r"folder not found: .*ManualMask.leftMask"):
        load_dataset("montgomery", tmp_path, "all", layout="original")
    with pytest.raises(ValueError, match="unknown shenzhen layout 'kaggle'; valid: auto, merged, original"):
        load_dataset("shenzhen", tmp_path, "all", layout="kaggle")
    (tmp_path / "masks").rename(tmp_path / "labels")
    with pytest.raises(FileNotFoundError, match=r"montgomery: folder not found: .*masks\nExpected layout:"):
        load_dataset("montgomery", tmp_path, "all")


# --------------------------------------------------------------------------- fixtures: ISIC 2017

ISIC2017_PARTS = {"Training": range(0, 8), "Validation": range(20, 23)}


def write_isic2017(root: Path) -> None:
    """ISIC 2017 part 1 in its official layout: 8 training and 3 validation cases, with the release's
    superpixel PNGs and metadata CSVs beside the images."""
    for part, numbers in ISIC2017_PARTS.items():
        for i in numbers:
            stem = f"ISIC_{i:07d}"
            save(root / f"ISIC-2017_{part}_Data" / f"{stem}.jpg", rgb_image(i))
            save(root / f"ISIC-2017_{part}_Data" / f"{stem}_superpixels.png", rgb_image(i + 1))
            save(root / f"ISIC-2017_{part}_Part1_GroundTruth" / f"{stem}_segmentation.png", box_mask(2, i, 9, 8))
        (root / f"ISIC-2017_{part}_Data" / f"ISIC-2017_{part}_Data_metadata.csv").write_text("image_id,age\n")


def test_isic2017_pools_training_and_validation_ignoring_other_files(tmp_path: Path) -> None:
    write_isic2017(tmp_path)
    dataset = load_dataset("isic2017", tmp_path, "all", image_size=SIZE)
    assert dataset.ids == [f"ISIC_{i:07d}" for numbers in ISIC2017_PARTS.values() for i in numbers]
    assert dataset.class_names == ("background", "lesion") and "isic2017" in DATASET_NAMES
    image, mask = dataset[dataset.ids.index("ISIC_0000021")]
    assert np.abs(image.permute(1, 2, 0).numpy() * 255 - rgb_image(21)).mean() < 3  # JPEG
    assert torch.equal(mask, labels_of(box_mask(2, 21, 9, 8)))
    assert dataset.files["ISIC_0000021"] == [
        tmp_path / "ISIC-2017_Validation_Data" / "ISIC_0000021.jpg",
        tmp_path / "ISIC-2017_Validation_Part1_GroundTruth" / "ISIC_0000021_segmentation.png"]
    assert load_dataset("isic2017", tmp_path, "test")[0][0].shape == (3, 256, 256)  # the default size
    assert split_sizes("isic2017", tmp_path) == [8, 1, 2]


def test_isic2017_errors_name_the_missing_file_or_folder(tmp_path: Path) -> None:
    write_isic2017(tmp_path)
    (tmp_path / "ISIC-2017_Validation_Part1_GroundTruth" / "ISIC_0000022_segmentation.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*ISIC_0000022_segmentation\.png"):
        load_dataset("isic2017", tmp_path, "all")
    (tmp_path / "ISIC-2017_Validation_Data" / "ISIC_0000022.jpg").unlink()
    save(tmp_path / "ISIC-2017_Validation_Data" / "ISIC_0000003.jpg", rgb_image(3))  # also a training id
    save(tmp_path / "ISIC-2017_Validation_Part1_GroundTruth" / "ISIC_0000003_segmentation.png", box_mask(0, 0, 2, 2))
    with pytest.raises(ValueError, match=r"two files with the same stem: .*Training_Data.ISIC_0000003\.jpg and "
                                         r".*Validation_Data.ISIC_0000003\.jpg"):
        load_dataset("isic2017", tmp_path, "all")
    for folder in ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"):
        for path in (tmp_path / folder).iterdir():
            path.unlink()
        (tmp_path / folder).rmdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("isic2017", tmp_path, "all")
    assert f"isic2017: folder not found: {tmp_path / 'ISIC-2017_Validation_Data'}\n" in str(info.value)
    assert "ISIC-2017_Validation_Part1_GroundTruth/<ID>_segmentation.png" in str(info.value)
