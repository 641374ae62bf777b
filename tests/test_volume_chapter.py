"""The volume chapter (``notebooks/hippocampus.ipynb``): the shared dataset-chapter code on a Decathlon task of
small volumes, its volume figures and its benchmark table, and the settings that let a chapter name volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medcert_core import study
from medcert_core.study.report.figures import volume_slices
from medcert_core.study.settings import check_setting
from test_decathlon import write_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread


def blob_task(root, count: int = 10):
    """``count`` uint8 volumes of 9-10 x 10 x 11 voxels, each with a bright ball labelled 1 at its own place."""
    rng = np.random.default_rng(0)
    cases = {}
    for index in range(count):
        shape = (9 + index % 2, 10, 11)
        grid = np.indices(shape)
        centre = rng.uniform(3, 6, size=3)
        ball = ((grid - centre[:, None, None, None]) ** 2).sum(axis=0) < 2.5 ** 2
        image = (rng.random(shape) * 60 + ball * 150).astype(np.uint8)
        cases[f"case_{index:03d}"] = (image, ball.astype(np.uint8))
    return write_task(root, cases)


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    """A hippocampus-layout chapter on 10 small volumes (padded 10 x 10 x 11), both volumetric architectures,
    ours with a 3D UNet denoiser and SegCertify at one sigma: every run computed once for the module."""
    root = tmp_path_factory.mktemp("volumes")
    parameters = {
        "profile": "smoke", "dataset": "hippocampus", "data_root": str(blob_task(root / "task")),
        "archs": ["unet3d", "resunetpp-slicewise"], "denoiser": "unet:auto", "denoise_steps": "single",
        "segcertify_noise": 0.25, "baselines_for": "first", "image_size": [10, 10, 11], "sigmas": [0.25],
        "n0": 4, "n": 60, "test_images": None, "precision": "fp32", "results_dir": str(root / "results"),
        "cache_dir": str(root / "cache"), "progress": False,
    }
    return study.DatasetChapter.from_parameters(parameters)


def test_the_chapter_settings_take_a_volume_dataset_and_volumetric_architectures():
    check_setting("dataset", "hippocampus")
    check_setting("image_size", [43, 59, 47])
    from medcert_core.study.settings import ALL_SETTINGS, DEFAULTS

    defaults = {**DEFAULTS, "archs": ALL_SETTINGS["archs"].default}
    check_setting("archs", ["unet3d", "resunetpp-slicewise"], defaults)
    with pytest.raises(ValueError, match="parameter 'archs': unknown value"):
        check_setting("archs", ["unet4d"], defaults)


def test_a_volume_chapter_certifies_every_architecture_and_compares_ours_with_segcertify(chapter):
    assert chapter.experiment.data.tag == "hippocampus_10x10x11"
    settings = chapter.experiment.settings_table()["value"]
    assert settings["certified input space"] == "[0, 1]^(1×10×10×11)"  # every voxel of the padded volume
    test_volumes = len(chapter.experiment.data.load("test"))
    per_arch = chapter.per_arch()
    assert set(per_arch["arch"]) == {"unet3d", "resunetpp-slicewise"}
    assert per_arch.groupby("arch")["image_id"].nunique().tolist() == [test_volumes] * 2
    assert set(per_arch["class_name"]) == {"background", "organ"}
    comparison = chapter.comparison()
    assert set(comparison["method_label"]) == {"plain (noise 0)", "plain (noise 0.25)", "SegCertify", "ours (unet)"}
    differences = chapter.ours_against_segcertify()
    assert len(differences) > 0 and differences["mean"].notna().all()
    assert set(chapter.curves()["method_label"]) == {"SegCertify", "ours (unet)"}


def test_the_abstention_figure_cuts_each_axis_through_the_most_foreground(chapter):
    panels = chapter.experiment.abstention_panels("unet3d", chapter.compared)
    target = panels[0.25]["target"][0]
    for axis in (0, 1, 2):
        others = tuple(a for a in range(3) if a != axis)
        expected = int(np.argmax((target > 0).sum(axis=others)))
        figure = study.abstention_figure(chapter.experiment, "unet3d", chapter.compared, axis=axis)
        assert figure.layout.title.text == f"slice {expected} of axis {'DHW'[axis]} (unet3d)"


def test_volume_slices_cut_every_map_at_one_slice_and_refuse_images():
    target = np.zeros((2, 4, 5, 6), dtype=np.int64)
    target[0, :, 3, :] = 1  # volume 0's foreground: all of slice 3 of axis H
    labels = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    panels = {0.5: {"noisy": np.zeros((2, 1, 4, 5, 6)), "target": target, "ours": labels}}
    cut, index = volume_slices(panels, axis=1)
    assert index == 3
    assert cut[0.5]["noisy"].shape == (2, 1, 4, 6) and cut[0.5]["target"].shape == (2, 4, 6)
    np.testing.assert_array_equal(cut[0.5]["ours"], labels[:, :, 3, :])
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        volume_slices(panels, axis=3)
    with pytest.raises(ValueError, match="expected volume panels"):
        volume_slices({0.5: {"target": target[:, 0]}}, axis=0)


def test_the_benchmark_table_reads_the_rows_without_lists_and_names_a_missing_file(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine": {"cpu": "x"}, "training_rows": [{"network": "ddpm", "seconds": 3.0}], "rows": [
        {"architecture": "unet3d", "method": "SegCertify", "seconds per volume (median)": 2.0, "seconds (each volume)": [2.0]},
        {"architecture": "unet3d", "method": "ours (unet)", "seconds per volume (median)": 7.0, "seconds (each volume)": [7.0]},
    ]}))
    table = study.benchmark_table(path)
    assert table.loc[("unet3d", "ours (unet)"), "seconds per volume (median)"] == 7.0
    assert list(table.columns) == ["seconds per volume (median)"]
    assert study.benchmark_table(path, index=["network"], key="training_rows").loc["ddpm", "seconds"] == 3.0
    with pytest.raises(FileNotFoundError, match="no benchmark results at .*missing.json"):
        study.benchmark_table(tmp_path / "missing.json")
