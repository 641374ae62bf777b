"""The certification statistics against an independent, straightforward implementation."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.multitest import multipletests

from medcert_core import ABSTAIN, certify, certify_counts
from medcert_core.certify import (
    binomial_pvalue_table,
    count_agreement,
    predict_counts,
    reject_groups,
    smallest_certifiable_n,
    two_sided_pvalues,
)


def reference_certify(samples: np.ndarray, n0: int, tau: float, alpha: float, correction: str):
    """Per pixel: mode of the first n0 draws, binomtest of its count, then statsmodels."""
    draws, height, width = samples.shape
    n = draws - n0
    selected = np.zeros((height, width), dtype=np.int64)
    pvalues = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            votes = Counter(samples[:n0, i, j].tolist())
            best = max(votes.values())
            selected[i, j] = min(c for c, v in votes.items() if v == best)
            k = int((samples[n0:, i, j] == selected[i, j]).sum())
            pvalues[i, j] = binomtest(k, n, tau, alternative="greater").pvalue
    if correction == "none":
        reject = pvalues.reshape(-1) <= alpha
    else:
        reject = multipletests(pvalues.reshape(-1), alpha, method=correction)[0]
    labels = np.where(reject.reshape(height, width), selected, ABSTAIN)
    return labels, pvalues


def random_samples(rng: np.random.Generator, shape, num_classes: int, draws: int) -> np.ndarray:
    """Draws whose per-pixel agreement with a base class ranges from chance to certain."""
    height, width = shape
    base = rng.integers(0, num_classes, size=(height, width))
    agreement = rng.uniform(0.3, 1.0, size=(height, width))
    agree = rng.random((draws, height, width)) < agreement
    other = rng.integers(0, num_classes, size=(draws, height, width))
    return np.where(agree, base, other).astype(np.int64)


@pytest.mark.parametrize("correction", ["holm", "bonferroni", "none"])
@pytest.mark.parametrize(
    "shape,num_classes,n0,n,alpha",
    [((5, 7), 2, 1, 30, 0.2), ((12, 12), 3, 5, 50, 0.01), ((3, 40), 5, 10, 100, 0.001), ((9, 9), 4, 10, 100, 0.2)],
)
def test_certify_matches_binomtest_and_statsmodels(shape, num_classes, n0, n, alpha, correction):
    rng = np.random.default_rng(hash((shape, num_classes, n0, n)) % 2**32)
    samples = random_samples(rng, shape, num_classes, n0 + n)
    expected_labels, expected_pvalues = reference_certify(samples, n0, 0.75, alpha, correction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cert = certify(samples, n0, sigma=0.5, tau=0.75, alpha=alpha, correction=correction)
    np.testing.assert_array_equal(cert.labels, expected_labels)
    np.testing.assert_allclose(cert.pvalues, expected_pvalues, rtol=1e-12, atol=0)
    assert (cert.labels != ABSTAIN).any() and (cert.labels == ABSTAIN).any(), "the case should be mixed"
    assert cert.radius == pytest.approx(0.5 * norm.ppf(0.75))
    assert (cert.n0, cert.n, cert.correction) == (n0, n, correction)


@pytest.mark.parametrize("correction", ["holm", "bonferroni", "none"])
def test_reject_groups_matches_statsmodels_with_ties_and_threshold_equality(correction):
    rng = np.random.default_rng(7)
    alpha = 0.05
    for _ in range(200):
        groups = rng.integers(1, 8)
        sizes = rng.integers(0, 5, size=groups)
        if sizes.sum() == 0:
            continue
        m = int(sizes.sum())
        # p-values on or next to the thresholds that Holm and Bonferroni compare with
        candidates = np.concatenate([alpha / np.arange(1, m + 1), rng.uniform(0, 2 * alpha, 4), [alpha, 1.0]])
        pvalues = rng.choice(candidates, size=groups)
        expanded = np.repeat(pvalues, sizes)
        if correction == "none":
            expected = expanded <= alpha
        else:
            expected = multipletests(expanded, alpha, method=correction)[0]
        ours = np.repeat(reject_groups(pvalues, sizes, alpha, correction), sizes)
        np.testing.assert_array_equal(ours, expected)


def test_holm_certifies_more_than_bonferroni():
    n, tau = 20, 0.75
    table = binomial_pvalue_table(n, tau)
    # pixel 0 agrees 20/20, pixel 1 agrees 19/20: alpha between p(19) and 2 p(19)
    alpha = 1.5 * table[19]
    assert table[20] <= alpha / 2 < table[19] <= alpha
    counts = np.array([[20, 19]])
    selected = np.array([[1, 2]])
    holm = certify_counts(selected, counts, n, sigma=0.25, tau=tau, alpha=alpha, correction="holm")
    bonferroni = certify_counts(selected, counts, n, sigma=0.25, tau=tau, alpha=alpha, correction="bonferroni")
    np.testing.assert_array_equal(holm.labels, [[1, 2]])
    np.testing.assert_array_equal(bonferroni.labels, [[1, ABSTAIN]])


def test_holm_step_down_stops_at_first_non_rejection():
    n, tau = 200, 0.75
    table = binomial_pvalue_table(n, tau)
    # sorted p-values p(200) < p(165) < p(164); thresholds alpha/3, alpha/2, alpha
    alpha = table[164] * 1.01
    assert table[200] <= alpha / 3
    assert table[165] > alpha / 2, "the second test fails"
    assert table[164] <= alpha, "a step-up procedure (Hochberg) would reject the third"
    counts = np.array([[200, 165, 164]])
    cert = certify_counts(np.zeros((1, 3), dtype=np.int64), counts, n, sigma=1.0, tau=tau, alpha=alpha)
    np.testing.assert_array_equal(cert.labels, [[0, ABSTAIN, ABSTAIN]])
    reference = multipletests(table[[200, 165, 164]], alpha, method="holm")[0]
    np.testing.assert_array_equal(cert.labels != ABSTAIN, reference[None])
    hochberg = multipletests(table[[200, 165, 164]], alpha, method="simes-hochberg")[0]
    assert hochberg.all(), "the case separates step-down from step-up"


def test_torch_and_numpy_give_the_same_certificate_and_keep_their_type():
    rng = np.random.default_rng(3)
    samples = random_samples(rng, (16, 16), 3, 110)
    as_numpy = certify(samples, 10, sigma=0.25, alpha=0.01)
    as_torch = certify(torch.from_numpy(samples), 10, sigma=0.25, alpha=0.01)
    assert isinstance(as_numpy.labels, np.ndarray) and as_numpy.labels.dtype == np.int64
    assert isinstance(as_torch.labels, torch.Tensor) and as_torch.labels.dtype == torch.int64
    assert as_torch.pvalues.dtype == torch.float64
    np.testing.assert_array_equal(as_torch.labels.numpy(), as_numpy.labels)
    np.testing.assert_array_equal(as_torch.pvalues.numpy(), as_numpy.pvalues)
    assert as_numpy.abstain_fraction == pytest.approx(float((as_numpy.labels == ABSTAIN).mean()))
    assert as_torch.abstain_fraction == pytest.approx(as_numpy.abstain_fraction)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tau": 1.0}, r"0.5 <= tau < 1"),
        ({"tau": 0.0}, r"0.5 <= tau < 1"),
        ({"tau": 0.3}, r"0.5 <= tau < 1, got 0.3"),
        ({"tau": 0.4999}, r"0.5 <= tau < 1"),
        ({"tau": float("nan")}, r"0.5 <= tau < 1"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"correction": "fdr"}, "holm"),
    ],
)
def test_invalid_parameters_are_named(kwargs, message):
    samples = np.zeros((11, 4, 4), dtype=np.int64)
    arguments = {"sigma": 0.25, **kwargs}
    with pytest.raises(ValueError, match=message):
        certify(samples, 1, **arguments)


def test_invalid_samples_are_explained():
    with pytest.raises(ValueError, match=r"n0 \+ n, H, W"):
        certify(np.zeros((11, 4), dtype=np.int64), 1, sigma=0.25)
    with pytest.raises(TypeError, match="integer"):
        certify(np.zeros((11, 4, 4)), 1, sigma=0.25)
    with pytest.raises(ValueError, match=">= 0"):
        certify(-np.ones((11, 4, 4), dtype=np.int64), 1, sigma=0.25)
    with pytest.raises(ValueError, match="n0"):
        certify(np.zeros((11, 4, 4), dtype=np.int64), 0, sigma=0.25)
    with pytest.raises(ValueError, match="n >= 1"):
        certify(np.zeros((5, 4, 4), dtype=np.int64), 5, sigma=0.25)
    with pytest.raises(ValueError, match="0..n"):
        certify_counts(np.zeros((2, 2), dtype=np.int64), np.full((2, 2), 11), 10, sigma=0.25)


def test_warns_when_n_is_too_small_and_names_the_smallest_n():
    samples = np.zeros((1 + 20, 64, 64), dtype=np.int64)
    needed = smallest_certifiable_n(64 * 64, 0.75, 0.001, "holm")
    with pytest.warns(UserWarning, match=f"smallest n that could is {needed}"):
        cert = certify(samples, 1, sigma=0.25)
    assert (cert.labels == ABSTAIN).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        certify(np.zeros((1 + needed, 64, 64), dtype=np.int64), 1, sigma=0.25)


@pytest.mark.parametrize("pixels,tau,alpha,correction", [(1, 0.75, 0.001, "none"), (4096, 0.75, 0.001, "holm"), (262144, 0.9, 0.01, "bonferroni")])
def test_smallest_certifiable_n_is_the_smallest(pixels, tau, alpha, correction):
    n = smallest_certifiable_n(pixels, tau, alpha, correction)
    level = alpha if correction == "none" else alpha / pixels
    assert binomtest(n, n, tau, alternative="greater").pvalue <= level
    assert binomtest(n - 1, n - 1, tau, alternative="greater").pvalue > level


def test_tau_one_half_is_valid_with_radius_zero():
    samples = np.zeros((1 + 40, 3, 3), dtype=np.int64)
    cert = certify(samples, 1, sigma=0.25, tau=0.5, alpha=0.01)
    assert cert.radius == 0.0
    assert (cert.labels == 0).all(), "every draw agrees: certified at radius 0 (the smoothed class itself)"


def test_two_sided_pvalues_match_binomtest():
    n = 30
    top, total = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    valid = top <= total
    pvalues = two_sided_pvalues(top[valid], total[valid])
    for a, t, p in zip(top[valid], total[valid], pvalues):
        expected = binomtest(a, t, 0.5).pvalue if 2 * a > t else 1.0
        assert p == pytest.approx(expected, rel=1e-12, abs=0), (a, t)


def test_predict_counts_at_cohens_n_fits_in_a_few_hundred_megabytes():
    """n = 100,000 (Cohen et al.'s PREDICT) on a 64 x 64 image: no (n + 1)^2 table (80 GB)."""
    import tracemalloc

    rng = np.random.default_rng(5)
    n = 100_000
    top = np.where(rng.random((64, 64)) < 0.5, rng.integers(n // 2, n // 2 + 1500, size=(64, 64)),
                   rng.integers(n // 2, n + 1, size=(64, 64)))  # half of them near a tie
    runner_up = np.where(top < n // 2 + 1500, n - top, rng.integers(0, n - top + 1))
    top_class = rng.integers(0, 3, size=(64, 64))
    tracemalloc.start()
    labels = predict_counts(top_class, top, runner_up, n, alpha=0.001)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 300e6, f"PREDICT at n = 100,000 peaked at {peak / 1e6:.0f} MB"
    print(f"PREDICT at n = 100,000 on 64 x 64: peak {peak / 1e6:.1f} MB")
    pvalues = np.array([binomtest(a, a + b, 0.5).pvalue for a, b in zip(top.ravel(), runner_up.ravel())])
    reference = np.where(multipletests(pvalues, 0.001, method="holm")[0], top_class.ravel(), ABSTAIN)
    np.testing.assert_array_equal(labels.ravel(), reference)
    assert (labels != ABSTAIN).any() and (labels == ABSTAIN).any()


@pytest.mark.parametrize("correction", ["holm", "bonferroni", "none"])
def test_predict_counts_matches_binomtest_and_statsmodels(correction):
    rng = np.random.default_rng(11)
    n, alpha = 40, 0.05
    top = rng.integers(n // 2, n + 1, size=(10, 10))
    runner_up = np.minimum(rng.integers(0, n // 2 + 1, size=(10, 10)), n - top)
    top_class = rng.integers(0, 4, size=(10, 10))
    pvalues = np.array([binomtest(a, a + b, 0.5).pvalue for a, b in zip(top.ravel(), runner_up.ravel())])
    reject = pvalues <= alpha if correction == "none" else multipletests(pvalues, alpha, method=correction)[0]
    expected = np.where(reject.reshape(10, 10), top_class, ABSTAIN)
    labels = predict_counts(top_class, top, runner_up, n, alpha=alpha, correction=correction)
    np.testing.assert_array_equal(labels, expected)
    labels_torch = predict_counts(torch.from_numpy(top_class), torch.from_numpy(top), torch.from_numpy(runner_up), n, alpha=alpha, correction=correction)
    np.testing.assert_array_equal(labels_torch.numpy(), expected)


@pytest.mark.parametrize("tile", [1, 7, 45, 1000])
def test_count_agreement_tiles_cover_every_pixel(tile):
    rng = np.random.default_rng(tile)
    draws = rng.integers(0, 3, size=(13, 5, 9))
    selected = rng.integers(0, 3, size=(5, 9))
    np.testing.assert_array_equal(count_agreement(draws, selected, tile=tile), (draws == selected).sum(0))
    torch_counts = count_agreement(torch.from_numpy(draws), torch.from_numpy(selected))
    np.testing.assert_array_equal(torch_counts.numpy(), (draws == selected).sum(0))


@pytest.mark.parametrize("to_array", [np.asarray, torch.as_tensor])
def test_class_ids_are_checked_before_counting(to_array, monkeypatch):
    import sys

    certify_module = sys.modules["medcert_core.certify"]

    def no_counting(*args, **kwargs):
        raise AssertionError("counted before the class ids were checked")

    monkeypatch.setattr(certify_module, "count_agreement", no_counting)
    samples = np.zeros((11, 4, 4), dtype=np.int64)
    samples[7, 2, 3] = -2  # in the estimation draws
    with pytest.raises(ValueError, match=">= 0, got -2"):
        certify(to_array(samples), 1, sigma=0.25)
    samples[7, 2, 3] = 3
    with pytest.raises(ValueError, match=r"0..2 \(num_classes = 3\), got 3"):
        certify(to_array(samples), 1, sigma=0.25, num_classes=3)
    samples[7, 2, 3] = 10**9  # no histogram of a billion classes
    with pytest.raises(ValueError, match="pass num_classes"):
        certify(to_array(samples), 1, sigma=0.25)
    for dtype in (np.int8, np.int16, np.int32):  # negatives in every signed width
        small = np.zeros((11, 4, 4), dtype=dtype)
        small[5, 1, 1] = -1
        with pytest.raises(ValueError, match=">= 0, got -1"):
            certify(to_array(small), 1, sigma=0.25)
    with pytest.raises(ValueError, match="selected class ids must lie in 0..1"):
        certify_counts(np.full((2, 2), 2), np.zeros((2, 2), dtype=np.int64), 10, sigma=0.25, num_classes=2)


def test_certificate_is_frozen_and_compared_by_identity():
    cert = certify(np.zeros((31, 2, 2), dtype=np.int64), 1, sigma=0.25, alpha=0.1)
    with pytest.raises(AttributeError):
        cert.radius = 9.0
    same = certify(np.zeros((31, 2, 2), dtype=np.int64), 1, sigma=0.25, alpha=0.1)
    assert cert == cert and cert != same  # no ambiguous element-wise array comparison


def tight_holm_trials(*, trials: int, n: int, tau: float, seed: int = 0) -> np.ndarray:
    """The tau pixel's count in each trial: Binom(n, tau) draws, (trials,)."""
    return np.random.default_rng(seed).binomial(n, tau, size=trials)


def holm_family_wise_error(pvalue_of_count, *, trials: int, n: int, tau: float, alpha: float, pixels: int,
                           correction: str = "holm", seed: int = 0) -> float:
    """Observed family-wise error where Holm is tight, through binomtest-style p-values and statsmodels.

    pixels - 1 pixels always give their selected class (count n: p = tau^n, rejected first) and
    one pixel gives it with probability exactly tau (the null is true there: certifying it is an
    error). Holm reaches that pixel last and tests it at level alpha. ``pvalue_of_count(k)`` is the
    p-value under test. A trial's outcome depends only on the tau pixel's count, so each distinct
    count is decided once. Returns the fraction of trials that certify the tau pixel.
    """
    tau_counts = tight_holm_trials(trials=trials, n=n, tau=tau, seed=seed)
    certified = {}
    for k in np.unique(tau_counts):
        pvalues = np.array([pvalue_of_count(n)] * (pixels - 1) + [pvalue_of_count(int(k))])
        reject = multipletests(pvalues, alpha, method=correction)[0]
        assert reject[:-1].all(), "the always-winning pixels must be rejected for Holm to be tight"
        certified[int(k)] = bool(reject[-1])
    return float(np.mean([certified[int(k)] for k in tau_counts]))


FWER = {"trials": 20000, "n": 100, "tau": 0.75, "alpha": 0.05, "pixels": 64}


def test_family_wise_error_stays_below_alpha_where_holm_is_tight():
    n, tau, alpha, trials = FWER["n"], FWER["tau"], FWER["alpha"], FWER["trials"]
    table = binomial_pvalue_table(n, tau)
    errors = {"holm": 0, "bonferroni": 0}
    selected = np.ones((8, 8), dtype=np.int64)
    for k, repeats in Counter(tight_holm_trials(trials=trials, n=n, tau=tau).tolist()).items():
        counts = np.full((8, 8), n)
        counts[-1, -1] = k
        for correction in errors:  # our certify_counts; a trial's outcome depends on k only
            cert = certify_counts(selected, counts, n, sigma=0.5, tau=tau, alpha=alpha, correction=correction)
            assert (cert.labels.ravel()[:-1] == 1).all()
            errors[correction] += repeats * int(cert.labels[-1, -1] != ABSTAIN)
    holm, bonferroni = errors["holm"] / trials, errors["bonferroni"] / trials
    standard_error = np.sqrt(alpha * (1 - alpha) / trials)
    exact = float(table[table <= alpha].max())  # P[Binom(n, tau) >= the smallest count with p <= alpha]
    print(f"tight Holm FWER: {holm:.4f} over {trials} trials (exact {exact:.4f}, alpha {alpha}, "
          f"bound alpha + 3 SE = {alpha + 3 * standard_error:.4f}); Bonferroni {bonferroni:.4f}")
    assert holm <= alpha + 3 * standard_error
    assert holm == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / trials)), "Holm is tight here"
    assert exact > 0.6 * alpha, "the binomial's discreteness should not hide the bound"
    assert bonferroni <= alpha / 4, "Bonferroni tests the tau pixel at alpha / m: far below alpha"
    # the same trials through the independent reference (binomtest + statsmodels): the same decisions
    reference = holm_family_wise_error(lambda k: binomtest(k, n, tau, alternative="greater").pvalue, **FWER)
    assert reference == holm


def test_family_wise_error_test_catches_p_values_over_too_few_trials():
    """A published peer computes the p-value over n - n0 trials; the error then exceeds alpha."""
    n, n0, tau, alpha = FWER["n"], 10, FWER["tau"], FWER["alpha"]
    wrong = holm_family_wise_error(lambda k: binomtest(min(k, n - n0), n - n0, tau, alternative="greater").pvalue,
                                   **FWER)
    standard_error = np.sqrt(alpha * (1 - alpha) / FWER["trials"])
    print(f"FWER with p-values over n - n0 = {n - n0} trials: {wrong:.4f}")
    assert wrong > alpha + 3 * standard_error


def test_certificates_over_a_tau_grid_match_an_independent_holm_at_each_tau():
    """The same counts certified at every tau of the grid, each tau its own Holm family at level
    alpha, against scipy's binomial tail and statsmodels' Holm computed pixel by pixel."""
    from scipy.stats import binom
    from statsmodels.stats.multitest import multipletests

    from medcert_core.certify import TAU_GRID, certify_counts_over_taus

    rng = np.random.default_rng(7)
    n, alpha = 100, 0.01
    counts = rng.binomial(n, rng.uniform(0.5, 1.0, size=(12, 10))).astype(np.int64)
    counts[0, :5] = n  # some pixels certifiable even at tau = 0.95
    selected = rng.integers(0, 3, size=counts.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # taus that n = 100 cannot reach abstain quietly
        certificates = certify_counts_over_taus(selected, counts, n, sigma=0.5, taus=TAU_GRID, alpha=alpha)
    assert [c.tau for c in certificates] == list(TAU_GRID)
    for certificate in certificates:
        pvalues = binom.sf(counts.ravel() - 1, n, certificate.tau)
        reject = multipletests(pvalues, alpha=alpha, method="holm")[0].reshape(counts.shape)
        expected = np.where(reject, selected, ABSTAIN)
        np.testing.assert_array_equal(certificate.labels, expected)
        assert certificate.radius == pytest.approx(0.5 * norm.ppf(certificate.tau))
    certified = [int((c.labels != ABSTAIN).sum()) for c in certificates]
    assert certified == sorted(certified, reverse=True), "a larger radius never certifies more pixels"
    assert certified[TAU_GRID.index(0.9)] > 0 and certified[-1] == 0  # 0.99^100 > alpha / 120: out of reach
