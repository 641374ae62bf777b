"""Volume datasets (issue #38, step 2): the Decathlon reader on small tasks written here, and
``load_dataset("hippocampus", ...)`` on the shared copy of Task04 (skipped where it is missing)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from medcert_core.data import DATASET_NAMES, SPLITS, load_dataset, split_ids
from medcert_core.data import base as data_base
from medcert_core.data.base import ImageTooLarge
from medcert_core.data.decathlon import (
    IntensityWindow,
    choose_intensity_map,
    given_intensity_map,
    load_decathlon,
    median_groups,
    radius_in_file_values,
    read_decathlon,
)

HIPPOCAMPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hippocampus"
needs_hippocampus = pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(),
                                       reason=f"no Decathlon hippocampus data at {HIPPOCAMPUS}")


def write_nifti(path: Path, array: np.ndarray) -> None:
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), path)


def write_task(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]],
               labels: dict[str, str] | None = None) -> Path:
    """A Decathlon task folder: imagesTr/, labelsTr/ and dataset.json listing ``cases``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, (image, label) in cases.items():
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label)
    meta = {"labels": labels or {"0": "background", "1": "Organ"},
            "training": [{"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
                         for case in cases]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def small_task(root: Path, count: int = 10) -> Path:
    """``count`` cases of different shapes and intensity scales (uint8 and float32 images, one float label)."""
    rng = np.random.default_rng(0)
    cases = {}
    for index in range(count):
        shape = (3 + index % 3, 4 + index % 2, 5)
        scale = 200.0 if index % 2 else 1000.0
        image = (rng.random(shape) * scale).astype(np.uint8 if index % 2 else np.float32)
        label = (rng.random(shape) < 0.3).astype(np.float32 if index == 0 else np.uint8)
        cases[f"case_{index:03d}"] = (image, label)
    return write_task(root, cases)


def stored(path: Path) -> np.ndarray:
    return np.asarray(nibabel.load(path).dataobj, dtype=np.float64)


def test_a_small_task_reads_padded_volumes_mapped_by_groups_chosen_on_train(tmp_path):
    root = small_task(tmp_path / "task")
    splits = {split: load_decathlon("task", root, split) for split in ("train", "val", "test")}
    train = splits["train"]
    assert train.class_names == ("background", "organ")
    assert train.image_size == (5, 5, 5)  # the largest extent of each axis over all cases
    dtypes = {case: str(nibabel.load(train.files[case][0]).get_data_dtype()) for case in train.ids}
    expected = {dtype: np.percentile(np.concatenate([stored(train.files[case][0]).ravel() for case in train.ids
                                                     if dtypes[case] == dtype]), [0.5, 99.5])
                for dtype in ("float32", "uint8")}
    for dataset in splits.values():  # every split maps with the training split's groups: one per dtype here
        groups = dataset.intensity["groups"]
        assert [group["dtype"] for group in groups] == ["float32", "uint8"]
        assert [(group["low"], group["high"]) for group in groups] == [pytest.approx(tuple(expected[d]))
                                                                       for d in ("float32", "uint8")]
        assert dataset.intensity["chosen_on"]["split"] == "train"
    for index, case in enumerate(train.ids):
        image, labels = train[index]
        values = stored(train.files[case][0])
        d, h, w = values.shape
        assert train.shapes[case] == (d, h, w)
        low, high = expected[dtypes[case]]
        assert train.volume_intensity(index)["stored_dtype"] == dtypes[case]
        assert train.volume_intensity(index)["median"] == pytest.approx(np.median(values))
        assert image.shape == (1, 5, 5, 5) and image.dtype == torch.float32
        assert np.allclose(image[0, :d, :h, :w].numpy(), np.clip((values - low) / (high - low), 0, 1), atol=1e-6)
        real = train.real_voxels(index)
        assert int(real.sum()) == d * h * w and bool(real[:d, :h, :w].all())
        assert float(image[0][~real].abs().sum()) == 0 and int(labels[~real].abs().sum()) == 0
        assert labels.dtype == torch.int64
        assert np.array_equal(labels[:d, :h, :w].numpy(), np.asarray(nibabel.load(train.files[case][1]).dataobj))


def test_groups_split_where_the_sorted_medians_jump():
    assert median_groups([5.0, 500.0, 40.0, 3.0, 600.0], gap=10) == [[3, 0, 2], [1, 4]]  # 5 -> 40 is 8x: one group
    assert median_groups([4.0, 40.0], gap=10) == [[0, 1]]  # exactly 10x is not more than the gap
    assert median_groups([0.0, 100.0, -3.0], gap=10) == [[2, 0, 1]]  # no ratio from a median <= 0
    rng = np.random.default_rng(1)
    volumes = [(rng.uniform(0, 2 * scale, (4, 4, 4)), "float32") for scale in (10, 12, 20, 3000, 5000)]
    volumes.append((rng.integers(0, 255, (4, 4, 4)).astype(np.float64), "uint8"))
    intensity = choose_intensity_map(volumes, (0, 100))
    medians = [float(np.median(values)) for values, _ in volumes]
    edge = np.sqrt(max(medians[:3]) * min(medians[3:5]))  # halfway, geometrically, between the two groups
    assert [(g.dtype, g.median_from, g.median_to, g.training_volumes) for g in intensity.groups] == [
        ("float32", -np.inf, pytest.approx(edge), 3), ("float32", pytest.approx(edge), np.inf, 2),
        ("uint8", -np.inf, np.inf, 1)]
    assert (intensity.groups[0].window.low, intensity.groups[0].window.high) == pytest.approx(
        (min(v.min() for v, _ in volumes[:3]), max(v.max() for v, _ in volumes[:3])))
    with pytest.raises(ValueError, match=r"no intensity group for a volume stored as int16 .* stored as float32, "
                                         r"uint8; give window=\(low, high\)"):
        intensity.map_volume(np.zeros((2, 2, 2)), "int16")


def test_the_radius_on_the_file_holds_inside_the_margin_and_the_margin_is_tight():
    """A perturbation of L2 norm below the margin keeps the volume's group, and it moves the mapped volume by at
    most norm / (high - low); the uniform shift that reaches the edge changes the group."""
    rng = np.random.default_rng(2)
    volumes = [(rng.uniform(0, 2 * scale, (5, 5, 5)), "float32") for scale in (100, 150, 90000, 110000)]
    intensity = choose_intensity_map(volumes)
    values = volumes[1][0]
    mapped, record = intensity.map_volume(values, "float32")
    width = record["high"] - record["low"]
    assert radius_in_file_values(0.5, record) == pytest.approx(min(0.5 * width, record["margin"]))
    assert radius_in_file_values(1e9, record) == pytest.approx(record["margin"])  # the margin caps it
    for _ in range(50):
        direction = rng.normal(size=values.shape)
        norm = rng.uniform(0, 0.999) * record["margin"]
        moved, moved_record = intensity.map_volume(values + norm * direction / np.linalg.norm(direction), "float32")
        assert moved_record["group"] == record["group"]
        assert np.linalg.norm(moved - mapped) <= norm / width + 1e-4
    shift = record["margin"] * 1.001  # every voxel up by just over the margin: the median crosses the edge
    assert intensity.map_volume(values + shift, "float32")[1]["group"] != record["group"]
    given = given_intensity_map(0, 10)
    assert given.map_volume(values, "int16")[1]["margin"] is None
    assert radius_in_file_values(0.3, given.map_volume(values, "int16")[1]) == pytest.approx(3.0)


def test_a_given_window_and_a_given_size(tmp_path):
    root = small_task(tmp_path / "task")
    dataset = load_decathlon("task", root, "all", image_size=(6, 6, 6), window=(0, 100))
    image, _ = dataset[0]
    assert image.shape == (1, 6, 6, 6)
    assert dataset.intensity["chosen_on"] == "given"
    assert dataset.intensity["groups"] == [{"dtype": "any", "median_from": None, "median_to": None, "low": 0.0,
                                            "high": 100.0, "unit_per_value": pytest.approx(0.01),
                                            "training_volumes": 0}]
    assert IntensityWindow(0, 100).apply(np.array([-5.0, 50.0, 250.0])).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"case 'case_002' has shape \(5, 4, 5\), larger than image_size "
                                         r"\(4, 8, 8\) \(3 such cases\); volumes are padded, never cropped"):
        load_decathlon("task", root, "all", image_size=(4, 8, 8))
    with pytest.raises(ValueError, match="finite low < high"):
        load_decathlon("task", root, "all", window=(3, 3))


@pytest.mark.parametrize("broken", ["no dataset.json", "no labelsTr", "missing file", "escaping path", "bad labels"])
def test_a_bad_folder_names_what_is_wrong_and_the_expected_layout(tmp_path, broken):
    root = small_task(tmp_path / "task", count=3)
    meta = json.loads((root / "dataset.json").read_text())
    if broken == "no dataset.json":
        (root / "dataset.json").unlink()
        expected = "dataset.json"
    elif broken == "no labelsTr":
        for path in (root / "labelsTr").iterdir():
            path.unlink()
        (root / "labelsTr").rmdir()
        expected = "labelsTr"
    elif broken == "missing file":
        (root / "imagesTr" / "case_001.nii.gz").unlink()
        expected = "case_001.nii.gz"
    elif broken == "escaping path":
        meta["training"][0]["label"] = "../elsewhere.nii.gz"
        expected = "not a file in labelsTr/"
    else:
        meta["labels"] = {"0": "background", "2": "organ"}
        expected = "must name the classes 0..K-1"
    if broken in ("escaping path", "bad labels"):
        (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        load_decathlon("task", root, "all")
    message = str(info.value)
    assert expected in message and "Expected layout:" in message and "imagesTr/<case>.nii.gz" in message


def test_a_volume_larger_than_the_pixel_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    root = small_task(tmp_path / "task", count=2)
    monkeypatch.setattr(data_base, "MAX_PIXELS", 50)
    with pytest.raises(ImageTooLarge, match="more than the limit of 50"):
        load_decathlon("task", root, "all")


def test_labels_that_are_not_class_ids_are_refused(tmp_path):
    image = np.zeros((3, 3, 3), dtype=np.float32)
    root = write_task(tmp_path / "task", {"a": (image, np.full((3, 3, 3), 0.5, dtype=np.float32)),
                                          "b": (image, np.zeros((3, 3, 3), dtype=np.uint8))})
    dataset = load_decathlon("task", root, "all", window=(0, 1))
    with pytest.raises(ValueError, match=r"label file .*a\.nii\.gz holds values that are not class ids"):
        dataset[0]
    root = write_task(tmp_path / "three", {"a": (image, np.full((3, 3, 3), 2, dtype=np.uint8))})
    with pytest.raises(ValueError, match=r"holds class id 2; dataset.json names 2 classes"):
        load_decathlon("task", root, "all", window=(0, 1))[0]


# ------------------------------------------------------------------------------------ the shared Task04


@pytest.fixture(scope="module")
def hippocampus():
    return {split: load_dataset("hippocampus", HIPPOCAMPUS, split) for split in SPLITS}


@needs_hippocampus
def test_hippocampus_cases_and_splits(hippocampus):
    assert "hippocampus" in DATASET_NAMES
    every = hippocampus["all"].ids
    assert len(every) == 260 and len(set(every)) == 260
    parts = [set(hippocampus[split].ids) for split in ("train", "val", "test")]
    assert [len(part) for part in parts] == [182, 26, 52]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(every)
    assert hippocampus["test"].ids == split_ids(every, "test", 0)  # the project's split, by case
    assert hippocampus["all"].class_names == ("background", "anterior", "posterior")


@needs_hippocampus
def test_hippocampus_items_and_the_training_groups(hippocampus):
    """Task04's three intensity populations become three groups chosen on the 182 training cases, and every
    test volume, mapped by its group, has a median in the middle of [0, 1] (one window left most near black)."""
    train, test = hippocampus["train"], hippocampus["test"]
    assert train.image_size == (43, 59, 47)
    assert test.intensity == train.intensity and train.intensity["chosen_on"]["cases"] == 182
    groups = train.intensity["groups"]
    assert [(group["dtype"], group["training_volumes"]) for group in groups] == [
        ("float32", 117), ("float32", 23), ("uint8", 42)]
    assert 1_000 < groups[0]["median_to"] == groups[1]["median_from"] < 100_000
    files = {case: HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz" for case in train.ids}
    uint8 = [case for case in train.ids if nibabel.load(files[case]).get_data_dtype() == np.uint8]
    assert len(uint8) == 42
    assert [groups[2]["low"], groups[2]["high"]] == pytest.approx(
        np.percentile(np.concatenate([stored(files[case]).ravel() for case in uint8]), [0.5, 99.5]))
    medians = []
    for index in range(len(test)):
        image, _ = test[index]
        medians.append(float(image[0][test.real_voxels(index)].median()))
    assert 0.25 < min(medians) and max(medians) < 0.7
    case = test.ids[0]
    image, labels = test[0]
    assert image.shape == (1, 43, 59, 47) and image.dtype == torch.float32
    assert labels.shape == (43, 59, 47) and labels.dtype == torch.int64
    values = stored(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz")
    d, h, w = values.shape
    record = test.volume_intensity(0)
    low, high = groups[record["group"]]["low"], groups[record["group"]]["high"]
    assert (record["low"], record["high"]) == (low, high)
    assert np.allclose(image[0, :d, :h, :w].numpy(), np.clip((values - low) / (high - low), 0, 1), atol=1e-6)
    label_file = np.asarray(nibabel.load(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(labels[:d, :h, :w].numpy(), np.rint(label_file))
    assert int(test.real_voxels(0).sum()) == d * h * w
    classes = set()
    for index in range(0, len(test), 10):
        classes |= set(test[index][1].unique().tolist())
    assert classes == {0, 1, 2}


@needs_hippocampus
def test_hippocampus_float_labels_are_rounded(hippocampus):
    """Two label files are stored as float32; they read as the same int64 class ids."""
    every = hippocampus["all"]
    for case in ("hippocampus_003", "hippocampus_243"):
        labels = every[every.ids.index(case)][1]
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == {0, 1, 2}


def test_2d_architectures_refuse_volumes_and_the_study_unknown_datasets_with_a_clear_error(tmp_path):
    from medcert_core.study.settings import check_setting
    from medcert_core.training import train_segmenter

    volumes = load_decathlon("task", small_task(tmp_path / "task"), "train")
    with pytest.raises(ValueError, match=r"architecture 'unet' does not fit this dataset, which gives volumes "
                                         r"\(C, D, H, W\) of shape \(1, 5, 5, 5\); volumetric architectures: unet3d"):
        train_segmenter(volumes, volumes, epochs=1, progress=False)
    with pytest.raises(ValueError, match="parameter 'dataset': unknown value 'hippocampus3d'"):
        check_setting("dataset", "hippocampus3d")
