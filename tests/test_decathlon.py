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
from medcert_core.data.decathlon import IntensityWindow, load_decathlon, read_decathlon

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


def test_a_small_task_reads_padded_volumes_with_one_window_chosen_on_train(tmp_path):
    root = small_task(tmp_path / "task")
    splits = {split: load_decathlon("task", root, split) for split in ("train", "val", "test")}
    train = splits["train"]
    assert train.class_names == ("background", "organ")
    assert train.image_size == (5, 5, 5)  # the largest extent of each axis over all cases
    expected = np.percentile(np.concatenate([np.asarray(nibabel.load(train.files[case][0]).dataobj,
                                                        dtype=np.float32).ravel() for case in train.ids]),
                             [0.5, 99.5])
    for dataset in splits.values():
        assert (dataset.intensity["low"], dataset.intensity["high"]) == pytest.approx(tuple(expected))
        assert dataset.intensity["chosen_on"]["split"] == "train"
    everything = np.concatenate([np.asarray(nibabel.load(path).dataobj, dtype=np.float32).ravel()
                                 for path in sorted((root / "imagesTr").iterdir())])
    assert np.percentile(everything, 99.5) != pytest.approx(expected[1])  # train only, not every case
    for index, case in enumerate(train.ids):
        image, labels = train[index]
        stored = np.asarray(nibabel.load(train.files[case][0]).dataobj, dtype=np.float64)
        d, h, w = stored.shape
        assert train.shapes[case] == (d, h, w)
        mapped = np.clip((stored - expected[0]) / (expected[1] - expected[0]), 0, 1)
        assert image.shape == (1, 5, 5, 5) and image.dtype == torch.float32
        assert np.allclose(image[0, :d, :h, :w].numpy(), mapped, atol=1e-6)
        real = train.real_voxels(index)
        assert int(real.sum()) == d * h * w and bool(real[:d, :h, :w].all())
        assert float(image[0][~real].abs().sum()) == 0 and int(labels[~real].abs().sum()) == 0
        assert labels.dtype == torch.int64
        assert np.array_equal(labels[:d, :h, :w].numpy(), np.asarray(nibabel.load(train.files[case][1]).dataobj))


def test_a_given_window_and_a_given_size(tmp_path):
    root = small_task(tmp_path / "task")
    dataset = load_decathlon("task", root, "all", image_size=(6, 6, 6), window=(0, 100))
    image, _ = dataset[0]
    assert image.shape == (1, 6, 6, 6)
    assert dataset.intensity["chosen_on"] == "given" and dataset.intensity["unit_per_value"] == pytest.approx(0.01)
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
def test_hippocampus_items_and_the_training_window(hippocampus):
    train, test = hippocampus["train"], hippocampus["test"]
    assert train.image_size == (43, 59, 47)
    assert test.intensity == train.intensity and train.intensity["chosen_on"]["cases"] == 182
    train_voxels = np.concatenate([np.asarray(nibabel.load(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz").dataobj,
                                              dtype=np.float32).ravel() for case in train.ids])
    assert [train.intensity["low"], train.intensity["high"]] == pytest.approx(np.percentile(train_voxels, [0.5, 99.5]))
    case = test.ids[0]
    image, labels = test[0]
    assert image.shape == (1, 43, 59, 47) and image.dtype == torch.float32
    assert labels.shape == (43, 59, 47) and labels.dtype == torch.int64
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    stored = np.asarray(nibabel.load(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz").dataobj, dtype=np.float64)
    d, h, w = stored.shape
    low, high = test.intensity["low"], test.intensity["high"]
    assert np.allclose(image[0, :d, :h, :w].numpy(), np.clip((stored - low) / (high - low), 0, 1), atol=1e-6)
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


def test_the_2d_training_and_the_study_refuse_volumes_with_a_clear_error(tmp_path):
    from medcert_core.study.settings import check_setting
    from medcert_core.training import train_segmenter

    volumes = load_decathlon("task", small_task(tmp_path / "task"), "train")
    with pytest.raises(ValueError, match=r"2D segmenters train on images \(C, H, W\); this dataset gives \(1, 5, 5, 5\) "
                                         r"volumes \(C, D, H, W\)"):
        train_segmenter(volumes, volumes, epochs=1, progress=False)
    with pytest.raises(ValueError, match="parameter 'dataset': unknown value 'hippocampus'"):
        check_setting("dataset", "hippocampus")
