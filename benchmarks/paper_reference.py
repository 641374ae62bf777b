"""The paper code's way of certifying one image, as the reference that ``bench_pipeline.py`` times.

Laousy et al. (MICCAI 2023) build on SegCertify: their code draws one noisy copy of the image at a
time, denoises it with the diffusion model and segments it in fp32 (batch 1), keeps every class
map, and then certifies in a Python loop over pixels: the mode of the n0 selection draws, the
count of the selected class in the n estimation draws, one ``scipy.stats.binomtest`` per pixel
(one-sided, ``alternative="greater"``, p = tau), and statsmodels' Holm correction over all pixels.
This module does the same with the project's models, so the benchmark compares approaches on the
same networks and the same machine:

- :func:`sample_one_at_a_time`: batch-1 fp32 sampling under ``torch.no_grad``; each draw's class map
  goes to the CPU as a numpy array, as in the paper's code. The noise is drawn like
  ``medcert_core.smoothing.draw_noise`` (one ``torch.randn(x.shape, generator=...)`` per draw, on the
  generator's device), so with the same seed the draws are the ones medcert sees.
- :func:`per_pixel_statistics`: the per-pixel loop, timed on a measured subset of pixels and
  extrapolated to H * W (a 512 x 512 image takes tens of seconds); Holm is timed on all pixels.
  The pixels outside the subset get the same p-values from a vectorised ``binom.sf`` (untimed, and
  checked against the loop on the subset) so that Holm sees the whole image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import binom, binomtest
from statsmodels.stats.multitest import multipletests

ABSTAIN = -1  # medcert_core.ABSTAIN


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def classes_of(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids from (B, K, H, W) logits, or from (B, 1, H, W) binary logits with K = 2."""
    if logits.shape[1] == 1 and num_classes == 2:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)


@dataclass
class SamplingResult:
    """Class maps of the timed draws and how long they took (seconds, summed over draws)."""

    samples: np.ndarray  # (draws_run, H, W) int64
    draws_run: int
    draws_total: int
    seconds: float  # wall clock of the whole loop over draws_run draws
    denoiser_seconds: float
    segmenter_seconds: float
    noise_seconds: float

    @property
    def scale(self) -> float:
        """Factor from the measured draws to all n0 + n draws (1 when all were run)."""
        return self.draws_total / self.draws_run

    def extrapolated(self) -> dict[str, float]:
        return {
            "seconds": self.seconds * self.scale,
            "denoiser_seconds": self.denoiser_seconds * self.scale,
            "segmenter_seconds": self.segmenter_seconds * self.scale,
            "noise_and_transfer_seconds": (self.seconds - self.denoiser_seconds - self.segmenter_seconds) * self.scale,
        }


def sample_one_at_a_time(
    denoiser: torch.nn.Module | None,
    segmenter: torch.nn.Module,
    x: torch.Tensor,
    num_classes: int,
    sigma: float,
    draws: int,
    generator: torch.Generator,
    *,
    device: torch.device,
    timed_draws: int | None = None,
) -> SamplingResult:
    """Run ``timed_draws`` (default: all ``draws``) noisy copies of x (C, H, W) through f(D(.)), one at a time.

    fp32, batch 1, ``torch.no_grad``, the class map of every draw moved to the CPU: the paper code's
    loop. The device is synchronised around the denoiser and the segmenter to split the time.
    """
    run = draws if timed_draws is None else max(1, min(int(timed_draws), draws))
    x = x.to(device=device, dtype=torch.float32)
    maps = []
    denoiser_seconds = segmenter_seconds = noise_seconds = 0.0
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(run):
            tick = time.perf_counter()
            noise = torch.randn(tuple(x.shape), generator=generator, device=generator.device).to(device)
            noisy = (x + sigma * noise).unsqueeze(0)
            synchronize(device)
            tock = time.perf_counter()
            noise_seconds += tock - tick
            clean = denoiser(noisy) if denoiser is not None else noisy
            synchronize(device)
            tick = time.perf_counter()
            denoiser_seconds += tick - tock
            logits = segmenter(clean)
            synchronize(device)
            tock = time.perf_counter()
            segmenter_seconds += tock - tick
            maps.append(classes_of(logits, num_classes)[0].cpu().numpy())
    synchronize(device)
    seconds = time.perf_counter() - start
    return SamplingResult(np.stack(maps).astype(np.int64), run, draws, seconds, denoiser_seconds,
                          segmenter_seconds, noise_seconds)


def complete_draws(samples: np.ndarray, draws: int) -> np.ndarray:
    """A (draws, H, W) tensor from fewer measured draws, repeating them in order.

    Only for timing the statistics when the sampling itself was timed on a subset of draws: the
    labels it gives are not a certificate of the image.
    """
    reps = -(-draws // samples.shape[0])
    return np.concatenate([samples] * reps)[:draws]


def pixel_subset(num_pixels: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct flat pixel indices (sorted), or all of them when count >= num_pixels."""
    if count >= num_pixels:
        return np.arange(num_pixels)
    return np.sort(np.random.default_rng(seed).choice(num_pixels, size=count, replace=False))


def certify_pixel(column: np.ndarray, n0: int, num_classes: int, tau: float) -> tuple[int, float]:
    """The paper code's per-pixel step: mode of the n0 selection draws, count in the n others, binomtest."""
    n = column.shape[0] - n0
    votes = np.zeros(num_classes)
    for draw in range(n0):
        votes[column[draw]] += 1
    selected = int(np.argmax(votes))
    count = int(np.sum(column[n0:] == selected))
    return selected, binomtest(count, n, tau, alternative="greater").pvalue


def vectorised_pvalues(flat: np.ndarray, n0: int, num_classes: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Selected class and p-value of every pixel of flat (n0 + n, P), the same numbers as the loop."""
    n = flat.shape[0] - n0
    votes = np.stack([(flat[:n0] == k).sum(0) for k in range(num_classes)])
    selected = votes.argmax(0)  # first maximum, like np.argmax on each pixel's votes
    counts = (flat[n0:] == selected).sum(0)
    return selected, binom.sf(counts - 1, n, tau)


@dataclass
class StatisticsResult:
    pixels: np.ndarray  # flat indices the loop ran on
    labels: np.ndarray  # labels of those pixels (class id or ABSTAIN), Holm over all pixels
    loop_seconds: float  # the loop over ``pixels``
    holm_seconds: float  # multipletests over all H * W p-values
    num_pixels: int
    loop_matches_vectorised: bool
    notes: list[str] = field(default_factory=list)

    @property
    def extrapolated_loop_seconds(self) -> float:
        return self.loop_seconds * self.num_pixels / len(self.pixels)

    @property
    def seconds(self) -> float:
        """Per-image statistics time: the loop extrapolated to every pixel, plus Holm."""
        return self.extrapolated_loop_seconds + self.holm_seconds


def per_pixel_statistics(samples: np.ndarray, n0: int, num_classes: int, tau: float, alpha: float,
                         pixels: np.ndarray) -> StatisticsResult:
    """The paper code's statistics on (n0 + n, H, W) class ids; the loop runs on ``pixels`` only."""
    draws, height, width = samples.shape
    flat = samples.reshape(draws, -1)
    selected, pvalues = vectorised_pvalues(flat, n0, num_classes, tau)  # untimed: fills the other pixels
    loop_selected = np.empty(len(pixels), dtype=np.int64)
    loop_pvalues = np.empty(len(pixels))
    start = time.perf_counter()
    for i, pixel in enumerate(pixels):
        loop_selected[i], loop_pvalues[i] = certify_pixel(flat[:, pixel], n0, num_classes, tau)
    loop_seconds = time.perf_counter() - start
    matches = bool(np.array_equal(loop_selected, selected[pixels])
                   and np.allclose(loop_pvalues, pvalues[pixels], rtol=1e-9, atol=1e-300))
    pvalues[pixels] = loop_pvalues
    selected[pixels] = loop_selected
    start = time.perf_counter()
    reject = multipletests(pvalues, alpha=alpha, method="holm")[0]
    holm_seconds = time.perf_counter() - start
    labels = np.where(reject, selected, ABSTAIN)[pixels]
    return StatisticsResult(pixels, labels, loop_seconds, holm_seconds, height * width, matches)


def reference_certify(
    denoiser: torch.nn.Module | None,
    segmenter: torch.nn.Module,
    x: torch.Tensor,
    *,
    num_classes: int,
    sigma: float,
    n0: int,
    n: int,
    tau: float,
    alpha: float,
    generator: torch.Generator,
    device: torch.device,
    pixels: np.ndarray,
    timed_draws: int | None = None,
    on_sampled: Callable[[SamplingResult], None] | None = None,
) -> tuple[SamplingResult, StatisticsResult, np.ndarray]:
    """Certify one image the paper code's way. Returns (sampling, statistics, the (n0 + n, H, W) samples).

    With ``timed_draws`` < n0 + n the sampling is timed on that many draws and the statistics run
    on those draws repeated (timing only; the labels are then not the image's certificate).
    """
    sampling = sample_one_at_a_time(denoiser, segmenter, x, num_classes, sigma, n0 + n, generator,
                                    device=device, timed_draws=timed_draws)
    if on_sampled is not None:
        on_sampled(sampling)
    samples = sampling.samples if sampling.draws_run == n0 + n else complete_draws(sampling.samples, n0 + n)
    statistics = per_pixel_statistics(samples, n0, num_classes, tau, alpha, pixels)
    return sampling, statistics, samples
