"""The study layer: results store, certification runs, paper tables, figures, grid files."""

from __future__ import annotations

from dataclasses import replace
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from medcert_core import ABSTAIN
from medcert_core.certify import certified_radius as radius
from medcert_core import render
from medcert_core.study.report import figures, tables
from medcert_core.study.report import paper
from medcert_core.study.runs import store
from medcert_core.study.runs.assets import segmenter_path
from medcert_core.study.settings import DataSpec, TrainingSpec, training_spec
from medcert_core.study.experiment import Experiment, combine
from medcert_core.io import file_digest
from medcert_core.study.grid.local import is_done
from medcert_core.study.grid.spec import GridEntry, parse_grid
from medcert_core.study.runs.run import CertificationRun, ours, plain, segcertify
from medcert_core.study.workflow import fill_data_root

TINY_TRAINING = TrainingSpec(preset="tiny", epochs=1, ddpm_preset="tiny", ddpm_steps=2, unet_denoiser_steps=2)
TINY_DATA = DataSpec("phantom", None, 32, 0)


# --- store ---------------------------------------------------------------------------------------

def test_parameter_hash_ignores_key_order_and_sees_every_value():
    assert store.parameter_hash({"a": 1, "b": [1, 2]}) == store.parameter_hash({"b": [1, 2], "a": 1})
    assert store.parameter_hash({"a": 1}) != store.parameter_hash({"a": 2})
    assert len(store.parameter_hash({})) == 16


def test_a_run_is_complete_only_once_its_metadata_is_written(tmp_path, monkeypatch):
    rows = pd.DataFrame({"image_id": ["a"], "class_id": [1], "dice": [0.5]})
    maps = {"labels": np.zeros((1, 2, 2), dtype=np.int64)}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("crash before the metadata")

    monkeypatch.setattr(store, "write_json_atomically", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save_run(tmp_path, "abc", rows, maps, {"x": 1})
    assert not store.is_complete(tmp_path, "abc")
    assert store.aggregate(tmp_path).empty
    monkeypatch.undo()

    store.save_run(tmp_path, "abc", rows, maps, {"x": 1}, device="cpu")
    assert store.is_complete(tmp_path, "abc")
    assert store.load_metadata(tmp_path, "abc")["parameters"] == {"x": 1}
    assert set(store.load_metadata(tmp_path, "abc")["versions"]) >= {"torch", "numpy", "python"}
    np.testing.assert_array_equal(store.load_maps(tmp_path, "abc")["labels"], maps["labels"])
    aggregated = store.aggregate(tmp_path)
    assert aggregated["run"].tolist() == ["abc"] and aggregated["device"].tolist() == ["cpu"]
    assert pd.read_csv(tmp_path / store.AGGREGATE)["dice"].tolist() == [0.5]
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"


def test_the_aggregate_names_the_training_seed_of_every_run(tmp_path):
    rows = pd.DataFrame({"image_id": ["a"], "class_id": [1], "dice": [0.5]})
    maps = {"labels": np.zeros((1, 2, 2), dtype=np.int64)}
    split_seed = CertificationRun(DataSpec("phantom", None, 32, 3), TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    reseeded = CertificationRun(DataSpec("phantom", None, 32, 3), replace(TINY_TRAINING, training_seed=7), "unet",
                                ours("ddpm:auto"), 0.5)
    for run in (split_seed, reseeded):
        store.save_run(tmp_path, run.hash, rows, maps, run.parameters())
    seeds = dict(zip(*store.aggregate(tmp_path)[["run", "training_seed"]].T.values))
    assert seeds == {split_seed.hash: 3, reseeded.hash: 7}
    assert pd.read_csv(tmp_path / store.AGGREGATE)["training_seed"].tolist() == [seeds[run] for run in sorted(seeds)]


# --- runs ----------------------------------------------------------------------------------------

def test_run_hash_ignores_the_data_root_but_not_the_settings():
    run = CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    moved = CertificationRun(DataSpec("phantom", "/elsewhere", 32, 0), TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    assert run.hash == moved.hash
    for changed in (CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto", 4), 0.5),
                    CertificationRun(TINY_DATA, TINY_TRAINING, "unet", segcertify(), 0.5),
                    CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5, alpha=0.01)):
        assert changed.hash != run.hash


def test_a_split_block_is_in_the_key_only_when_set_so_existing_keys_stay_valid():
    run = CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    assert "split_block" not in run.parameters()["data"] and TINY_DATA.tag == "phantom_32"
    blocked_data = DataSpec("phantom", None, 32, 0, split_block=4)
    blocked = CertificationRun(blocked_data, TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    assert blocked.parameters()["data"]["split_block"] == 4 and blocked_data.tag == "phantom_32_blocks4"
    assert blocked.hash != run.hash


def test_run_hash_covers_the_numbers_version_not_the_source(monkeypatch):
    import medcert_core

    run = CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    before = run.hash
    monkeypatch.setattr(medcert_core, "NUMBERS_VERSION", medcert_core.NUMBERS_VERSION + 1)
    assert run.hash != before, "results computed by code that moves numbers are never served as current"
    assert run.key()["numbers_version"] == medcert_core.NUMBERS_VERSION
    assert "source" not in run.key(), "a refactor that moves no number keeps every stored run"


def test_method_labels_name_the_comparison():
    assert segcertify().label == "SegCertify"
    assert ours("ddpm:auto").label == "ours (ddpm, single-step)"
    assert ours("ddpm:auto", 4).label == "ours (ddpm, 4-step)"
    assert ours("unet:auto").label == "ours (unet)"
    assert ours("none").label == "ours (no denoiser)"
    assert plain(0.25).label == "plain (noise 0.25)"
    assert ours("ffdnet:weights.pth", note="off the shelf").label == "ours (ffdnet, off the shelf)"
    assert ours("ddpm:x", note="trained on jsrt").label == "ours (ddpm, trained on jsrt, single-step)"


def test_a_label_note_is_not_part_of_what_a_run_computes():
    """The note only names the row: same key with or without it, and two notes of one spec are equal methods."""
    plain_run = CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto"), 0.5)
    noted = CertificationRun(TINY_DATA, TINY_TRAINING, "unet", ours("ddpm:auto", note="this dataset"), 0.5)
    assert noted.hash == plain_run.hash and "note" not in noted.parameters()["method"]
    assert ours("ddpm:auto", note="a") == ours("ddpm:auto", note="b")


def test_paired_differences_against_a_direct_computation():
    """Means and intervals over images of (method - reference), per sigma and class, computed with numpy."""
    rng = np.random.default_rng(0)
    rows = []
    for image in range(12):
        for label, shift in (("ref", 0.0), ("better", 0.2), ("same", 0.0)):
            abstain = rng.uniform(0, 0.5)
            for class_id, name in ((0, "background"), (1, "lung"), (2, "heart")):
                dice = np.nan if (name == "heart" and image == 3) else rng.uniform(0.3, 0.7) + shift
                rows.append({"arch": "unet", "sigma": 0.5, "method_label": label, "class_id": class_id,
                             "class_name": name, "image_id": f"i{image}", "dice": dice, "abstain": abstain})
    frame = pd.DataFrame(rows)
    result = tables.paired_differences(frame, reference="ref", resamples=2000)
    assert set(result["method"]) == {"better", "same"} and set(result["class"]) == {"lung", "heart", "all %⊘"}
    for (method, name), group in result.groupby(["method", "class"]):
        row = group.iloc[0]
        column = "abstain" if name == "all %⊘" else "dice"
        pick = frame if name == "all %⊘" else frame[frame["class_name"] == name]
        pick = pick[pick["class_id"] > 0].drop_duplicates(["method_label", "image_id"]) if name == "all %⊘" else pick
        values = pick.pivot_table(index="image_id", columns="method_label", values=column, dropna=False)
        differences = (values[method] - values["ref"]).dropna()
        assert row["images"] == len(differences) == (11 if name == "heart" else 12)
        assert abs(row["mean"] - differences.mean()) < 1e-12
        standard_error = differences.std(ddof=0) / np.sqrt(len(differences))
        assert row["low"] < row["mean"] < row["high"]
        assert abs((row["high"] - row["low"]) - 2 * 1.96 * standard_error) < 0.6 * 2 * 1.96 * standard_error
    better_lung = result[(result["method"] == "better") & (result["class"] == "lung")].iloc[0]
    assert better_lung["ahead"] == "yes" and better_lung["low"] > 0
    assert set(result[result["method"] == "same"]["ahead"]) <= {"–", "yes", "no"}
    shown = tables.paired_table(result)
    assert list(shown.columns) == ["lung", "heart", "all %⊘"] and shown.loc[("unet", "better", 0.5), "lung"].startswith("+0.")
    one_image = tables.paired_differences(frame[frame["image_id"] == "i0"], reference="ref")
    assert one_image.empty and "no paired intervals" in tables.paired_table(one_image).iloc[0, 0]
    with pytest.raises(ValueError, match="reference 'absent' is not among the methods"):
        tables.paired_differences(frame, reference="absent")


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    """A phantom experiment at 32 px with 1-epoch models: every run computed once for this module."""
    folder = tmp_path_factory.mktemp("study")
    experiment = Experiment(profile="quick", dataset="phantom", image_size=32, sigmas=[0.5], n0=4, n=60,
                            test_images=2, results_dir=str(folder / "results"), cache_dir=str(folder / "cache"),
                            progress=False)
    return experiment


def test_certification_runs_are_stored_and_read_back(tiny_experiment, monkeypatch):
    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    methods = [plain(0.0), ours("none")]
    first = tiny_experiment.run(["unet"], methods)
    # 2 images x 4 classes, for the plain run (sigma 0) and the certified run (sigma 0.5)
    assert len(first) == 2 * 4 * 2
    certified = first[first["sigma"] == 0.5]
    assert certified["radius"].unique() == pytest.approx([0.5 * norm.ppf(0.75)])
    assert set(certified[["n0", "n", "alpha", "tau"]].drop_duplicates().itertuples(index=False)) == {(4, 60, 0.001, 0.75)}
    assert (first[first["sigma"] == 0]["abstain"] == 0).all(), "a plain prediction never abstains"
    assert {"dice", "iou", "abstain", "seconds", "arch", "dataset", "seed", "denoiser"} <= set(first.columns)
    assert set(first["run"]) == {run.hash for run in tiny_experiment.runs(["unet"], methods)}

    def must_not_compute(*args, **kwargs):
        raise AssertionError("a completed run was computed again")

    monkeypatch.setattr("medcert_core.study.runs.run.compute", must_not_compute)
    again = tiny_experiment.run(["unet"], methods)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)

    maps = tiny_experiment.maps("unet", ours("none"), 0.5)
    assert maps["labels"].shape == (2, 32, 32) and maps["noisy"].shape == (2, 3, 32, 32)
    assert set(np.unique(maps["labels"])) <= {ABSTAIN, 0, 1, 2, 3}
    figure = figures.abstention_figure(tiny_experiment, "unet", [ours("none")])
    assert [trace.type for trace in figure.data] == ["image"] * 3  # noisy, ground truth, one method
    assert tiny_experiment.cache_path.joinpath("segmenters").is_dir()
    expected = segmenter_path(tiny_experiment.cache_path, tiny_experiment.data, TINY_TRAINING, "unet", 0.0)
    assert expected.is_file()


def test_plain_dice_by_split_scores_a_model_of_each_split_on_its_own_whole_test_split(tiny_experiment, monkeypatch):
    """The CVC chapter's leakage check: a blocked and a random split, each with its own segmenter and all of
    its test images (not the chapter's first few), mean Dice per foreground class with its interval."""
    import dataclasses

    from medcert_core.data import split_ids
    from medcert_core.study.chapter import DatasetChapter

    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    chapter = DatasetChapter(dataclasses.replace(tiny_experiment, split_block=3), ("unet",), "none")
    table = chapter.plain_dice_by_split()
    assert list(table.index.get_level_values("split").unique()) == ["blocked (3 ids)", "random"]
    assert list(table.index.get_level_values("class").unique()) == ["lung", "heart", "clavicle"]
    all_ids = tiny_experiment.data.load("all").ids
    for (name, block), experiment in zip((("blocked (3 ids)", 3), ("random", 0)), chapter.split_experiments().values()):
        assert experiment.split_block == block and experiment.test_images is None
        assert list(experiment.data.load("test").ids) == split_ids(all_ids, "test", 0, block)
        rows = experiment.run(["unet"], [plain(0.0)])
        for class_name, group in rows[rows["class_id"] > 0].groupby("class_name"):
            shown = table.loc[(name, class_name)]
            assert shown["Dice"] == pytest.approx(group["dice"].mean())
            assert shown["test images"] == group["dice"].notna().sum()
            assert shown["low"] <= shown["Dice"] <= shown["high"]
    assert set(split_ids(all_ids, "test", 0, 3)) != set(split_ids(all_ids, "test", 0, 0))
    unblocked = DatasetChapter(tiny_experiment, ("unet",), "none")
    assert list(unblocked.split_experiments()) == ["random"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:n = 60 draws cannot certify")
def test_architectures_behind_one_denoiser_share_their_draws_and_get_their_own_numbers(tiny_experiment, tmp_path,
                                                                                      monkeypatch):
    """run_all certifies the missing runs of one (data, method, sigma) together (one set of denoised draws
    per image); each stored run equals that run computed alone."""
    from medcert_core.study.runs import run as runs

    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    method = ours("unet:auto")
    group = [tiny_experiment.certification_run(arch, method, 0.5) for arch in ("unet", "resunetpp")]
    results = tmp_path / "results"
    options = {"results_dir": results, "cache": tiny_experiment.cache_path, "device": "cpu", "progress": False}
    computed_alone = []
    real_compute = runs.compute
    monkeypatch.setattr(runs, "compute", lambda run, *a, **k: computed_alone.append(run.arch) or real_compute(run, *a, **k))
    together = runs.run_all(group, **options)
    assert computed_alone == [], "computed together, not one by one"
    hashes = [run.hash for run in group]
    for run, run_hash in zip(group, hashes):
        metadata = store.load_metadata(results, run_hash)
        assert metadata["shared_draws_with"] == [other for other in hashes if other != run_hash]
        alone = real_compute(run, tiny_experiment.cache_path, device="cpu", progress=False)
        stored = store.load_rows(results, run_hash)
        pd.testing.assert_frame_equal(stored.drop(columns="seconds"), alone.rows.drop(columns="seconds"),
                                      check_dtype=False)
        pd.testing.assert_frame_equal(store.load_curves(results, run_hash), alone.curves, check_dtype=False)
    assert set(together["arch"]) == {"unet", "resunetpp"}


@pytest.mark.filterwarnings("ignore:n = 60 draws cannot certify")
def test_radius_curve_certifies_the_runs_own_draws_at_every_tau(tiny_experiment, monkeypatch):
    import torch

    from medcert_core.smoothing import image_seed
    from medcert_core.study.runs.run import curve_taus, smoothed_segmenter

    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    method = ours("none")
    rows, curves = tiny_experiment.run(["unet"], [method]), tiny_experiment.curves(["unet"], [method])
    taus = curve_taus(0.75)
    assert sorted(curves["tau"].unique()) == list(taus) and len(curves) == 2 * 4 * len(taus)
    assert curves["radius"].to_numpy() == pytest.approx(0.5 * norm.ppf(curves["tau"].to_numpy()))
    at_run_tau = curves[curves["tau"] == 0.75].reset_index(drop=True)
    for column in ("image_id", "class_id", "dice", "iou", "abstain"):  # at the run's tau: the run's own rows
        assert at_run_tau[column].tolist() == rows[column].tolist()
    # each tau: what a fresh certificate of the same draws (same image seed) gives, computed independently
    run = tiny_experiment.certification_run("unet", method, 0.5)
    smoothed, _ = smoothed_segmenter(run, tiny_experiment.cache_path, torch.device("cpu"))
    test_set = run.data.load("test")
    image, _ = test_set[1]
    for tau in (0.55, 0.65, 0.9):
        generator = torch.Generator().manual_seed(image_seed(run.data.seed, test_set.ids[1]))
        certificate = smoothed.certify(image, run.n0, run.n, tau=tau, alpha=run.alpha, generator=generator)
        row = curves[(curves["tau"] == tau) & (curves["image_id"].astype(str) == str(test_set.ids[1]))].iloc[0]
        assert row["abstain"] == pytest.approx(certificate.abstain_fraction)
    # Holm is monotone in the p-values: abstention never falls as tau (and R) rises
    per_image = curves.drop_duplicates(["image_id", "tau"]).sort_values("tau").groupby("image_id")["abstain"]
    assert all(series.is_monotonic_increasing for _, series in per_image)
    assert (curves.groupby("tau")["abstain"].mean().diff().dropna() > 0).any(), "the curve must move with tau"
    aggregate = pd.read_csv(tiny_experiment.results_path / store.AGGREGATE_CURVES)
    assert len(aggregate[aggregate["run"] == run.hash]) == len(curves)
    pixels = image.shape[-1] * image.shape[-2]  # each tau: can n draws certify any pixel (tau^n <= alpha / pixels)?
    expected = {tau: tau ** run.n <= run.alpha / pixels for tau in taus}
    assert curves.groupby("tau")["reachable"].all().to_dict() == expected
    assert not all(expected.values()) and any(expected.values()), "the tiny run's grid has both kinds"
    assert (curves[~curves["reachable"]]["abstain"] == 1.0).all(), "an unreachable tau abstains everywhere"


def test_paired_differences_over_training_seeds_resample_seeds_and_images():
    """With several training seeds the interval is the two-level bootstrap of the (seeds, images) matrix of
    differences, and one seed gives exactly the images-only interval."""
    from medcert_core.metrics import seeds_and_images_bootstrap_interval

    rng = np.random.default_rng(1)
    rows = []
    for seed, seed_shift in ((0, -0.1), (1, 0.05), (2, 0.1)):
        for image in range(8):
            for label, shift in (("ref", 0.0), ("other", seed_shift)):
                dice = rng.uniform(0.4, 0.6) + shift
                for class_id, name in ((0, "background"), (1, "lung")):
                    rows.append({"arch": "unet", "sigma": 0.5, "method_label": label, "class_id": class_id,
                                 "class_name": name, "image_id": f"i{image}", "training_seed": seed,
                                 "dice": dice if class_id else np.nan, "abstain": 0.1})
    frame = pd.DataFrame(rows)
    row = tables.paired_differences(frame, reference="ref", resamples=500).query("`class` == 'lung'").iloc[0]
    lung = frame[frame["class_name"] == "lung"].pivot_table(index=["training_seed", "image_id"],
                                                            columns="method_label", values="dice")
    matrix = (lung["other"] - lung["ref"]).unstack("image_id").to_numpy()
    expected = seeds_and_images_bootstrap_interval(matrix, resamples=500)
    assert (row["low"], row["high"], row["seeds"], row["images"]) == (expected["low"], expected["high"], 3, 8)
    assert row["seed_spread"] == pytest.approx(expected["seed_spread"]) and row["seed_spread"] > 0.05
    single = tables.paired_differences(frame[frame["training_seed"] == 1], reference="ref", resamples=500)
    alone = tables.paired_differences(frame[frame["training_seed"] == 1].drop(columns="training_seed"),
                                      reference="ref", resamples=500)
    pd.testing.assert_frame_equal(single, alone)
    shown = tables.paired_table(tables.paired_differences(frame, reference="ref", resamples=500))
    assert shown.loc[("unet", "other", 0.5), "lung"].endswith(f" sd {expected['seed_spread']:.2f}")
    assert " sd " not in tables.paired_table(single).loc[("unet", "other", 0.5), "lung"]
    assert "seeds" not in single


def test_the_seeds_table_gives_each_seeds_mean_and_their_spread():
    rows = [{"arch": "unet", "sigma": 0.5, "method_label": "ours", "class_id": 1, "class_name": "lung",
             "image_id": f"i{image}", "training_seed": seed, "dice": dice}
            for seed, dices in ((0, (0.8, 0.6)), (4, (0.9, 0.9))) for image, dice in enumerate(dices)]
    table = tables.seeds_table(pd.DataFrame(rows))
    row = table.loc[("ours", "unet", 0.5)]
    assert row[("lung", "seed 0")] == pytest.approx(0.7) and row[("lung", "seed 4")] == pytest.approx(0.9)
    assert row[("lung", "mean")] == pytest.approx(0.8) and row[("lung", "sd")] == pytest.approx(np.std([0.7, 0.9], ddof=1))


def test_run_seeds_repeats_the_runs_with_models_of_each_training_seed(monkeypatch):
    calls = []

    def fake_run(experiment, archs, methods):
        calls.append(experiment.training.training_seed)
        return pd.DataFrame({"arch": list(archs), "dice": [0.5]})

    monkeypatch.setattr(Experiment, "run", fake_run)
    experiment = Experiment(sigmas=[0.25], seed=0, training_overrides={"epochs": 1})
    frame = experiment.run_seeds(["unet"], [segcertify()], seeds=[0, 1, 2])
    assert calls == [None, 1, 2], "the split's seed keeps its runs' keys (no training_seed named)"
    assert list(frame["training_seed"]) == [0, 1, 2]
    assert experiment.with_training_seed(2).training.epochs == 1, "the other overrides stay"


def test_paired_differences_between_architectures_against_a_direct_computation():
    """between="arch": per method, sigma and class, the mean of (arch - reference arch) over images."""
    rng = np.random.default_rng(1)
    rows = []
    for image in range(10):
        for arch, shift in (("unet", 0.0), ("resunetpp", -0.1), ("deeplabv2", 0.05)):
            for class_id, name in ((0, "background"), (1, "lung")):
                rows.append({"arch": arch, "sigma": 0.25, "method_label": "ours", "class_id": class_id,
                             "class_name": name, "image_id": f"i{image}", "dice": rng.uniform(0.5, 0.9) + shift,
                             "abstain": rng.uniform(0, 0.2)})
    frame = pd.DataFrame(rows)
    result = tables.paired_differences(frame, reference="unet", between="arch", resamples=2000)
    assert set(result["arch"]) == {"resunetpp", "deeplabv2"} and set(result["method"]) == {"ours"}
    assert set(result["reference"]) == {"unet"}
    lung = frame[frame["class_name"] == "lung"].pivot_table(index="image_id", columns="arch", values="dice")
    for arch in ("resunetpp", "deeplabv2"):
        row = result[(result["arch"] == arch) & (result["class"] == "lung")].iloc[0]
        assert abs(row["mean"] - (lung[arch] - lung["unet"]).mean()) < 1e-12 and row["images"] == 10
    with pytest.raises(ValueError, match="reference 'vit' is not among the architectures"):
        tables.paired_differences(frame, reference="vit", between="arch")
    with pytest.raises(ValueError, match="between must be"):
        tables.paired_differences(frame, reference="unet", between="sigma")


def test_dice_against_radius_has_one_line_per_method_and_sigma():
    curves = pd.DataFrame([
        {"method_label": method, "arch": "unet", "class_name": name, "class_id": class_id, "sigma": sigma,
         "tau": tau, "radius": radius(sigma, tau), "image_id": image, "dice": dice, "abstain": 0.1}
        for method, offset in (("ours", 0.0), ("SegCertify", 0.2)) for sigma in (0.25, 0.5)
        for tau in (0.6, 0.9) for class_id, name in ((0, "background"), (1, "lung"))
        for image, dice in (("a", 0.9 - offset - tau / 2), ("b", 0.7 - offset - tau / 2))])
    figure = figures.dice_against_radius(curves)
    assert len(figure.data) == 2 * 2  # (2 methods x 2 sigmas) lines in the one foreground panel
    ours_025 = next(trace for trace in figure.data if trace.name == "ours · unet, σ 0.25")
    assert list(ours_025.x) == pytest.approx([radius(0.25, 0.6), radius(0.25, 0.9)])
    assert list(ours_025.y) == pytest.approx([0.8 - 0.3, 0.8 - 0.45])
    table = tables.radius_curve_table(curves)
    assert table.loc[("SegCertify", "unet", 0.5, 0.9, round(radius(0.5, 0.9), 3)), "lung"] == pytest.approx(0.15)
    assert table["%⊘ all"].unique() == pytest.approx([10.0])

    curves["reachable"] = curves["tau"] < 0.8  # tau 0.9: n cannot reach it, every pixel abstains by construction
    figure = figures.dice_against_radius(curves)
    assert all(list(trace.x) == pytest.approx([radius(float(trace.name[-4:]), 0.6)]) for trace in figure.data)
    assert "not drawn: tau = 0.9" in figure.layout.annotations[-1].text
    table = tables.radius_curve_table(curves)
    unreachable = table.xs(0.9, level="τ")
    assert unreachable["lung"].isna().all() and (unreachable["n reaches τ"] == "no").all()
    assert (table.xs(0.6, level="τ")["n reaches τ"] == "yes").all()


def test_experiment_reads_a_notebook_namespace():
    namespace = {"profile": "jsrt", "dataset": "jsrt", "image_size": [288, 384], "archs": ["unet"], "sigmas": [1.0],
                 "unrelated": object()}
    experiment = Experiment.from_parameters(namespace)
    assert experiment.profile == "jsrt" and experiment.sigmas == [1.0]
    assert experiment.data.image_size == (288, 384) and experiment.data.tag == "jsrt_288x384"
    with pytest.raises(ValueError, match="profile must be one of"):
        Experiment(profile="fast")


# --- tables and figures --------------------------------------------------------------------------

def tidy(rows: list[tuple]) -> pd.DataFrame:
    """(method_label, sigma, image_id, class_id, dice, iou, abstain_in_class, abstain) -> a tidy frame."""
    names = ["background", "lung", "heart"]
    frame = pd.DataFrame(rows, columns=["method_label", "sigma", "image_id", "class_id", "dice", "iou",
                                        "abstain_in_class", "abstain"])
    frame["class_name"] = [names[i] for i in frame["class_id"]]
    frame["arch"] = "unet"
    frame["radius"] = [radius(s, 0.75) for s in frame["sigma"]]
    return frame


def test_paper_table_averages_per_image_in_the_papers_layout():
    frame = tidy([
        ("ours", 0.5, "a", 0, 0.99, 0.98, 0.0, 0.10), ("ours", 0.5, "a", 1, 0.8, 0.6, 0.2, 0.10),
        ("ours", 0.5, "a", 2, 0.6, 0.4, 0.1, 0.10), ("ours", 0.5, "b", 1, 1.0, 1.0, 0.0, 0.30),
        ("ours", 0.5, "b", 2, np.nan, np.nan, 0.0, 0.30),
    ])
    table = tables.paper_table(frame)
    assert list(table.columns) == [("lung", "Dice"), ("lung", "IoU"), ("lung", "%⊘"), ("heart", "Dice"),
                                   ("heart", "IoU"), ("heart", "%⊘"), ("all", "%⊘")]
    row = table.loc[("ours", "unet", 0.5, round(radius(0.5, 0.75), 3))]  # R shown to 3 decimals
    assert row[("lung", "Dice")] == pytest.approx(0.9) and row[("lung", "IoU")] == pytest.approx(0.8)
    assert row[("heart", "Dice")] == pytest.approx(0.6), "a NaN (class absent) is skipped, not counted as 0"
    assert row[("lung", "%⊘")] == pytest.approx(0.1)
    assert row[("all", "%⊘")] == pytest.approx(0.2)
    html = tables.table_html(table)
    assert "<table" in html and "medcert-results" in html and "20.00" in html  # all %⊘ shown in percent


def test_dice_against_sigma_has_one_panel_per_class_and_one_line_per_method():
    frame = tidy([(method, sigma, "a", c, 0.9 - sigma / 2, 0.8, 0.0, 0.0)
                  for method in ("ours", "SegCertify") for sigma in (0.25, 0.5, 1.0) for c in (0, 1, 2)])
    figure = figures.dice_against_sigma(frame)
    assert len(figure.data) == 2 * 2  # 2 methods x 2 foreground classes
    assert sorted({trace.name for trace in figure.data}) == ["SegCertify · unet", "ours · unet"]
    assert list(figure.data[0].y) == pytest.approx([0.775, 0.65, 0.4])
    assert "R 0.67" in figure.layout.xaxis.ticktext[-1]


def test_ranking_per_sigma_averages_classes_then_ranks_the_methods():
    frame = tidy([(method, sigma, image, c, dice, 0.0, 0.0, 0.0)
                  for method, base in (("ours", 0.8), ("SegCertify", 0.6)) for sigma in (0.25, 1.0)
                  for image, shift in (("a", 0.0), ("b", 0.1)) for c, dice in
                  ((0, 0.99), (1, base + shift - sigma / 4), (2, base - 0.2 * (method == "ours" and sigma == 1.0)))])
    table = tables.ranking_per_sigma(frame)
    # ours at sigma 1: class 1 mean (0.55 + 0.65) / 2 = 0.60, class 2 0.60 -> 0.60; SegCertify: 0.40 and 0.60 -> 0.50
    assert table.loc[1.0].index.tolist() == ["ours", "SegCertify"]
    assert table.loc[1.0]["mean certified Dice"].tolist() == pytest.approx([0.60, 0.50])
    assert table.loc[1.0]["gap to best"].tolist() == pytest.approx([0.0, -0.10])
    assert table.loc[0.25]["rank"].tolist() == [1, 2]


def test_abstained_pixels_are_white_and_background_black():
    labels = np.array([[0, 1], [ABSTAIN, 2]])
    rgb = render.colour_labels(labels)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() != rgb[1, 1].tolist()
    assert render.png_data_uri(rgb).startswith("data:image/png;base64,")


def test_next_to_paper_subtracts_the_papers_value():
    rows = []
    for image, dice in (("a", 0.90), ("b", 0.96)):
        for class_id, name in enumerate(("background", "lung", "heart", "clavicle")):
            rows.append({"method": "ours", "train_noise": 0.0, "arch": "resunetpp", "sigma": 0.25, "image_id": image,
                         "class_id": class_id, "class_name": name, "dice": dice, "iou": dice - 0.1, "abstain": 0.03, "abstain_in_class": 0.0})
    table = paper.next_to_paper(pd.DataFrame(rows), "jsrt_table1")
    assert len(table) == 1, "only the rows this study ran"
    row = table.iloc[0]
    assert row[("lung", "Dice", "here")] == pytest.approx(0.93)
    assert row[("lung", "Dice", "paper")] == pytest.approx(0.95)  # Table 1, ResUNet++, sigma 0.25
    assert row[("lung", "Dice", "Δ")] == pytest.approx(-0.02)
    assert row[("all", "%⊘", "paper")] == pytest.approx(5.0) and row[("all", "%⊘", "here")] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="jsrt_table1"):
        paper.paper_reference("table9")


@pytest.mark.parametrize(("key", "arch", "sigma", "dice", "abstain"), [
    ("montgomery_table1", "resunetpp", 0.25, 0.96, 2.0), ("shenzhen_table1", "deeplabv2", 0.5, 0.34, 15.0)])
def test_next_to_paper_names_a_binary_sets_foreground_as_the_papers_lung(key, arch, sigma, dice, abstain):
    rows = [{"method": "ours", "train_noise": 0.0, "arch": arch, "sigma": sigma, "image_id": "a", "class_id": class_id,
             "class_name": name, "dice": 0.9, "iou": 0.8, "abstain": 0.05, "abstain_in_class": 0.0}
            for class_id, name in enumerate(("background", "foreground"))]
    table = paper.next_to_paper(pd.DataFrame(rows), key, classes={"foreground": "lung"})
    row = table.loc[("ours", 0.0, arch, sigma)]
    assert row[("lung", "Dice", "paper")] == pytest.approx(dice)  # Table 1's lung column of that set
    assert row[("lung", "Dice", "here")] == pytest.approx(0.9) and row[("lung", "Dice", "Δ")] == pytest.approx(0.9 - dice)
    assert row[("all", "%⊘", "paper")] == pytest.approx(abstain) and row[("all", "%⊘", "here")] == pytest.approx(5.0)
    assert list(table.columns.get_level_values(0).unique()) == ["lung", "all"]


def test_next_to_paper_sets_a_row_of_unknown_sigma_beside_every_sigma_this_study_ran():
    """Table 3's CVC column has no legible sigma: its one value per method stands beside each sigma run."""
    rows = [{"method": method, "train_noise": noise, "arch": "resunetpp", "sigma": sigma, "image_id": "a",
             "class_id": class_id, "class_name": name, "dice": dice, "iou": dice - 0.1, "abstain": 0.05,
             "abstain_in_class": 0.0}
            for method, noise, dice in (("ours", 0.0, 0.5), ("segcertify", 0.25, 0.2))
            for sigma in (0.25, 1.0) for class_id, name in enumerate(("background", "polyp"))]
    table = paper.next_to_paper(pd.DataFrame(rows), "cvc_table3")
    assert sorted(table.index) == [("ours", 0.0, "resunetpp", 0.25), ("ours", 0.0, "resunetpp", 1.0),
                                   ("segcertify", 0.25, "resunetpp", 0.25), ("segcertify", 0.25, "resunetpp", 1.0)]
    paper_dice = table[("polyp", "Dice", "paper")]
    assert [paper_dice.loc[(method, noise, "resunetpp", sigma)] for method, noise in (("ours", 0.0), ("segcertify", 0.25))
            for sigma in (0.25, 1.0)] == pytest.approx([0.45, 0.45, 0.15, 0.15])
    assert table.loc[("segcertify", 0.25, "resunetpp", 1.0), ("polyp", "Dice", "Δ")] == pytest.approx(0.05)
    assert table.loc[("ours", 0.0, "resunetpp", 0.25), ("all", "%⊘", "paper")] == pytest.approx(7.0)


def test_combine_keeps_each_runs_rows_once():
    a = pd.DataFrame({"run": ["x", "x"], "image_id": ["1", "1"], "class_id": [0, 1]})
    assert len(combine(a, a)) == 2


# --- grid files ----------------------------------------------------------------------------------

@pytest.fixture
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("phantom", "jsrt"):
        (folder / f"{name}.ipynb").write_text("{}")
    return folder


def test_grid_expands_sweeps_and_turns_widgets_off(notebooks):
    entries = parse_grid({"parameters": {"profile": "quick", "n": 100},
                          "runs": [{"notebook": "phantom"},
                                   {"notebook": "jsrt", "parameters": {"n": 50}, "sweep": {"alpha": [0.001, 0.01]}}]},
                         notebooks_dir=notebooks)
    assert [entry.output for entry in entries] == ["phantom", "jsrt-alpha=0.001", "jsrt-alpha=0.01"]
    assert entries[0].parameters == {"profile": "quick", "n": 100, "interactive": False}
    assert entries[2].parameters == {"profile": "quick", "n": 50, "alpha": 0.01, "interactive": False}
    assert len({entry.hash for entry in entries}) == 3


@pytest.mark.parametrize("spec, message", [
    ({"runs": []}, "non-empty list"),
    ({"runs": [{"notebook": "nope"}]}, r"no notebook 'nope'.*\['jsrt', 'phantom'\]"),
    ({"runs": [{"notebook": "jsrt", "colour": 1}]}, "unknown keys"),
    ({"run": [{"notebook": "jsrt"}]}, "unknown keys"),
    ({"runs": [{"notebook": "jsrt"}, {"notebook": "jsrt"}]}, "distinct 'output:'"),
    ({"runs": [{"notebook": "jsrt", "sweep": {"n": 5}}]}, "non-empty list"),
])
def test_bad_grids_are_explained(notebooks, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(spec, "grid.yaml", notebooks)


def test_an_entry_is_done_only_with_the_same_hash_in_book_and_store(tmp_path):
    entry = GridEntry("phantom", "phantom", {"n": 100})
    book, results = tmp_path / "book", tmp_path / "results"
    book.mkdir()
    results.mkdir()
    (book / "phantom.ipynb").write_text(json.dumps({"metadata": {"medcert": {"parameters_hash": entry.hash}}}))
    assert not is_done(entry, book, results), "a committed chapter alone does not count: the store must have it"
    (results / "grid_state.json").write_text(json.dumps({"phantom": entry.hash}))
    assert is_done(entry, book, results)
    assert not is_done(GridEntry("phantom", "phantom", {"n": 50}), book, results)


def test_grid_data_roots_are_filled_in_relative_to_the_project(tmp_path):
    from medcert_core.study.workflow import prepare_entries

    root = Path(__file__).resolve().parents[1]
    grid = tmp_path / "grid.yaml"
    grid.write_text("parameters: {data_root: '{data_root}/jsrt', profile: jsrt}\nruns:\n  - notebook: jsrt\n")
    (entry,) = prepare_entries(grid, data_root=str(root.parent / "shared" / "data"), root=root)
    assert entry.parameters["data_root"] == "../shared/data/jsrt"


def test_data_root_placeholders_need_a_data_root():
    assert fill_data_root("{data_root}/jsrt", "/data", "g.yaml") == "/data/jsrt"
    assert fill_data_root(["a", 1], None, "g.yaml") == ["a", 1]
    with pytest.raises(ValueError, match="--data-root"):
        fill_data_root("{data_root}/jsrt", None, "g.yaml")


def test_live_recertification_shows_each_method(tiny_experiment, monkeypatch):
    from medcert_core.study.report import live

    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    methods = [plain(0.0), ours("none")]
    panel = live.certify_panel(tiny_experiment, "unet", methods, index=1, sigma=0.5)
    figure = figures.abstention_maps({0.5: panel}, [method.label for method in methods])
    assert [trace.type for trace in figure.data] == ["image"] * 4
    assert [annotation.text for annotation in figure.layout.annotations][:4] == [
        "noisy input", "ground truth", "plain (noise 0)", "ours (no denoiser)"]


def test_live_certificate_of_an_image_is_its_stored_runs(tiny_experiment, monkeypatch):
    from medcert_core.study.report import live

    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    method = ours("none")
    tiny_experiment.run(["unet"], [method])
    stored = tiny_experiment.maps("unet", method, 0.5)["labels"]
    for index in (0, 1):  # the same per-image noise seed as the stored run
        panel = live.certify_panel(tiny_experiment, "unet", [method], index=index, sigma=0.5)
        assert (panel[method.label][0] == stored[index]).all()


def test_placeholders_fill_only_missing_chapters_that_have_a_template(tmp_path):
    import nbformat

    from medcert_core.study.report.book import toc_files, write_placeholders

    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n  - caption: Results\n    chapters:\n"
        "      - file: book/phantom\n      - file: book/jsrt\n      - file: book/notes\n"
        "      - file: book/jsrt_256\n      - file: book/phantom_extra_jsrt\n")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    executed = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# JSRT, executed")])
    nbformat.write(executed, str(tmp_path / "book" / "jsrt.ipynb"))
    templates = tmp_path / "notebooks"
    templates.mkdir()
    for name in ("phantom", "jsrt"):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name} chapter\n\ntext")]),
                       str(templates / f"{name}.ipynb"))

    (templates / "phantom_extra.ipynb").write_bytes((templates / "phantom.ipynb").read_bytes())
    assert toc_files(tmp_path) == ["book/intro", "book/phantom", "book/jsrt", "book/notes", "book/jsrt_256",
                                   "book/phantom_extra_jsrt"]
    written = write_placeholders(tmp_path, templates)
    assert written == [tmp_path / "book" / name for name in ("phantom.ipynb", "jsrt_256.ipynb", "phantom_extra_jsrt.ipynb")]
    # a grid entry's output name: the longest template it extends
    assert "notebook: jsrt, output: jsrt_256" in nbformat.read(str(written[1]), as_version=4).cells[0].source
    assert "notebook: phantom_extra, output: phantom_extra_jsrt" in nbformat.read(str(written[2]), as_version=4).cells[0].source
    placeholder = nbformat.read(str(written[0]), as_version=4)
    assert placeholder.cells[0].source.startswith("# phantom chapter")
    assert "notebooks/phantom.ipynb" in placeholder.cells[0].source
    assert nbformat.read(str(tmp_path / "book" / "jsrt.ipynb"), as_version=4).cells[0].source == "# JSRT, executed"


def test_overlay_paints_abstentions_white_over_a_grey_image():
    from medcert_core.single_image import overlay

    image = np.full((3, 2, 2), 0.5, dtype=np.float32)
    labels = np.array([[0, 1], [ABSTAIN, 2]])
    rgb = overlay(image, labels)
    assert rgb[0, 0].tolist() == [128, 128, 128], "background keeps the image"
    assert rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() != [128, 128, 128] and rgb[0, 1].tolist() != rgb[1, 1].tolist()


def test_differences_from_paper_state_settings_and_numbers():
    from types import SimpleNamespace

    rows = []
    # three images: ours leads on the lung on every image, ties the heart (+0.05 / -0.05 / 0 around
    # SegCertify's 0.5: the interval holds 0) and trails on the clavicle on every image
    for method, noise, sigma, lung in (("ours", 0.0, 1.0, 0.80), ("segcertify", 0.25, 1.0, 0.10),
                                       ("plain", 0.0, 0.0, 0.96), ("plain", 0.25, 0.0, 0.90)):
        for image, wobble in zip("abc", (0.05, -0.05, 0.0)):
            for class_id, name in enumerate(("background", "lung", "heart", "clavicle")):
                dice = {"lung": lung, "heart": 0.5 + (wobble if method == "ours" else 0.0),
                        "clavicle": 0.3 if method == "segcertify" else 0.2}.get(name, 0.99)
                rows.append({"method": method, "method_label": method, "train_noise": noise, "arch": "resunetpp",
                             "sigma": sigma, "image_id": image, "class_id": class_id, "class_name": name, "dice": dice,
                             "iou": dice, "abstain": 0.1, "abstain_in_class": 0.0})
    frame = pd.DataFrame(rows)
    test_split = list(range(49))
    experiment = SimpleNamespace(profile="jsrt", image_size=128, dataset="jsrt", test_images=10, seed=0,
                                 training=training_spec("jsrt"),
                                 data=SimpleNamespace(dataset="jsrt", load=lambda split: test_split, image_size=128))
    text = paper.differences_from_paper(experiment, "ddpm:auto", frame[frame["method"] == "ours"], frame)
    assert "128 × 128 px instead of 512 × 512" in text
    assert "3000 steps, at 64 × 64 px, EMA weights (0.999), 50% of its timesteps near the study's t*" in text
    assert "ADM" in text
    assert "first 10 of the 49 test images" in text
    # ResUNet++ at sigma 1 in Table 1: lung 0.90, heart 0.87, clavicle 0.28
    assert "lung -0.10, heart -0.37, clavicle -0.08" in text
    assert "**Largest difference.** heart with resunetpp at σ = 1: certified Dice 0.50 here against 0.87 in the paper (below it)" in text
    above = frame.assign(dice=frame["dice"].where(~((frame["class_name"] == "clavicle") & (frame["method"] == "ours")), 0.9))
    text_above = paper.differences_from_paper(experiment, "ddpm:auto", above[above["method"] == "ours"], above)
    assert "clavicle with resunetpp at σ = 1: certified Dice 0.90 here against 0.28 in the paper (above it)" in text_above, \
        "the largest difference either way, not the most negative one"
    assert "from 0.96 to 0.90 (paper: 0.97 to 0.91)" in text
    assert ("σ = 1.** By the paired 95 % interval over the test images (3 or more per pair), ours' certified Dice "
            "is ahead on 1, tied (the interval holds 0) on 1 and behind on 1 of 3 (architecture, class) pairs "
            "(tied: resunetpp heart +0.00 [-0.05, +0.05]; behind: resunetpp clavicle -0.10 [-0.10, -0.10])."
            ) in text, "counted by the paired intervals, not by a margin of the means"
    seeded = pd.concat([frame.assign(training_seed=seed) for seed in (0, 1)])
    seeded_text = " ".join(paper.segcertify_against_ours(seeded))
    assert "By the paired 95 % interval over 2 training seeds and the test images (3 or more per pair)" in seeded_text, \
        "with repeated trainings the interval resamples seeds too, and the sentence says so"
    assert "at most 60 epochs, stopped after 8 without a better validation Dice, the best kept" in text
    assert "parameters: resunetpp 2.3 M" in text and "(0.6 M parameters)" in text and "ADM checkpoint (552.8 M)" in text


def test_grid_hash_covers_the_template_bytes_and_the_source_but_not_the_device(notebooks, monkeypatch):
    from medcert_core.study.grid import spec as grid

    spec = {"parameters": {"n": 100}, "runs": [{"notebook": "phantom"}]}
    (entry,) = parse_grid(spec, "grid.yaml", notebooks)
    template = notebooks / "phantom.ipynb"
    assert entry.template_digest == file_digest(template)
    template.write_text(template.read_text().replace("}", "} ", 1))  # same name, other bytes
    (edited,) = parse_grid(spec, "grid.yaml", notebooks)
    assert edited.hash != entry.hash
    on_gpu = GridEntry(entry.notebook, entry.output, {**entry.parameters, "device": "cuda"}, entry.template_digest)
    assert on_gpu.hash == entry.hash, "the device is recorded per run, it does not re-execute a chapter"
    before = entry.hash
    monkeypatch.setattr(grid.medcert_core, "NUMBERS_VERSION", grid.medcert_core.NUMBERS_VERSION + 1)
    assert entry.hash != before, "a new numbers version re-executes the chapter"


def test_a_changed_profile_changes_the_grid_hash(monkeypatch):
    from medcert_core.study.grid import spec as grid

    entry = GridEntry("phantom", "phantom", {"profile": "quick"})
    before = entry.hash
    monkeypatch.setitem(grid.PROFILES, "quick", TrainingSpec(epochs=99))
    assert entry.hash != before


@pytest.mark.parametrize("template", sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")),
                         ids=lambda path: path.stem)
def test_chapter_templates_are_thin_with_one_parameters_cell(template):
    import ast

    import nbformat

    notebook = nbformat.read(str(template), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters`"
    names = {target.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)
             for target in node.targets}
    assert {"profile", "dataset", "data_root", "sigmas", "n0", "n", "alpha", "tau", "image_size", "test_images",
            "seed", "device", "denoiser", "interactive"} <= names
    assert names & {"arch", "archs"}
    for cell in code:
        tree = ast.parse(cell.source)
        assert not [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))], \
            "logic belongs in medcert_core.study, not in a chapter"
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert all(module.startswith("medcert_core") for module in modules), modules
    assert all(not cell.outputs for cell in code), "templates are committed without outputs"


@pytest.mark.parametrize("grid_file", sorted((Path(__file__).resolve().parents[1] / "grids").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_every_committed_grid_is_valid(grid_file):
    from medcert_core.study.workflow import prepare_entries, results_dir_of

    root = grid_file.parents[1]
    entries = prepare_entries(grid_file, data_root="/data", device="cpu", root=root)
    assert entries and all(entry.parameters["device"] == "cpu" for entry in entries)
    assert all(entry.parameters["interactive"] is False for entry in entries)
    assert not [value for entry in entries for value in map(str, entry.parameters.values()) if "{data_root}" in value]
    assert results_dir_of(entries, root) == root / "runs" / "results"


def test_only_keeps_the_named_entries_in_grid_order_and_names_the_valid_outputs():
    from medcert_core.study.workflow import only_entries, prepare_entries

    root = Path(__file__).resolve().parents[1]
    entries = prepare_entries(root / "grids" / "jsrt.yaml", data_root="/data", device="cpu", root=root)
    assert only_entries(entries, None, "jsrt.yaml") == entries
    kept = only_entries(entries, ["jsrt_256", "jsrt"], "jsrt.yaml")
    assert [entry.output for entry in kept] == ["jsrt", "jsrt_256"]
    with pytest.raises(ValueError, match=r"jsrt.yaml has no entry with output 'jsrt_512'.*jsrt, ablation_denoising"):
        only_entries(entries, ["jsrt", "jsrt_512"], "jsrt.yaml")


def test_live_controls_are_disabled_and_show_progress_while_certifying(tiny_experiment, monkeypatch):
    from medcert_core.study.report import live

    monkeypatch.setattr("medcert_core.study.experiment.training_spec", lambda profile: TINY_TRAINING)
    methods = [plain(0.0), ours("none")]
    box = live.controls(tiny_experiment, "unet", methods)
    (image, sigma, button), (progress, status) = box.children[0].children, box.children[1].children
    numbers = box.children[2]
    name = tiny_experiment.data.load("test").ids[1]
    seen, certify_labels = [], live.certify_labels

    def spy(*args):
        pickers = [image.disabled, sigma.disabled, button.disabled]
        seen.append((pickers, progress.layout.display, progress.value, status.value))
        return certify_labels(*args)

    monkeypatch.setattr(live, "certify_labels", spy)
    image.value = 1
    button.click()
    assert seen == [([True] * 3, "", k, f"certifying {name} at σ = 0.5 (method {k + 1} of 2: {method.label})")
                    for k, method in enumerate(methods)]
    assert [image.disabled, sigma.disabled, button.disabled] == [False] * 3 and progress.layout.display == "none"
    assert status.value == f"certified {name} at σ = 0.5"
    lines = numbers.value.split("<br>")
    assert [line.split(":")[0] for line in lines] == ["plain (noise 0)", "ours (no denoiser)"]
    assert all("% abstain, certified Dice " in line for line in lines)

    def fail(*args):
        raise RuntimeError("no model")

    monkeypatch.setattr(live, "certify_labels", fail)
    button.click()  # the exception is shown (outside IPython: logged by the button), the controls come back
    assert [image.disabled, sigma.disabled, button.disabled] == [False] * 3 and progress.layout.display == "none"
    assert status.value == f"certifying {name} at σ = 0.5 failed (traceback below)" and numbers.value == ""


def test_a_data_root_through_a_symlink_stays_project_relative(tmp_path):
    from medcert_core.study.workflow import project_relative

    project, real = tmp_path / "work" / "main", tmp_path / "mnt" / "disk" / "volume" / "shared"
    project.mkdir(parents=True)
    (real / "data" / "jsrt").mkdir(parents=True)
    (tmp_path / "work" / "shared").symlink_to(real)
    assert project_relative(tmp_path / "work" / "shared" / "data" / "jsrt", project) == "../shared/data/jsrt"


def test_live_summary_averages_certified_dice_over_the_foreground_classes():
    from medcert_core import ABSTAIN
    from medcert_core.study.report import live

    target = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    certified = np.array([[0, 0, 1, 1], [0, ABSTAIN, 2, ABSTAIN]])  # lung perfect, heart half abstained
    (line,) = live.summary({"target": target[None], "ours": certified[None]}, ["ours"], num_classes=3)
    assert line == "ours: 25.0 % abstain, certified Dice 0.833 (foreground)"  # (1 + 2/3) / 2, background not counted


def test_the_rerun_box_names_the_grid_file_an_entry_came_from(monkeypatch):
    from medcert_core.study.grid.local import rerun_grid_sentence
    from medcert_core.study.grid.spec import load_grid

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    cvc = load_grid(repo / "grids" / "cvc_clinicdb.yaml", repo / "notebooks")[0]
    sentence = rerun_grid_sentence(cvc)
    assert "`./run.sh grid grids/cvc_clinicdb.yaml`" in sentence, "relative to the project root"
    assert "study" not in sentence, "the jsrt study does not run this grid"
    jsrt = load_grid("grids/jsrt.yaml", "notebooks")[0]
    assert "`./run.sh grid grids/jsrt.yaml`" in rerun_grid_sentence(jsrt)
    assert "`./run.sh study --profile jsrt`" in rerun_grid_sentence(jsrt)
    assert rerun_grid_sentence(GridEntry("phantom", "phantom", {"profile": "quick"})) == ""


def test_a_chapters_cost_sums_its_own_runs_seconds(tmp_path):
    """scripts/chapter_cost.py: the seconds of one dataset's stored runs (at one size, with --image-size), not another's."""
    import subprocess
    import sys

    rows = pd.DataFrame({"image_id": ["a"], "class_id": [1], "dice": [0.5]})
    maps = {"labels": np.zeros((1, 2, 2), dtype=np.int64)}
    mine = [CertificationRun(TINY_DATA, TINY_TRAINING, "unet", method, 0.5) for method in (ours("ddpm:auto"),
                                                                                          segcertify())]
    for run, seconds in zip(mine, (12.5, 30.0)):
        store.save_run(tmp_path, run.hash, rows, maps, run.parameters(), device="cpu", seconds=seconds)
    jsrt = {**mine[0].parameters(), "data": {**mine[0].parameters()["data"], "dataset": "jsrt"}}
    store.save_run(tmp_path, "another dataset", rows, maps, jsrt, device="cpu", seconds=99.0)
    larger = {**mine[0].parameters(), "data": {**mine[0].parameters()["data"], "image_size": 64}}
    store.save_run(tmp_path, "another size", rows, maps, larger, device="cpu", seconds=7.0)

    cache = tmp_path / "cache"
    trained = {"segmenters/phantom_32_unet_smoke_noise0.0_seed0.pt": 60.0, "denoisers/ddpm_phantom_32_tiny_seed0": 90.0,
               "denoisers/unet_phantom_64_sigma0.5_seed0": 5.0, "segmenters/phantom2_32_unet_seed0.pt": 7.0,
               "segmenters/jsrt_32_unet_seed0.pt": 8.0}
    for name, seconds in trained.items():  # completion markers as assets.mark_complete writes them
        record = {"seconds": seconds, "machine": {"torch_threads": 1}, "load_average": [1.0, 1.0, 1.0],
                  "finished": f"2026-12-07T10:00:{int(seconds):02d}+0000"}
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / f"{name}.complete").write_text(json.dumps({"model": Path(name).name, "files": {}, "training": record}))
    (cache / "segmenters" / "phantom_32_resunetpp_seed0.pt.complete").write_text(  # marked before markers kept it
        json.dumps({"model": "phantom_32_resunetpp_seed0.pt", "files": {}}))

    def cost_of(*size: str) -> dict:
        output = tmp_path / "cost.json"
        completed = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "chapter_cost.py"),
                                    "--dataset", "phantom", *size, "--results", str(tmp_path), "--cache", str(cache),
                                    "--out", str(output)],
                                   capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
        return json.loads(output.read_text())

    assert cost_of()["total_seconds"] == 49.5
    assert [model["model"] for model in cost_of()["models"]["trained"]] == [
        "unet_phantom_64_sigma0.5_seed0", "phantom_32_unet_smoke_noise0.0_seed0.pt", "ddpm_phantom_32_tiny_seed0"]
    cost = cost_of("--image-size", "32")
    assert {run["run"] for run in cost["runs"]} == {run.hash for run in mine}
    assert {run["image_size"] for run in cost["runs"]} == {32} and "at 32 px" in cost["what"]
    assert sorted(run["seconds"] for run in cost["runs"]) == [12.5, 30.0] and cost["total_seconds"] == 42.5
    assert cost["models"]["seconds"] == 150.0, "this dataset's models at 32 px, each from its marker, in no run's sum"
    assert {model["threads"] for model in cost["models"]["trained"]} == {1}
    assert cost["machine"]["cpu"] and cost["machine"]["cpus"] == os.cpu_count()  # which CPU the seconds are of
    assert "warm_up" not in cost
    warmed = cost_of("--image-size", "32", "--warm-up", "2", "300.5")
    assert warmed["warm_up"]["models"] == 2 and warmed["warm_up"]["wall_seconds"] == 300.5
    assert warmed["total_seconds"] == 42.5, "the warm-up is recorded beside the runs' seconds, not added to them"
