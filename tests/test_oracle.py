"""An analytic oracle for the certificate: per-pixel linear base models, whose smoothing is known exactly.

Pixel p of an image x in [0, 1]^(C, H, W) has the base class f(x)_p = [w_p . x > b_p] (class 1, else 0),
as logits (B, 2, H, W) with channel 0 = 0 and channel 1 = w_p . x - b_p. Under x + delta,
delta ~ N(0, sigma^2 I), w_p . delta ~ N(0, sigma^2 ||w_p||^2), so the smoothed probability of class 1 is

    p_1(x)_p = Phi(m_p / (sigma ||w_p||)),   m_p = w_p . x - b_p,

the smoothed class is [m_p > 0], and it is constant exactly within the L2 ball of radius
|m_p| / ||w_p|| around x (the exact robust radius: the hyperplane w_p . x' = b_p is that far away).
A certified pixel is wrong when its class is not [m_p > 0] or when the certificate's radius R exceeds
|m_p| / ||w_p||; Holm (and Bonferroni) promise that the probability of an image with ANY wrong pixel
is at most alpha. The tests measure that rate over thousands of random images at alpha = 0.1 (so
that 3 standard errors are a small fraction of alpha and the test has power), with most pixels
placed just below tau (true nulls at the edge of the null hypothesis, where the rate is sharpest)
and the others clearly certifiable; and the rate at which a pixel placed at p = tau exactly is
certified, against the exact level the binomial test can attain (``scipy.stats.binom``).

Three paths, all with fixed seeds: the real ``SmoothedSegmenter`` with its real noise (end to end);
``certify`` on class-id samples drawn from the analytic p; ``certify_counts`` on counts drawn from
the exact binomial distributions of the selection and estimation counts (the fast path that makes
thousands of images cheap).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from medcert_core import ABSTAIN
from medcert_core.certify import certify, certify_counts
from medcert_core.smoothing import SmoothedSegmenter

SIGMA = 0.25
TAU = 0.75
ALPHA = 0.1
NULL_EDGE = 1e-6  # nulls sit at p = tau - NULL_EDGE: certifying one is a real error (R > exact radius)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread


class LinearSegmenter(torch.nn.Module):
    """Logits (B, 2, H, W): channel 0 = 0, channel 1 = w_p . x - b_p for every pixel p (float64)."""

    def __init__(self, weights: np.ndarray, bias: np.ndarray, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float64))  # (H*W, C*H*W)
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float64))  # (H*W,)
        self.image_shape = image_shape

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = self.image_shape[1:]
        margin = batch.reshape(batch.shape[0], -1).to(torch.float64) @ self.weights.T - self.bias
        margin = margin.reshape(batch.shape[0], 1, height, width)
        return torch.cat([torch.zeros_like(margin), margin], dim=1)


@dataclass
class LinearOracle:
    """One image and its per-pixel linear base model, with the exact smoothed quantities."""

    x: np.ndarray  # (C, H, W) in [0, 1]
    weights: np.ndarray  # (H*W, C*H*W)
    bias: np.ndarray  # (H*W,)
    sigma: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape[1], self.x.shape[2]

    @property
    def margin(self) -> np.ndarray:
        return (self.weights @ self.x.reshape(-1) - self.bias).reshape(self.shape)

    @property
    def weight_norm(self) -> np.ndarray:
        return np.linalg.norm(self.weights, axis=1).reshape(self.shape)

    @property
    def p1(self) -> np.ndarray:
        """Exact smoothed probability of class 1, (H, W)."""
        return norm.cdf(self.margin / (self.sigma * self.weight_norm))

    @property
    def smoothed_class(self) -> np.ndarray:
        return (self.margin > 0).astype(np.int64)

    @property
    def robust_radius(self) -> np.ndarray:
        """The exact robust radius: the smoothed class of pixel p is constant exactly within |m_p| / ||w_p||."""
        return np.abs(self.margin) / self.weight_norm

    def module(self) -> LinearSegmenter:
        return LinearSegmenter(self.weights, self.bias, self.x.shape)

    def tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.x, dtype=torch.float64)


def make_oracle(rng: np.random.Generator, channels: int, height: int, width: int, q: np.ndarray,
                sigma: float = SIGMA) -> LinearOracle:
    """A random image and random w_p, with b_p chosen so that p_1(x)_p = q_p (q: (H, W))."""
    x = rng.random((channels, height, width))
    weights = rng.standard_normal((height * width, channels * height * width))
    norms = np.linalg.norm(weights, axis=1)
    bias = weights @ x.reshape(-1) - sigma * norms * norm.ppf(q.reshape(-1))
    return LinearOracle(x, weights, bias, sigma)


def mixed_targets(rng: np.random.Generator, height: int, width: int, tau: float = TAU) -> np.ndarray:
    """Per-pixel p_1: 60 % true nulls at the edge (p_c = tau - NULL_EDGE for c = 1 or 0), 10 % nulls
    inside (p_1 anywhere between 1 - tau and tau), 30 % alternatives (p_c uniform in (tau, 0.9999))."""
    u = rng.random((height, width))
    side = rng.random((height, width)) < 0.5  # which class the pixel leans to
    edge = tau - NULL_EDGE
    inside = rng.uniform(1 - tau + NULL_EDGE, tau - NULL_EDGE, (height, width))
    strong = rng.uniform(tau + 1e-3, 0.9999, (height, width))
    q = np.where(u < 0.6, edge, np.where(u < 0.7, inside, strong))
    lean_to_class_one = np.where(u < 0.7, q, np.where(side, q, 1 - q))
    return np.where((u < 0.6) & ~side, 1 - edge, lean_to_class_one)


def random_size(rng: np.random.Generator) -> tuple[int, int, int]:
    return int(rng.choice([1, 3])), int(rng.integers(4, 9)), int(rng.integers(4, 9))


def binomial_counts(rng: np.random.Generator, p1: np.ndarray, n0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected, counts) with their exact distribution: the mode of n0 independent draws (ties -> class 0,
    the smallest id), then the number of n further independent draws that give it."""
    ones = rng.binomial(n0, p1)
    selected = (2 * ones > n0).astype(np.int64)
    counts = rng.binomial(n, np.where(selected == 1, p1, 1 - p1)).astype(np.int64)
    return selected, counts


def wrong_pixels(labels: np.ndarray, radius: float, oracle: LinearOracle) -> np.ndarray:
    """Certified pixels whose class is not the smoothed class, or whose radius exceeds the exact one."""
    certified = labels != ABSTAIN
    return certified & ((labels != oracle.smoothed_class) | (radius > oracle.robust_radius))


def upper_bound(alpha: float, trials: int) -> float:
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_oracle_is_exact():
    """The oracle's analytic p_1 matches a Monte-Carlo estimate of the module's own output under noise."""
    rng = np.random.default_rng(0)
    oracle = make_oracle(rng, 3, 5, 6, rng.uniform(0.05, 0.95, (5, 6)))
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    noisy = oracle.tensor().unsqueeze(0) + SIGMA * torch.randn((draws, 3, 5, 6), generator=generator,
                                                               dtype=torch.float64)
    with torch.no_grad():
        frequency = (oracle.module()(noisy).argmax(1) == 1).double().mean(0).numpy()
    assert np.abs(frequency - oracle.p1).max() < 4.5 * math.sqrt(0.25 / draws)
    radius = oracle.robust_radius
    # moving x by the exact radius along -sign(m) w / ||w|| lands on the hyperplane of that pixel
    w = oracle.weights[7] / np.linalg.norm(oracle.weights[7])
    moved = oracle.x.reshape(-1) - np.sign(oracle.margin.reshape(-1)[7]) * radius.reshape(-1)[7] * w
    assert abs(oracle.weights[7] @ moved - oracle.bias[7]) < 1e-9


@pytest.mark.parametrize("correction, images, seed", [("holm", 4000, 1), ("bonferroni", 1500, 2)])
def test_family_wise_error_on_exact_binomial_counts(correction, images, seed):
    """Thousands of images through the real ``certify_counts`` on counts drawn from the exact binomials."""
    rng = np.random.default_rng(seed)
    n0, n = 32, 500
    failures, certified, pixels = 0, 0, 0
    for _ in range(images):
        channels, height, width = random_size(rng)
        oracle = make_oracle(rng, channels, height, width, mixed_targets(rng, height, width))
        selected, counts = binomial_counts(rng, oracle.p1, n0, n)
        cert = certify_counts(selected, counts, n, sigma=SIGMA, tau=TAU, alpha=ALPHA, correction=correction, n0=n0)
        failures += bool(wrong_pixels(cert.labels, cert.radius, oracle).any())
        certified += int((cert.labels != ABSTAIN).sum())
        pixels += height * width
    rate = failures / images
    print(f"\n{correction}: family-wise error {rate:.4f} over {images} images "
          f"(bound {upper_bound(ALPHA, images):.4f}); certified pixels {certified / pixels:.3f}")
    assert rate <= upper_bound(ALPHA, images)
    assert rate >= ALPHA / 3  # the setup is sharp: nulls at the edge bring the rate close to alpha
    assert certified / pixels > 0.2  # and it has power: the alternatives do get certified


def test_family_wise_error_on_sampled_class_ids():
    """Hundreds of images through the real ``certify`` on (n0 + n, H, W) class ids drawn from the analytic p."""
    rng = np.random.default_rng(3)
    n0, n, images = 32, 400, 400
    failures = 0
    for _ in range(images):
        channels, height, width = random_size(rng)
        oracle = make_oracle(rng, channels, height, width, mixed_targets(rng, height, width))
        samples = (rng.random((n0 + n, height, width)) < oracle.p1).astype(np.int64)
        cert = certify(samples, n0, sigma=SIGMA, tau=TAU, alpha=ALPHA, num_classes=2)
        failures += bool(wrong_pixels(cert.labels, cert.radius, oracle).any())
    rate = failures / images
    print(f"\ncertify(samples): family-wise error {rate:.4f} over {images} images "
          f"(bound {upper_bound(ALPHA, images):.4f})")
    assert rate <= upper_bound(ALPHA, images)


def test_family_wise_error_end_to_end_with_real_noise():
    """The real ``SmoothedSegmenter`` on the linear models, with its own Gaussian noise and counting."""
    rng = np.random.default_rng(4)
    n0, n, images = 16, 256, 500
    failures, certified, pixels = 0, 0, 0
    for index in range(images):
        channels, height, width = random_size(rng)
        oracle = make_oracle(rng, channels, height, width, mixed_targets(rng, height, width))
        smoothed = SmoothedSegmenter(oracle.module(), num_classes=2, sigma=SIGMA, batch_size=n0 + n, device="cpu")
        cert = smoothed.certify(oracle.tensor(), n0, n, tau=TAU, alpha=ALPHA,
                                generator=torch.Generator().manual_seed(10_000 + index))
        labels = cert.labels.cpu().numpy()
        failures += bool(wrong_pixels(labels, cert.radius, oracle).any())
        certified += int((labels != ABSTAIN).sum())
        pixels += height * width
    rate = failures / images
    print(f"\nSmoothedSegmenter: family-wise error {rate:.4f} over {images} images "
          f"(bound {upper_bound(ALPHA, images):.4f}); certified pixels {certified / pixels:.3f}")
    assert rate <= upper_bound(ALPHA, images)
    assert certified / pixels > 0.2


def test_per_pixel_error_without_correction():
    """correction="none" promises alpha per pixel, not per image: the rate of wrongly certified edge nulls."""
    rng = np.random.default_rng(5)
    n0, n, images = 32, 500, 400
    wrong, nulls = 0, 0
    for _ in range(images):
        channels, height, width = random_size(rng)
        oracle = make_oracle(rng, channels, height, width, mixed_targets(rng, height, width))
        selected, counts = binomial_counts(rng, oracle.p1, n0, n)
        cert = certify_counts(selected, counts, n, sigma=SIGMA, tau=TAU, alpha=ALPHA, correction="none", n0=n0)
        edge = np.abs(np.maximum(oracle.p1, 1 - oracle.p1) - (TAU - NULL_EDGE)) < 1e-9
        wrong += int((wrong_pixels(cert.labels, cert.radius, oracle) & edge).sum())
        nulls += int(edge.sum())
    rate = wrong / nulls
    level = float(binom.sf(np.argmax(binom.sf(np.arange(n + 1) - 1, n, TAU) <= ALPHA) - 1, n, TAU))
    print(f"\nnone: per-pixel error of edge nulls {rate:.4f} over {nulls} pixels (attainable level {level:.4f})")
    assert rate <= upper_bound(ALPHA, nulls)  # pixels of one image share noise only in the end-to-end path
    assert abs(rate - level) < 4 * math.sqrt(level * (1 - level) / nulls)


def attainable_level(n: int, tau: float, alpha: float) -> float:
    """The exact probability that Binom(n, tau) reaches the smallest count whose p-value is <= alpha."""
    pvalues = binom.sf(np.arange(n + 1) - 1, n, tau)
    threshold = int(np.argmax(pvalues <= alpha))
    return float(binom.sf(threshold - 1, n, tau))


def boundary_oracle(rng: np.random.Generator, size: int = 4) -> tuple[LinearOracle, tuple[int, int]]:
    """One pixel at p_1 = tau exactly (m_p = sigma ||w_p|| Phi^-1(tau)); every other pixel is certified with
    near certainty (p_c = 0.99999), so Holm tests the boundary pixel at level alpha / 1."""
    q = np.where(rng.random((size, size)) < 0.5, 0.99999, 1 - 0.99999)
    pixel = (int(rng.integers(size)), int(rng.integers(size)))
    q[pixel] = TAU
    return make_oracle(rng, 1, size, size, q), pixel


@pytest.mark.parametrize("n, trials", [(1000, 3000), (200, 3000)])
def test_boundary_pixel_is_certified_at_the_attainable_level(n, trials):
    """A pixel at p = tau exactly is certified at rate P[select it] * level, level the exact attainable one."""
    rng = np.random.default_rng(6 + n)
    n0 = 64
    level = attainable_level(n, TAU, ALPHA)
    assert level >= ALPHA / 3  # at this n the binomial's discreteness lets the test come close to alpha
    expected = level * float(binom.sf(n0 // 2, n0, TAU))  # the selection must first pick class 1
    hits = 0
    for _ in range(trials):
        oracle, pixel = boundary_oracle(rng)
        assert abs(oracle.p1[pixel] - TAU) < 1e-12
        selected, counts = binomial_counts(rng, oracle.p1, n0, n)
        cert = certify_counts(selected, counts, n, sigma=SIGMA, tau=TAU, alpha=ALPHA, n0=n0)
        hits += bool(cert.labels[pixel] == 1)
    rate = hits / trials
    spread = 4 * math.sqrt(expected * (1 - expected) / trials)
    print(f"\nn={n}: boundary pixel certified at {rate:.4f} over {trials} images; exact attainable level "
          f"{level:.4f}, expected {expected:.4f} +- {spread:.4f}")
    assert max(ALPHA / 3, expected - spread) <= rate <= min(upper_bound(ALPHA, trials), expected + spread)


def test_boundary_pixel_end_to_end_with_real_noise():
    """The same through ``SmoothedSegmenter`` and its noise (fewer trials, the same honest band)."""
    rng = np.random.default_rng(7)
    n0, n, trials = 32, 300, 400
    level = attainable_level(n, TAU, ALPHA)
    expected = level * float(binom.sf(n0 // 2, n0, TAU))
    hits = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either (n is large enough for 16 pixels)
        for index in range(trials):
            oracle, pixel = boundary_oracle(rng)
            smoothed = SmoothedSegmenter(oracle.module(), num_classes=2, sigma=SIGMA, batch_size=n0 + n,
                                         device="cpu")
            cert = smoothed.certify(oracle.tensor(), n0, n, tau=TAU, alpha=ALPHA,
                                    generator=torch.Generator().manual_seed(20_000 + index))
            hits += bool(cert.labels[pixel] == 1)
    rate = hits / trials
    spread = 4 * math.sqrt(expected * (1 - expected) / trials)
    print(f"\nSmoothedSegmenter: boundary pixel certified at {rate:.4f} over {trials} images; exact attainable "
          f"level {level:.4f}, expected {expected:.4f} +- {spread:.4f}")
    assert max(ALPHA / 3, expected - spread) <= rate <= min(upper_bound(ALPHA, trials), expected + spread)
