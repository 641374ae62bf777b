"""Metrics on hand-checkable 4 x 4 cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcert_core import ABSTAIN
from medcert_core.metrics import MetricAccumulator, confusion_matrix, psnr, segmentation_scores

A = ABSTAIN
TARGET = np.array(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 1, 1],
        [2, 2, 0, 0],
    ]
)
LABELS = np.array(
    [
        [0, 0, 1, A],
        [0, 1, 1, 1],
        [2, A, 1, A],
        [0, 2, 0, 0],
    ]
)


def test_confusion_matrix_has_an_abstain_column():
    confusion = confusion_matrix(LABELS, TARGET, 3)
    expected = np.array(
        [
            [5, 1, 0, 0],  # background: 5 right, 1 called class 1
            [0, 4, 0, 2],  # class 1: 4 right, 2 abstained
            [1, 0, 2, 1],  # class 2: 1 called background, 2 right, 1 abstained
        ]
    )
    np.testing.assert_array_equal(confusion, expected)


def test_dice_iou_abstain_by_hand():
    scores = segmentation_scores(torch.from_numpy(LABELS), torch.from_numpy(TARGET), 3)
    # class 0: TP 5, FP 1 (a class-2 pixel), FN 1 -> Dice 10/12, IoU 5/7
    # class 1: TP 4, FP 1, FN 2 (both abstained) -> Dice 8/11, IoU 4/7
    # class 2: TP 2, FP 0, FN 2 (one abstained, one called 0) -> Dice 4/6, IoU 2/4
    np.testing.assert_allclose(scores["dice"], [10 / 12, 8 / 11, 4 / 6])
    np.testing.assert_allclose(scores["iou"], [5 / 7, 4 / 7, 2 / 4])
    np.testing.assert_allclose(scores["abstain_in_class"], [0, 2 / 6, 1 / 4])
    assert scores["abstain"] == pytest.approx(3 / 16)


def test_abstained_pixels_are_never_true_positives():
    all_abstain = np.full((4, 4), ABSTAIN)
    scores = segmentation_scores(all_abstain, TARGET, 3)
    np.testing.assert_array_equal(scores["dice"], [0, 0, 0])
    np.testing.assert_array_equal(scores["abstain_in_class"], [1, 1, 1])
    assert scores["abstain"] == 1.0


def test_empty_classes():
    scores = segmentation_scores(TARGET, TARGET, 4)
    np.testing.assert_array_equal(scores["dice"][:3], [1, 1, 1])
    assert np.isnan(scores["dice"][3]) and np.isnan(scores["iou"][3]), "absent everywhere: undefined"
    predicted_but_absent = TARGET.copy()
    predicted_but_absent[0, 0] = 3
    scores = segmentation_scores(predicted_but_absent, TARGET, 4)
    assert scores["dice"][3] == 0.0 and scores["iou"][3] == 0.0
    assert scores["dice"][0] == pytest.approx(2 * 5 / (2 * 5 + 0 + 1)), "6 pixels, 1 lost"


def test_accumulator_averages_per_image_and_skips_undefined():
    accumulator = MetricAccumulator(["background", "one", "two", "three"])
    accumulator.add(LABELS, TARGET, image_id="a", sigma=0.25)
    accumulator.add(TARGET, TARGET, image_id="b", sigma=0.25)
    frame = accumulator.to_frame()
    assert len(frame) == 8 and set(frame.columns) >= {"image_id", "class_name", "dice", "iou", "abstain", "sigma"}
    summary = accumulator.summary(by=["sigma"]).set_index("class_name")
    assert summary.loc["one", "dice"] == pytest.approx((8 / 11 + 1) / 2)
    assert summary.loc["two", "iou"] == pytest.approx((0.5 + 1) / 2)
    assert summary.loc["background", "abstain"] == pytest.approx((3 / 16 + 0) / 2)
    assert np.isnan(summary.loc["three", "dice"])
    assert summary.loc[["background", "one", "two"], "images"].tolist() == [2, 2, 2]
    assert summary.loc["three", "images"] == 0, "class three is absent from both images: no image enters its mean"
    only_one = TARGET.copy()
    only_one[only_one == 2] = 1  # class two absent from this image's target and prediction
    accumulator.add(only_one, only_one, image_id="c", sigma=0.25)
    summary = accumulator.summary().set_index("class_name")
    assert summary.loc["two", "images"] == 2 and summary.loc["one", "images"] == 3
    assert summary.loc["two", "dice"] == pytest.approx((2 / 3 + 1) / 2), "the mean over the 2 images that count"


def test_bad_labels_are_explained():
    with pytest.raises(ValueError, match="same shape"):
        segmentation_scores(LABELS[:3], TARGET, 3)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        segmentation_scores(LABELS, TARGET + 1, 3)
    with pytest.raises(ValueError, match="ABSTAIN"):
        segmentation_scores(LABELS - 2, TARGET, 3)


def test_psnr_by_hand():
    clean = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    estimate = clean.clone()
    estimate[0, 0, 0, 0] = 0.2  # MSE 0.01 -> 20 dB
    estimate[1] = 0.5  # MSE 0.25 -> 6.02 dB
    np.testing.assert_allclose(psnr(estimate, clean).numpy(), [20.0, 10 * np.log10(4)], rtol=1e-12)


def test_paired_bootstrap_interval_matches_the_normal_interval_on_a_large_sample():
    from scipy import stats

    from medcert_core.metrics import paired_bootstrap_interval

    differences = np.random.default_rng(3).normal(0.4, 1.0, size=400)
    interval = paired_bootstrap_interval(differences, resamples=20_000)
    half = stats.norm.ppf(0.975) * differences.std(ddof=1) / np.sqrt(len(differences))
    assert interval["mean"] == pytest.approx(differences.mean())
    assert interval["low"] == pytest.approx(differences.mean() - half, abs=0.01)
    assert interval["high"] == pytest.approx(differences.mean() + half, abs=0.01)
    assert paired_bootstrap_interval([1.0, 1.0, 1.0])["low"] == 1.0, "no spread: the interval is the point"
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap_interval([0.5])


def test_the_two_level_bootstrap_equals_a_direct_loop_over_the_same_draws():
    from medcert_core.metrics import seeds_and_images_bootstrap_interval

    differences = np.random.default_rng(3).normal(0.02, 0.05, size=(3, 7))
    interval = seeds_and_images_bootstrap_interval(differences, resamples=500, seed=4)
    rng = np.random.default_rng(4)  # the same draws, averaged the straightforward way
    seed_picks, image_picks = rng.integers(0, 3, size=(500, 3)), rng.integers(0, 7, size=(500, 7))
    means = [differences[np.ix_(s, i)].mean() for s, i in zip(seed_picks, image_picks)]
    low, high = np.percentile(means, [2.5, 97.5])
    assert interval["low"] == pytest.approx(low, abs=1e-12) and interval["high"] == pytest.approx(high, abs=1e-12)
    assert interval["mean"] == pytest.approx(differences.mean())
    assert interval["seed_spread"] == pytest.approx(differences.mean(axis=1).std(ddof=1))
    assert (interval["seeds"], interval["images"]) == (3, 7)


def test_the_two_level_bootstrap_widens_with_the_spread_between_trainings():
    from medcert_core.metrics import paired_bootstrap_interval, seeds_and_images_bootstrap_interval

    rng = np.random.default_rng(0)
    image_part = rng.normal(0.0, 0.02, size=40)
    seed_part = np.array([-0.1, 0.0, 0.1])  # trainings that disagree far more than the images vary
    differences = seed_part[:, None] + image_part[None, :]
    both = seeds_and_images_bootstrap_interval(differences)
    images_only = paired_bootstrap_interval(differences.mean(axis=0))
    assert images_only["high"] - images_only["low"] < 0.02 < both["high"] - both["low"], \
        "resampling images alone hides the training spread"
    assert both["low"] < 0 < both["high"]
    one_seed = seeds_and_images_bootstrap_interval(differences[:1])
    assert one_seed["seeds"] == 1 and one_seed["seed_spread"] == 0.0
    with pytest.raises(ValueError, match=r"shape \(seeds, images >= 2\)"):
        seeds_and_images_bootstrap_interval(np.ones(5))
