"""Planted bugs: every known way to get a certification wrong is planted with ``monkeypatch`` (no edit of
the package), and each one must be caught by a detector that passes on the real code.

Detectors check the certification against something independent of the code under test: exact
binomial tail sums with ``math.comb`` and ``scipy.stats.binom``, ``statsmodels``' Holm, the
``statistics`` module's normal quantile, the analytic oracle of per-pixel linear / threshold base
models (whose smoothed probabilities are Phi of a margin, see tests/test_oracle.py), and direct
observation of the noisy inputs that the base model receives. Each returns (ok, detail); ok is True
when the certification behaves correctly. Every detector is deterministic (fixed seeds).

- ``test_detector_passes_on_real_code``: every detector passes on the unmutated package;
- ``test_mutant_is_caught``: under each mutant, every detector listed for it in ``CAUGHT_BY`` fails
  (so at least one does);
- ``test_harness_without_bug_matches_real_code``: the re-implementation of the sampling loop that
  the stream mutants are planted in reproduces the real counts bit for bit when no bug is planted, so
  what those mutants change is the planted bug only.

No FWER oracle here can catch holm_without_stopping: its rejections are a subset of Hochberg's step-up,
which controls the family-wise error under independence (as in the count-based oracles) and positive
dependence; it breaks the documented procedure (equality with multipletests), which
corrections_equal_statsmodels checks.
batchnorm_left_in_train_mode couples the draws of a batch; batch-size invariance exposes it exactly.

Mutant table: mutant (what is planted) -> the detectors that catch it. The full matrix (every detector
under every mutant) was run once; the table lists every detector that failed, and
``test_mutant_is_caught`` asserts each of these pairs (``test_table_is_caught_by`` keeps this table
and ``CAUGHT_BY`` the same).

pvalues_over_n_minus_n0: p = binom.sf(k - 1, n - n0, tau) (the selection draws subtracted twice)
    -> pvalues_equal_exact_binomial_tails, family_wise_error_on_oracle_counts,
       boundary_rate_on_oracle_counts, boundary_rate_end_to_end, family_wise_error_end_to_end
pvalues_over_n_minus_1: p = binom.sf(k - 1, n - 1, tau)
    -> pvalues_equal_exact_binomial_tails, corrections_equal_statsmodels,
       boundary_rate_on_oracle_counts
pvalues_sf_k: p = binom.sf(k, n, tau) (P[K > k] instead of P[K >= k])
    -> pvalues_equal_exact_binomial_tails, corrections_equal_statsmodels,
       boundary_rate_on_oracle_counts
holm_without_stopping: Holm rejects every p_(i) <= alpha / (m - i), past the first non-rejection
    -> corrections_equal_statsmodels
noise_reused_across_batch: draw_noise returns one N(0, I) draw repeated for every row of a batch
    -> boundary_rate_end_to_end, family_wise_error_end_to_end, noise_std_is_sigma,
       draws_distinct_and_uncorrelated, model_sees_n0_plus_n_draws,
       counts_invariant_to_batch_size_with_batchnorm, selection_and_estimation_follow_the_oracle
noise_std_2_sigma: the model sees noise of std 2 sigma, R still uses sigma
    -> boundary_rate_end_to_end, noise_std_is_sigma, selection_and_estimation_follow_the_oracle
noise_std_half_sigma: the model sees noise of std sigma / 2, R still uses sigma
    -> boundary_rate_end_to_end, family_wise_error_end_to_end, noise_std_is_sigma,
       selection_and_estimation_follow_the_oracle
selection_and_estimation_share_draws: the n0 selection draws are the first n0 of the n estimation draws
    -> noise_std_is_sigma, model_sees_n0_plus_n_draws, selection_and_estimation_follow_the_oracle
batchnorm_left_in_train_mode: eval_modules is a no-op: a BatchNorm handed over in train mode stays so
    -> counts_invariant_to_batch_size_with_batchnorm
radius_at_default_tau: R = sigma Phi^-1(0.75) whatever tau is tested
    -> radius_equals_sigma_normal_quantile, family_wise_error_on_oracle_counts
radius_at_larger_tau: R = sigma Phi^-1((1 + tau) / 2) instead of sigma Phi^-1(tau)
    -> radius_equals_sigma_normal_quantile, family_wise_error_on_oracle_counts
clamp_in_selection_only: x + delta clamped to [0, 1] before the model in the selection draws only
    -> noise_std_is_sigma, selection_and_estimation_follow_the_oracle
clamp_in_estimation_only: x + delta clamped to [0, 1] before the model in the estimation draws only
    -> boundary_rate_end_to_end, family_wise_error_end_to_end, noise_std_is_sigma,
       selection_and_estimation_follow_the_oracle

"""

from __future__ import annotations

import gc
import importlib
import math
import statistics
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from statsmodels.stats.multitest import multipletests

from medcert_core import ABSTAIN
from medcert_core.certify import certify, certify_counts
from medcert_core.smoothing import SmoothedSegmenter
from test_oracle import LinearSegmenter  # the per-pixel linear base model of the analytic oracle

# the modules themselves (``import medcert_core.certify as m`` would give the function the package exports)
certify_module = importlib.import_module("medcert_core.certify")
smoothing_module = importlib.import_module("medcert_core.smoothing")

Verdict = tuple[bool, str]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread


# --------------------------------------------------------------------------------------------- models


class ThresholdSegmenter(torch.nn.Module):
    """Class 1 where the first channel exceeds a per-pixel threshold t (H, W); records its inputs if asked."""

    def __init__(self, thresholds: torch.Tensor, record: bool = False) -> None:
        super().__init__()
        self.register_buffer("thresholds", thresholds)
        self.record = record
        self.inputs: list[torch.Tensor] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.inputs.append(batch.detach().clone())
        margin = (batch[:, :1] - self.thresholds).to(batch.dtype)
        return torch.cat([torch.zeros_like(margin), margin], dim=1)


class BatchNormSegmenter(torch.nn.Module):
    """BatchNorm2d, then class 1 where the channel mean exceeds 0.5. Built in train mode, as a user
    might hand it over; in eval mode (running mean 0, variance 1) the norm is almost the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(channels)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        margin = self.norm(batch).mean(1, keepdim=True) - 0.5
        return torch.cat([torch.zeros_like(margin), margin], dim=1)


def linear_oracle(rng: np.random.Generator, channels: int, height: int, width: int, q: np.ndarray,
                  sigma: float) -> dict:
    """A random image x and random w_p with b_p set so that p_1(x)_p = Phi(m_p / (sigma ||w_p||)) = q_p;
    returns the image, the model and the exact p_1, smoothed class and robust radius |m_p| / ||w_p||."""
    x = rng.random((channels, height, width))
    weights = rng.standard_normal((height * width, channels * height * width))
    norms = np.linalg.norm(weights, axis=1)
    bias = weights @ x.reshape(-1) - sigma * norms * norm.ppf(q.reshape(-1))
    margin = (weights @ x.reshape(-1) - bias).reshape(height, width)
    norms = norms.reshape(height, width)
    return {
        "x": x, "weights": weights, "bias": bias,
        "p1": norm.cdf(margin / (sigma * norms)),
        "smoothed_class": (margin > 0).astype(np.int64),
        "robust_radius": np.abs(margin) / norms,
    }


def mixed_targets(rng: np.random.Generator, height: int, width: int, tau: float) -> np.ndarray:
    """p_1 per pixel: 60 % nulls just below tau (either class), 10 % nulls inside, 30 % alternatives."""
    edge = tau - 1e-6
    u = rng.random((height, width))
    side = rng.random((height, width)) < 0.5
    inside = rng.uniform(1 - edge, edge, (height, width))
    strong = rng.uniform(tau + 1e-3, 0.9999, (height, width))
    lean = np.where(u < 0.6, edge, np.where(u < 0.7, inside, strong))
    return np.where((u < 0.7) & (u >= 0.6), lean, np.where(side, lean, 1 - lean))


def binomial_counts(rng: np.random.Generator, p1: np.ndarray, n0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected, counts) with their exact distribution (mode of n0 draws, ties -> class 0; then n draws)."""
    selected = (2 * rng.binomial(n0, p1) > n0).astype(np.int64)
    counts = rng.binomial(n, np.where(selected == 1, p1, 1 - p1)).astype(np.int64)
    return selected, counts


def wrong_pixels(labels: np.ndarray, radius: float, oracle: dict) -> np.ndarray:
    certified = labels != ABSTAIN
    return certified & ((labels != oracle["smoothed_class"]) | (radius > oracle["robust_radius"]))


def upper_bound(alpha: float, trials: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def attainable_level(n: int, tau: float, alpha: float) -> float:
    """P[Binom(n, tau) >= the smallest count whose exact tail probability is <= alpha]."""
    tails = binom.sf(np.arange(n + 1) - 1, n, tau)
    return float(binom.sf(int(np.argmax(tails <= alpha)) - 1, n, tau))


def exact_tails(n: int, tau: float) -> np.ndarray:
    """P[Binom(n, tau) >= k] for k = 0..n as exact rational sums (math.comb, Fraction), rounded once."""
    t = Fraction(tau)
    terms = [math.comb(n, j) * t ** j * (1 - t) ** (n - j) for j in range(n + 1)]
    tails, total = [], Fraction(0)
    for term in reversed(terms):
        total += term
        tails.append(float(total))
    return np.array(tails[::-1])


def smoothed(model: torch.nn.Module, sigma: float, batch_size: int = 64) -> SmoothedSegmenter:
    return SmoothedSegmenter(model, num_classes=2, sigma=sigma, batch_size=batch_size, device="cpu")


# ------------------------------------------------------------------------------------------ detectors


def pvalues_equal_exact_binomial_tails() -> Verdict:
    """cert.pvalues == P[Binom(n, tau) >= k] for every count k (exact sums), and == binom.sf(k - 1, n, tau)
    on counts recounted independently from class-id samples (mode of the first n0, ties -> smallest id)."""
    n, n0 = 100, 40
    counts = np.arange(n + 1, dtype=np.int64).reshape(1, -1)
    for tau in (0.55, 0.75, 0.95):
        cert = certify_counts(np.ones_like(counts), counts, n, sigma=0.5, tau=tau, alpha=0.1, n0=n0,
                              correction="none")
        expected = exact_tails(n, tau)
        got = np.asarray(cert.pvalues)[0]
        if not np.allclose(got, expected, rtol=1e-9, atol=0):
            worst = int(np.argmax(np.abs(got - expected)))
            return False, f"tau={tau}: k={worst}: pvalue {got[worst]:.6g} != {expected[worst]:.6g}"
    rng = np.random.default_rng(11)
    n0, n = 20, 120
    for trial in range(20):
        p = rng.uniform(0.3, 1.0, (5, 6))
        samples = (rng.random((n0 + n, 5, 6)) < p).astype(np.int64)
        cert = certify(samples, n0, sigma=0.25, tau=0.7, alpha=0.1, correction="none", num_classes=2)
        votes = np.stack([(samples[:n0] == c).sum(0) for c in (0, 1)])
        selected = np.argmax(votes, axis=0)
        k = (samples[n0:] == selected).sum(0)
        expected = binom.sf(k - 1, n, 0.7)
        if not np.allclose(np.asarray(cert.pvalues), expected, rtol=1e-9, atol=0):
            return False, f"samples trial {trial}: pvalues differ from binom.sf(k - 1, n, tau)"
        if not np.array_equal(np.asarray(cert.labels), np.where(expected <= 0.1, selected, ABSTAIN)):
            return False, f"samples trial {trial}: labels differ from the independent recount"
    return True, "p-values equal the exact tails"


def holm_stopping_case(n: int = 1000, tau: float = 0.75, alpha: float = 0.1) -> np.ndarray:
    """Counts (1, 2) whose p-values p1 < p2 both lie in (alpha / 2, alpha]: true Holm rejects neither
    (p1 > alpha / 2 stops it), a Holm that goes on past the first non-rejection rejects the second."""
    tails = binom.sf(np.arange(n + 1) - 1, n, tau)
    inside = np.flatnonzero((tails > alpha / 2) & (tails <= alpha))
    return np.array([[inside[-1], inside[0]]], dtype=np.int64)


def corrections_equal_statsmodels() -> Verdict:
    """Certified pixels == multipletests(independent p-values, alpha, method)[0] for holm and bonferroni
    (and p <= alpha for none), on random families with p-values around the thresholds, and on a family
    where Holm must stop at its first non-rejection."""
    rng = np.random.default_rng(12)
    families = [(holm_stopping_case(), 1000, 0.75, 0.1)]
    for _ in range(150):
        n, tau = 200, float(rng.choice([0.6, 0.75, 0.9]))
        shape = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        p = rng.uniform(tau - 0.02, min(tau + 0.12, 0.999), shape)
        families.append((rng.binomial(n, p).astype(np.int64), n, tau, float(rng.choice([0.05, 0.1, 0.3]))))
    gc.freeze()  # multipletests' holm calls gc.collect(): keep it from walking torch's heap (0.3 s a call)
    try:
        for index, (counts, n, tau, alpha) in enumerate(families):
            pvalues = binom.sf(counts.reshape(-1) - 1, n, tau)
            for correction in ("holm", "bonferroni", "none"):
                cert = certify_counts(np.ones_like(counts), counts, n, sigma=0.25, tau=tau, alpha=alpha,
                                      correction=correction)
                certified = (np.asarray(cert.labels) != ABSTAIN).reshape(-1)
                if correction == "none":
                    expected = pvalues <= alpha
                else:
                    expected = multipletests(pvalues, alpha=alpha, method=correction)[0]
                if not np.array_equal(certified, expected):
                    return False, (f"family {index} ({correction}): {certified.astype(int)} != statsmodels "
                                   f"{expected.astype(int)}")
    finally:
        gc.unfreeze()
    return True, f"{len(families)} families agree with statsmodels"


def radius_equals_sigma_normal_quantile() -> Verdict:
    """cert.radius == sigma * Phi^-1(tau) (statistics.NormalDist, not scipy) for several sigma and tau."""
    counts = np.full((2, 2), 1000, dtype=np.int64)
    for sigma in (0.12, 0.25, 1.0):
        for tau in (0.5, 0.6, 0.75, 0.9, 0.99):
            cert = certify_counts(np.ones_like(counts), counts, 1000, sigma=sigma, tau=tau, alpha=0.1)
            expected = sigma * statistics.NormalDist().inv_cdf(tau)
            if not math.isclose(cert.radius, expected, rel_tol=1e-9, abs_tol=1e-12):
                return False, f"sigma={sigma}, tau={tau}: radius {cert.radius:.6g} != {expected:.6g}"
    return True, "radius = sigma Phi^-1(tau)"


def family_wise_error_on_oracle_counts() -> Verdict:
    """Analytic oracle, counts from the exact binomials, real certify_counts, tau = 0.65 (not the default):
    the rate of images with a certified pixel of the wrong class or radius > exact radius <= alpha + 3 SE."""
    rng = np.random.default_rng(13)
    sigma, tau, alpha, n0, n, images = 0.25, 0.65, 0.1, 32, 300, 1200
    failures = 0
    for _ in range(images):
        channels, height, width = int(rng.choice([1, 3])), int(rng.integers(4, 8)), int(rng.integers(4, 8))
        oracle = linear_oracle(rng, channels, height, width, mixed_targets(rng, height, width, tau), sigma)
        selected, counts = binomial_counts(rng, oracle["p1"], n0, n)
        cert = certify_counts(selected, counts, n, sigma=sigma, tau=tau, alpha=alpha, n0=n0)
        failures += bool(wrong_pixels(np.asarray(cert.labels), cert.radius, oracle).any())
    rate = failures / images
    return rate <= upper_bound(alpha, images), f"FWER {rate:.4f} (bound {upper_bound(alpha, images):.4f})"


def boundary_rate(n0: int, n: int, trials: int, certify_one: Callable, seed: int) -> Verdict:
    """A pixel at p = tau exactly, among 15 pixels certified with near certainty, is certified at rate
    P[select it] * (exact attainable level of the binomial test at alpha), within 4 SE."""
    rng = np.random.default_rng(seed)
    sigma, tau, alpha = 0.25, 0.75, 0.1
    expected = attainable_level(n, tau, alpha) * float(binom.sf(n0 // 2, n0, tau))
    hits = 0
    for index in range(trials):
        q = np.where(rng.random((4, 4)) < 0.5, 0.99999, 1 - 0.99999)
        pixel = (int(rng.integers(4)), int(rng.integers(4)))
        q[pixel] = tau
        oracle = linear_oracle(rng, 1, 4, 4, q, sigma)
        labels = certify_one(rng, oracle, index, sigma=sigma, tau=tau, alpha=alpha, n0=n0, n=n)
        hits += bool(labels[pixel] == 1)
    rate = hits / trials
    spread = 4 * math.sqrt(expected * (1 - expected) / trials)
    return abs(rate - expected) <= spread, f"boundary pixel rate {rate:.4f}, expected {expected:.4f} +- {spread:.4f}"


def _certify_from_counts(rng, oracle, index, *, sigma, tau, alpha, n0, n):
    selected, counts = binomial_counts(rng, oracle["p1"], n0, n)
    return np.asarray(certify_counts(selected, counts, n, sigma=sigma, tau=tau, alpha=alpha, n0=n0).labels)


def _certify_end_to_end(rng, oracle, index, *, sigma, tau, alpha, n0, n):
    model = LinearSegmenter(oracle["weights"], oracle["bias"], oracle["x"].shape)
    cert = smoothed(model, sigma).certify(torch.as_tensor(oracle["x"]), n0, n, tau=tau, alpha=alpha,
                                          generator=torch.Generator().manual_seed(30_000 + index))
    return cert.labels.cpu().numpy()


def boundary_rate_on_oracle_counts() -> Verdict:
    """boundary_rate through certify_counts on exact binomial counts (n = 60: the test's discreteness makes
    any change of the p-value formula move the rate by many SE)."""
    return boundary_rate(64, 60, 1500, _certify_from_counts, seed=14)


def boundary_rate_end_to_end() -> Verdict:
    """boundary_rate through SmoothedSegmenter with its real noise."""
    return boundary_rate(32, 60, 300, _certify_end_to_end, seed=15)


def family_wise_error_end_to_end() -> Verdict:
    """Analytic oracle through SmoothedSegmenter with its real noise: FWER <= alpha + 3 SE."""
    rng = np.random.default_rng(16)
    sigma, tau, alpha, n0, n, images = 0.25, 0.75, 0.1, 16, 128, 200
    failures = 0
    for index in range(images):
        channels, height, width = int(rng.choice([1, 3])), int(rng.integers(4, 8)), int(rng.integers(4, 8))
        oracle = linear_oracle(rng, channels, height, width, mixed_targets(rng, height, width, tau), sigma)
        labels = _certify_end_to_end(rng, oracle, index, sigma=sigma, tau=tau, alpha=alpha, n0=n0, n=n)
        failures += bool(wrong_pixels(labels, sigma * norm.ppf(tau), oracle).any())
    rate = failures / images
    return rate <= upper_bound(alpha, images), f"FWER {rate:.4f} (bound {upper_bound(alpha, images):.4f})"


def _recorded_noise(n0: int, n: int, batch_size: int, sigma: float, seed: int,
                    x: torch.Tensor | None = None) -> torch.Tensor:
    """The noise x' - x of every input the base model saw in one certify call, in the order seen."""
    x = torch.full((3, 8, 8), 0.5) if x is None else x
    model = ThresholdSegmenter(torch.full((8, 8), 0.5), record=True)
    smoothed(model, sigma, batch_size).certify(x, n0, n, tau=0.75, alpha=0.1,
                                               generator=torch.Generator().manual_seed(seed))
    return torch.cat(model.inputs) - x


def noise_std_is_sigma() -> Verdict:
    """The noise the base model receives, in the n0 selection draws and in the n estimation draws
    separately, has mean 0 and standard deviation sigma (to 4 %), also where x is 0 or 1 (the noise
    is added to the [0, 1] input, nothing bounds x + delta)."""
    x = torch.tensor([0.0, 0.5, 1.0]).repeat(64)[:192].reshape(3, 8, 8)
    for sigma in (0.12, 0.25):
        n0, n = 30, 60
        noise = _recorded_noise(n0, n, 32, sigma, seed=17, x=x)
        if noise.shape[0] != n0 + n:
            return False, f"the model saw {noise.shape[0]} draws, not n0 + n = {n0 + n}"
        for stream, part in (("selection", noise[:n0]), ("estimation", noise[n0:])):
            std, mean = float(part.std()), float(part.mean())
            if abs(std / sigma - 1) > 0.04 or abs(mean) > 5 * sigma / math.sqrt(part.numel()):
                return False, f"sigma={sigma}, {stream} draws: noise std {std:.4f}, mean {mean:.4f}"
    return True, "noise std = sigma in both streams"


def draws_distinct_and_uncorrelated() -> Verdict:
    """Within and across batches no two draws are equal, and no two are correlated: |r| < 0.5 over 192
    elements, 7 standard deviations of r for independent draws."""
    noise = _recorded_noise(8, 120, 64, 0.25, seed=18)
    flat = noise.reshape(noise.shape[0], -1).double()
    if torch.unique(flat, dim=0).shape[0] != flat.shape[0]:
        return False, "two draws are identical"
    correlation = torch.corrcoef(flat) - torch.eye(flat.shape[0], dtype=flat.dtype)
    worst = float(correlation.abs().max())
    return worst < 0.5, f"largest |correlation| between two draws {worst:.3f}"


def model_sees_n0_plus_n_draws() -> Verdict:
    """One certify call feeds the base model exactly n0 + n noisy inputs, all different."""
    for n0, n in ((10, 50), (33, 100)):
        noise = _recorded_noise(n0, n, 16, 0.25, seed=19)
        distinct = torch.unique(noise.reshape(noise.shape[0], -1), dim=0).shape[0]
        if noise.shape[0] != n0 + n or distinct != n0 + n:
            return False, f"n0={n0}, n={n}: the model saw {noise.shape[0]} inputs, {distinct} distinct"
    return True, "n0 + n distinct draws"


def counts_invariant_to_batch_size_with_batchnorm() -> Verdict:
    """A BatchNorm model handed over in train mode: the seeded counts are the same at batch size 1 and 7
    (in eval mode each draw's output depends on that draw only)."""
    x = torch.rand((3, 6, 6), generator=torch.Generator().manual_seed(20)) * 0.4 + 0.3
    results = []
    for batch_size in (1, 7):
        model = BatchNormSegmenter(3)  # train mode, as constructed
        results.append(smoothed(model, 0.25, batch_size).counts(x, 9, 40,
                                                                generator=torch.Generator().manual_seed(21)))
    (selected_1, counts_1), (selected_7, counts_7) = results
    same = torch.equal(selected_1, selected_7) and torch.equal(counts_1, counts_7)
    return same, "same counts" if same else f"counts differ at {int((counts_1 != counts_7).sum())} pixels"


def selection_and_estimation_follow_the_oracle() -> Verdict:
    """Threshold model (class 1 iff x'_p > t_p): p_1 = Phi((x_p - t_p) / sigma) exactly, whatever the input
    range. Per pixel kind (some at x = t = 1 and x = 0 > t, where a model input outside [0, 1] matters),
    the frequency of selecting class 1 equals P[Binom(n0, p_1) > n0 / 2] and the counts of the selected
    class have mean n * p_selected, independently of the selection (z-scores within 4.5)."""
    sigma, n0, n, images = 0.25, 11, 40, 40
    kinds = [(1.0, 1.0), (0.0, -0.05), (0.5, 0.5), (0.4, 0.55), (0.7, 0.6), (0.3, 0.2), (0.95, 1.05), (0.6, 0.8)]
    kind = np.arange(64).reshape(8, 8) % len(kinds)
    x = torch.tensor([[kinds[k][0] for k in row] for row in kind], dtype=torch.float64).unsqueeze(0)
    thresholds = torch.tensor([[kinds[k][1] for k in row] for row in kind], dtype=torch.float64)
    p1 = norm.cdf((x[0].numpy() - thresholds.numpy()) / sigma)
    select_one = binom.sf(n0 // 2, n0, p1)  # P[more than n0 / 2 of n0 draws are 1] (n0 odd: no ties)
    selected_all, counts_all = [], []
    segmenter = smoothed(ThresholdSegmenter(thresholds), sigma, 32)
    for index in range(images):
        selected, counts = segmenter.counts(x, n0, n, generator=torch.Generator().manual_seed(40_000 + index))
        selected_all.append(selected.numpy())
        counts_all.append(counts.numpy())
    selected, counts = np.stack(selected_all), np.stack(counts_all)
    p_selected = np.where(selected == 1, p1, 1 - p1)
    for k in range(len(kinds)):
        mask = np.broadcast_to(kind == k, selected.shape)
        expected = np.broadcast_to(select_one, selected.shape)[mask]
        z_select = (selected[mask].sum() - expected.sum()) / math.sqrt(max((expected * (1 - expected)).sum(), 1e-12))
        mean = n * p_selected[mask]
        z_count = (counts[mask].sum() - mean.sum()) / math.sqrt(max((mean * (1 - p_selected[mask])).sum(), 1e-12))
        if abs(z_select) > 4.5 or abs(z_count) > 4.5:
            return False, (f"pixel kind x={kinds[k][0]}, t={kinds[k][1]}: z(selection) {z_select:.1f}, "
                           f"z(counts) {z_count:.1f}")
    return True, "selection and estimation follow the oracle"


DETECTORS: dict[str, Callable[[], Verdict]] = {
    detector.__name__: detector
    for detector in (
        pvalues_equal_exact_binomial_tails,
        corrections_equal_statsmodels,
        radius_equals_sigma_normal_quantile,
        family_wise_error_on_oracle_counts,
        boundary_rate_on_oracle_counts,
        boundary_rate_end_to_end,
        family_wise_error_end_to_end,
        noise_std_is_sigma,
        draws_distinct_and_uncorrelated,
        model_sees_n0_plus_n_draws,
        counts_invariant_to_batch_size_with_batchnorm,
        selection_and_estimation_follow_the_oracle,
    )
}


# -------------------------------------------------------------------------------------------- mutants


def _patch_table(monkeypatch, table: Callable[[int, int, float], np.ndarray]) -> None:
    """Replace the p-value table of every certificate by table(n, n0, tau) (n0: the certificate's)."""
    real_certificate = certify_module._certificate

    def _certificate(selected, counts, histogram, n, *, n0, **options):
        real_table = certify_module.binomial_pvalue_table
        certify_module.binomial_pvalue_table = lambda n_, tau: table(n_, n0, tau)
        try:
            return real_certificate(selected, counts, histogram, n, n0=n0, **options)
        finally:
            certify_module.binomial_pvalue_table = real_table

    monkeypatch.setattr(certify_module, "_certificate", _certificate)


def pvalues_over_n_minus_n0(monkeypatch) -> None:
    _patch_table(monkeypatch, lambda n, n0, tau: binom.sf(np.arange(n + 1) - 1, n - n0, tau))


def pvalues_over_n_minus_1(monkeypatch) -> None:
    _patch_table(monkeypatch, lambda n, n0, tau: binom.sf(np.arange(n + 1) - 1, n - 1, tau))


def pvalues_sf_k(monkeypatch) -> None:
    _patch_table(monkeypatch, lambda n, n0, tau: binom.sf(np.arange(n + 1), n, tau))


def holm_without_stopping(monkeypatch) -> None:
    real = certify_module.reject_groups

    def reject_groups(group_pvalues, group_sizes, alpha, correction):
        if correction != "holm":
            return real(group_pvalues, group_sizes, alpha, correction)
        group_pvalues, group_sizes = np.asarray(group_pvalues, np.float64), np.asarray(group_sizes, np.int64)
        order = np.argsort(group_pvalues, kind="stable")
        sizes = group_sizes[order]
        first = np.cumsum(sizes) - sizes
        reject = np.zeros(len(order), dtype=bool)
        reject[order] = group_pvalues[order] <= alpha / (group_sizes.sum() - first).clip(min=1)  # no stop
        return reject & (group_sizes > 0)

    monkeypatch.setattr(certify_module, "reject_groups", reject_groups)


def _patch_noise(monkeypatch, transform: Callable[[torch.Tensor], torch.Tensor], reuse: bool = False) -> None:
    real = smoothing_module.draw_noise

    def draw_noise(shape, count, generator, device, stochastic_denoiser=False, dtype=torch.float32):
        noise, generators = real(shape, 1 if reuse else count, generator, device, stochastic_denoiser, dtype)
        if reuse:
            noise = noise.expand(count, *shape).clone()
            generators = None if generators is None else generators * count
        return transform(noise), generators

    monkeypatch.setattr(smoothing_module, "draw_noise", draw_noise)


def noise_reused_across_batch(monkeypatch) -> None:
    _patch_noise(monkeypatch, lambda noise: noise, reuse=True)


def noise_std_2_sigma(monkeypatch) -> None:
    _patch_noise(monkeypatch, lambda noise: 2 * noise)


def noise_std_half_sigma(monkeypatch) -> None:
    _patch_noise(monkeypatch, lambda noise: noise / 2)


def planted_class_histograms(clamp_stream: int | None = None, shared_draws: bool = False) -> Callable:
    """A re-implementation of SmoothedSegmenter.class_histograms (same noise, same order) with a bug planted:
    clamp_stream: x + delta clamped to [0, 1] in that stream only (0 selection, 1 estimation);
    shared_draws: every stream counts the first draws of one stream (selection = the first n0 estimation
    draws). With neither, identical to the real one (test_harness_without_bug_matches_real_code)."""

    def class_histograms(self, x, draws, generator, progress=False, desc="sampling"):
        height, width = x.shape[-2:]
        histograms = [torch.zeros((self.num_classes, height * width), dtype=torch.int64, device=self.device)
                      for _ in draws]
        if shared_draws:
            starts, ends, total = [0] * len(draws), list(draws), max(draws)
        else:
            ends = np.cumsum(draws).tolist()
            starts, total = [end - count for end, count in zip(ends, draws)], ends[-1]
        if self._working_batch is None:
            self._working_batch = self._auto_batch(x, total)
        done = 0
        with torch.inference_mode():
            while done < total:
                size = min(self._working_batch, total - done)
                noise, generators = smoothing_module.draw_noise(tuple(x.shape), size, generator, self.device,
                                                                self.stochastic_denoiser, x.dtype)
                noisy = x.unsqueeze(0) + self.sigma * noise
                if clamp_stream is not None:
                    lo = max(starts[clamp_stream] - done, 0)
                    hi = min(ends[clamp_stream] - done, size)
                    if lo < hi:
                        noisy[lo:hi] = noisy[lo:hi].clamp(0, 1)
                flat = self._classes_of_draws(noisy, generators).reshape(size, -1)
                for histogram, start, end in zip(histograms, starts, ends):
                    lo, hi = max(start - done, 0), min(end - done, size)
                    if lo < hi:
                        histogram.scatter_add_(0, flat[lo:hi], torch.ones_like(flat[lo:hi]))
                done += size
        return [histogram.reshape(self.num_classes, height, width) for histogram in histograms]

    return class_histograms


def selection_and_estimation_share_draws(monkeypatch) -> None:
    monkeypatch.setattr(SmoothedSegmenter, "class_histograms", planted_class_histograms(shared_draws=True))


def clamp_in_selection_only(monkeypatch) -> None:
    monkeypatch.setattr(SmoothedSegmenter, "class_histograms", planted_class_histograms(clamp_stream=0))


def clamp_in_estimation_only(monkeypatch) -> None:
    monkeypatch.setattr(SmoothedSegmenter, "class_histograms", planted_class_histograms(clamp_stream=1))


def batchnorm_left_in_train_mode(monkeypatch) -> None:
    monkeypatch.setattr(SmoothedSegmenter, "eval_modules", lambda self, warn=True: None)


def radius_at_default_tau(monkeypatch) -> None:
    monkeypatch.setattr(certify_module, "certified_radius", lambda sigma, tau: float(sigma * norm.ppf(0.75)))


def radius_at_larger_tau(monkeypatch) -> None:
    monkeypatch.setattr(certify_module, "certified_radius",
                        lambda sigma, tau: float(sigma * norm.ppf((1 + tau) / 2)))


MUTANTS: dict[str, Callable] = {
    mutant.__name__: mutant
    for mutant in (
        pvalues_over_n_minus_n0,
        pvalues_over_n_minus_1,
        pvalues_sf_k,
        holm_without_stopping,
        noise_reused_across_batch,
        noise_std_2_sigma,
        noise_std_half_sigma,
        selection_and_estimation_share_draws,
        batchnorm_left_in_train_mode,
        radius_at_default_tau,
        radius_at_larger_tau,
        clamp_in_selection_only,
        clamp_in_estimation_only,
    )
}

CAUGHT_BY: dict[str, tuple[str, ...]] = {
    'pvalues_over_n_minus_n0': (
        'pvalues_equal_exact_binomial_tails',
        'family_wise_error_on_oracle_counts',
        'boundary_rate_on_oracle_counts',
        'boundary_rate_end_to_end',
        'family_wise_error_end_to_end',
    ),
    'pvalues_over_n_minus_1': (
        'pvalues_equal_exact_binomial_tails',
        'corrections_equal_statsmodels',
        'boundary_rate_on_oracle_counts',
    ),
    'pvalues_sf_k': (
        'pvalues_equal_exact_binomial_tails',
        'corrections_equal_statsmodels',
        'boundary_rate_on_oracle_counts',
    ),
    'holm_without_stopping': (
        'corrections_equal_statsmodels',
    ),
    'noise_reused_across_batch': (
        'boundary_rate_end_to_end',
        'family_wise_error_end_to_end',
        'noise_std_is_sigma',
        'draws_distinct_and_uncorrelated',
        'model_sees_n0_plus_n_draws',
        'counts_invariant_to_batch_size_with_batchnorm',
        'selection_and_estimation_follow_the_oracle',
    ),
    'noise_std_2_sigma': (
        'boundary_rate_end_to_end',
        'noise_std_is_sigma',
        'selection_and_estimation_follow_the_oracle',
    ),
    'noise_std_half_sigma': (
        'boundary_rate_end_to_end',
        'family_wise_error_end_to_end',
        'noise_std_is_sigma',
        'selection_and_estimation_follow_the_oracle',
    ),
    'selection_and_estimation_share_draws': (
        'noise_std_is_sigma',
        'model_sees_n0_plus_n_draws',
        'selection_and_estimation_follow_the_oracle',
    ),
    'batchnorm_left_in_train_mode': (
        'counts_invariant_to_batch_size_with_batchnorm',
    ),
    'radius_at_default_tau': (
        'radius_equals_sigma_normal_quantile',
        'family_wise_error_on_oracle_counts',
    ),
    'radius_at_larger_tau': (
        'radius_equals_sigma_normal_quantile',
        'family_wise_error_on_oracle_counts',
    ),
    'clamp_in_selection_only': (
        'noise_std_is_sigma',
        'selection_and_estimation_follow_the_oracle',
    ),
    'clamp_in_estimation_only': (
        'boundary_rate_end_to_end',
        'family_wise_error_end_to_end',
        'noise_std_is_sigma',
        'selection_and_estimation_follow_the_oracle',
    ),
}


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_passes_on_real_code(name):
    ok, detail = DETECTORS[name]()
    print(f"\n{name}: {detail}")
    assert ok, detail


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(mutant, monkeypatch):
    assert CAUGHT_BY[mutant], f"no detector listed for {mutant}"
    MUTANTS[mutant](monkeypatch)
    for name in CAUGHT_BY[mutant]:
        ok, detail = DETECTORS[name]()
        print(f"\n{mutant} / {name}: {detail}")
        assert not ok, f"{name} did not catch {mutant}: {detail}"


def test_table_is_caught_by():
    """The module docstring's table lists, per mutant, exactly the detectors of CAUGHT_BY."""
    table: dict[str, tuple[str, ...]] = {}
    lines = __doc__.split("Mutant table:")[1].splitlines()
    for index, line in enumerate(lines):
        name = line.split(":")[0]
        if name in MUTANTS:
            block = []
            for follow in lines[index + 1:]:
                if not follow.startswith("    "):
                    break
                block.append(follow.strip().removeprefix("->").strip())
            table[name] = tuple(" ".join(block).replace(",", " ").split())
    assert table == CAUGHT_BY
    assert set(CAUGHT_BY) == set(MUTANTS)
    assert all(name in DETECTORS for names in CAUGHT_BY.values() for name in names)


def test_harness_without_bug_matches_real_code(monkeypatch):
    """The stream mutants' sampling loop, with no bug planted, gives the real counts bit for bit (at a
    batch size that splits the streams inside a batch), so those mutants differ by their bug only."""
    x = torch.rand((2, 5, 7), generator=torch.Generator().manual_seed(50))
    model = ThresholdSegmenter(torch.rand((5, 7), generator=torch.Generator().manual_seed(51)))
    real = smoothed(model, 0.25, 6).counts(x, 9, 40, generator=torch.Generator().manual_seed(52))
    monkeypatch.setattr(SmoothedSegmenter, "class_histograms", planted_class_histograms())
    planted = smoothed(model, 0.25, 6).counts(x, 9, 40, generator=torch.Generator().manual_seed(52))
    assert torch.equal(real[0], planted[0]) and torch.equal(real[1], planted[1])
    ok, detail = selection_and_estimation_follow_the_oracle()
    assert ok, detail
