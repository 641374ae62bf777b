"""Per-pixel certification statistics (SegCertify with multiple-testing correction).

Statistics only: numpy, scipy and torch; no models, no I/O.

For every pixel p, the first ``n0`` draws select a class ``c(p)`` (the most frequent one) and the
next ``n`` independent draws count how often ``c(p)`` comes out, ``k(p)``. The one-sided binomial
p-value of "the smoothed probability of c(p) is at most tau" is

    pvalue(p) = P[Binom(n, tau) >= k(p)] = scipy.stats.binom.sf(k(p) - 1, n, tau).

The pixels whose null hypothesis is rejected by the chosen correction at level ``alpha`` keep
``c(p)``; all others are :data:`ABSTAIN`. With probability at least ``1 - alpha`` (family-wise
over all pixels for "holm" and "bonferroni"), every certified pixel keeps its smoothed class under
any L2 perturbation of norm below ``radius = sigma * Phi^-1(tau)`` (Cohen et al. 2019;
Fischer et al. 2021).

A p-value depends only on the integer count k in 0..n, so the corrections work on the n + 1
possible values and their histogram rather than on a sort of all H*W pixels; ties and p-values
equal to a threshold are decided exactly as ``statsmodels.stats.multitest.multipletests`` does.

Spatial dimensions are generic: every function taking (H, W) arrays takes (D, H, W) volumes alike,
one family of tests over all of their voxels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
from scipy.stats import binom, norm

ABSTAIN: int = -1
CORRECTIONS: tuple[str, ...] = ("holm", "bonferroni", "none")
MAX_INFERRED_CLASSES = 65536  # without num_classes, a larger id is more likely a bug than a class
SPATIAL_DIMS = (2, 3)  # an image (H, W) or a volume (D, H, W)

Array = Union[np.ndarray, torch.Tensor]
Correction = Literal["holm", "bonferroni", "none"]


@dataclass(frozen=True, eq=False)
class Certificate:
    """A per-pixel (per-voxel) certificate.

    labels: (H, W) int64 for an image, (D, H, W) for a volume: the certified class id or ABSTAIN.
    pvalues: the labels' shape, float64, the raw (uncorrected) p-value of every pixel.
    radius: L2 radius, in the input's [0, 1] scale, within which certified pixels are stable.

    Compared by identity (``eq=False``): element-wise array equality has no single truth value.
    """

    labels: Array
    pvalues: Array
    radius: float
    n0: int
    n: int
    tau: float
    alpha: float
    sigma: float
    correction: str

    @property
    def abstain_fraction(self) -> float:
        """Fraction of pixels (voxels) that abstain."""
        return float((self.labels == ABSTAIN).sum()) / math.prod(self.labels.shape)


def certified_radius(sigma: float, tau: float) -> float:
    """R = sigma * Phi^-1(tau): the radius a pixel with smoothed probability > tau is certified at."""
    return float(sigma * norm.ppf(tau))


def binomial_pvalue_table(n: int, tau: float) -> np.ndarray:
    """p-value of every possible count: table[k] = P[Binom(n, tau) >= k], k = 0..n. Shape (n+1,)."""
    return binom.sf(np.arange(n + 1) - 1, n, tau).astype(np.float64)


def reject_groups(
    group_pvalues: np.ndarray, group_sizes: np.ndarray, alpha: float, correction: str
) -> np.ndarray:
    """Decide the tests when many of them share a p-value.

    group_pvalues: (G,) the p-value of each group; group_sizes: (G,) how many tests have it.
    Returns (G,) bool, whether the tests of each group are rejected, identical to what
    ``multipletests(pvalues_of_all_tests, alpha, method=correction)`` decides for them.

    Holm sorts the m tests by p-value and rejects the i-th smallest (0-based) while
    p <= alpha / (m - i), stopping at the first non-rejection. Tests that share a p-value are
    adjacent in that order and the thresholds grow along it, so a group is rejected as a whole
    exactly when its first position passes.
    """
    group_pvalues = np.asarray(group_pvalues, dtype=np.float64)
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    m = int(group_sizes.sum())
    if correction == "none":
        return group_pvalues <= alpha
    if correction == "bonferroni":
        return group_pvalues <= alpha / float(m)
    if correction != "holm":
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    order = np.argsort(group_pvalues, kind="stable")
    sizes = group_sizes[order]
    first_position = np.cumsum(sizes) - sizes
    passes = group_pvalues[order] <= alpha / (m - first_position).clip(min=1)
    fails_nonempty = (~passes) & (sizes > 0)
    stop = int(np.argmax(fails_nonempty)) if fails_nonempty.any() else len(order)
    reject = np.zeros(len(order), dtype=bool)
    reject[order[:stop]] = True
    reject &= group_sizes > 0
    return reject


def smallest_certifiable_n(num_pixels: int, tau: float, alpha: float, correction: str) -> int:
    """The smallest n for which a pixel whose n draws all agree can be certified.

    The smallest possible p-value is tau^n; Holm and Bonferroni first compare it with
    alpha / num_pixels, no correction with alpha.
    """
    level = alpha if correction == "none" else alpha / num_pixels
    n = max(1, math.ceil(math.log(level) / math.log(tau)))
    while binom.sf(n - 1, n, tau) > level:  # guard the float rounding of the logarithms
        n += 1
    while n > 1 and binom.sf(n - 2, n - 1, tau) <= level:
        n -= 1
    return n


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def check_tau(tau: float) -> None:
    """tau in [0.5, 1): below 0.5 the radius sigma * Phi^-1(tau) is negative and p_c > tau does not
    make c the smoothed class; at 1 nothing can be certified."""
    if not (_is_real_number(tau) and 0.5 <= float(tau) < 1.0):
        raise ValueError(f"tau must be a number with 0.5 <= tau < 1, got {tau!r}")


def check_alpha(alpha: float) -> None:
    """alpha in (0, 1): the probability that the certificate is wrong."""
    if not (_is_real_number(alpha) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must be a number with 0 < alpha < 1, got {alpha!r}")


def check_sigma(sigma: float) -> None:
    """sigma > 0: the smoothing noise std in the input's [0, 1] scale."""
    if not (_is_real_number(sigma) and float(sigma) > 0.0):
        raise ValueError(f"sigma must be a number > 0 (the noise std in the [0, 1] input scale), got {sigma!r}")


def check_draws(name: str, value: int) -> None:
    """A number of draws (n0, n): an integer >= 1."""
    if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_correction(correction: str) -> None:
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")


def _validate_parameters(n: int, tau: float, alpha: float, sigma: float, correction: str) -> None:
    check_tau(tau)
    check_alpha(alpha)
    check_sigma(sigma)
    check_draws("n (the number of estimation draws)", n)
    check_correction(correction)


def _all_below(values: Array, limit: int) -> bool:
    """Whether every id is in 0..limit - 1, in one pass on numpy (negatives read as unsigned are huge)."""
    if isinstance(values, torch.Tensor):
        return bool(((values >= 0) & (values < limit)).all())
    values = np.ascontiguousarray(values)
    if values.dtype.kind == "i":
        if limit > 2 ** (8 * values.dtype.itemsize - 1):  # a negative could read as an unsigned id < limit
            return int(values.min()) >= 0 and int(values.max()) < limit
        values = values.view(values.dtype.str.replace("i", "u"))
    return int(values.max()) < limit


def check_class_ids(values: Array, num_classes: int | None, name: str = "class ids") -> None:
    """Reject negative ids, and ids >= num_classes when it is given, before anything is counted."""
    if not (values.numel() if isinstance(values, torch.Tensor) else values.size):
        return
    if _all_below(values, num_classes if num_classes is not None else MAX_INFERRED_CLASSES):
        return
    smallest, largest = int(values.min()), int(values.max())
    if smallest < 0:
        raise ValueError(f"{name} must be >= 0, got {smallest}")
    if num_classes is not None:
        raise ValueError(f"{name} must lie in 0..{num_classes - 1} (num_classes = {num_classes}), got {largest}")
    raise ValueError(f"{name} go up to {largest}; pass num_classes for ids >= {MAX_INFERRED_CLASSES}")


def _is_integer_dtype(values: Array) -> bool:
    if isinstance(values, torch.Tensor):
        return not values.dtype.is_floating_point and not values.dtype.is_complex and values.dtype != torch.bool
    return np.issubdtype(values.dtype, np.integer)


def warn_if_n_too_small(num_pixels: int, n: int, tau: float, alpha: float, correction: str,
                        stacklevel: int = 3) -> None:
    """A UserWarning when n draws cannot certify any of ``num_pixels`` pixels at this tau and alpha."""
    needed = smallest_certifiable_n(num_pixels, tau, alpha, correction)
    if n < needed:
        warnings.warn(
            f"n = {n} draws cannot certify any pixel: with {num_pixels} pixels, tau = {tau}, "
            f"alpha = {alpha} and correction = {correction!r}, the smallest n that could is {needed}.",
            stacklevel=stacklevel,
        )


def certify_counts(
    selected: Array,
    counts: Array,
    n: int,
    *,
    sigma: float,
    tau: float = 0.75,
    alpha: float = 0.001,
    correction: Correction = "holm",
    n0: int = 0,
    num_classes: int | None = None,
) -> Certificate:
    """Certify from accumulated counts.

    selected: (H, W) (or (D, H, W) for a volume) integer class ids chosen from the selection draws
    (in 0..num_classes - 1 when num_classes is given).
    counts: the same shape, integers in 0..n, how many of the n estimation draws gave ``selected``.
    Returns a Certificate whose arrays are of the input's family (torch on its device, or numpy).
    """
    _validate_parameters(n, tau, alpha, sigma, correction)
    histogram = _checked_count_histogram(selected, counts, n, num_classes)
    warn_if_n_too_small(int(np.prod(tuple(counts.shape))), n, tau, alpha, correction)
    return _certificate(selected, counts, histogram, n, sigma=sigma, tau=tau, alpha=alpha, correction=correction,
                        n0=n0)


def _checked_count_histogram(selected: Array, counts: Array, n: int, num_classes: int | None) -> np.ndarray:
    """Check selected and counts (shapes, dtypes, ranges, class ids); returns the (n + 1,) histogram of counts."""
    if tuple(selected.shape) != tuple(counts.shape) or len(selected.shape) not in SPATIAL_DIMS:
        raise ValueError(
            f"selected and counts must both have shape (H, W) or (D, H, W); got {tuple(selected.shape)} and "
            f"{tuple(counts.shape)}"
        )
    if not (_is_integer_dtype(selected) and _is_integer_dtype(counts)):
        raise TypeError(f"selected and counts must be integer arrays, got {selected.dtype} and {counts.dtype}")
    if int(counts.min()) < 0 or int(counts.max()) > n:
        raise ValueError(f"counts must lie in 0..n = 0..{n}, got {int(counts.min())}..{int(counts.max())}")
    check_class_ids(selected, num_classes, "selected class ids")
    if isinstance(counts, torch.Tensor):
        return torch.bincount(counts.reshape(-1).long(), minlength=n + 1).cpu().numpy()
    return np.bincount(counts.reshape(-1).astype(np.int64), minlength=n + 1)


def _certificate(selected: Array, counts: Array, histogram: np.ndarray, n: int, *, sigma: float, tau: float,
                 alpha: float, correction: str, n0: int) -> Certificate:
    """The certificate at ``tau`` of checked counts whose histogram is ``histogram``."""
    table = binomial_pvalue_table(n, tau)
    rejected = reject_groups(table, histogram, alpha, correction)

    if isinstance(counts, torch.Tensor):
        index = counts.long()
        pvalues = torch.as_tensor(table, device=counts.device)[index]
        keep = torch.as_tensor(rejected, device=counts.device)[index]
        labels = torch.where(keep, selected.to(torch.int64), torch.full_like(index, ABSTAIN))
    else:
        index = counts.astype(np.int64)
        pvalues = table[index]
        labels = np.where(rejected[index], selected.astype(np.int64), ABSTAIN).astype(np.int64)
    return Certificate(
        labels=labels,
        pvalues=pvalues,
        radius=certified_radius(sigma, tau),
        n0=int(n0),
        n=int(n),
        tau=float(tau),
        alpha=float(alpha),
        sigma=float(sigma),
        correction=correction,
    )


TAU_GRID: tuple[float, ...] = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)


def certify_counts_over_taus(
    selected: Array,
    counts: Array,
    n: int,
    *,
    sigma: float,
    taus: tuple[float, ...] = TAU_GRID,
    alpha: float = 0.001,
    correction: Correction = "holm",
    n0: int = 0,
    num_classes: int | None = None,
) -> list[Certificate]:
    """One certificate per tau from the same counts, at no extra sampling: tau sets the radius
    R = sigma * Phi^-1(tau), so certified Dice against R is one curve from one set of draws.

    Each tau is its own family of tests at level ``alpha``: each certificate holds with probability
    at least 1 - alpha. All of them hold at once with probability at least 1 - len(taus) * alpha
    (a union bound over the grid); reading off the best tau per pixel after looking at the counts
    is covered only by that bound, not by alpha. A tau at which n draws cannot certify any pixel
    gives an all-abstain certificate without the warning ``certify_counts`` would give.
    """
    for tau in taus:
        _validate_parameters(n, tau, alpha, sigma, correction)
    histogram = _checked_count_histogram(selected, counts, n, num_classes)  # once: it does not depend on tau
    return [_certificate(selected, counts, histogram, n, sigma=sigma, tau=tau, alpha=alpha, correction=correction,
                         n0=n0) for tau in taus]


def count_agreement(estimation: Array, selected: Array, tile: int = 32768) -> Array:
    """Per pixel, how many of the draws (n, *spatial) equal ``selected`` (*spatial): counts (*spatial) int64.

    On numpy it walks tiles of pixels through all n draws so that each tile stays in cache
    (the certificate is memory-bound: one read of the int64 samples).
    """
    if isinstance(estimation, torch.Tensor):
        counts = torch.zeros(tuple(selected.shape), dtype=torch.int64, device=estimation.device)
        for draws in estimation.split(8):
            counts += (draws == selected).sum(0)
        return counts
    draws = estimation.reshape(estimation.shape[0], -1)
    flat_selected = selected.reshape(-1)
    counts = np.zeros(flat_selected.shape, dtype=np.int32)
    equal = np.empty(min(tile, flat_selected.size), dtype=bool)
    for start in range(0, flat_selected.size, tile):
        stop = start + tile
        tile_selected, tile_counts = flat_selected[start:stop], counts[start:stop]
        tile_equal = equal[: tile_selected.size]
        for draw in draws[:, start:stop]:
            np.equal(draw, tile_selected, out=tile_equal)
            np.add(tile_counts, tile_equal, out=tile_counts, casting="unsafe")
    return counts.reshape(selected.shape).astype(np.int64)


def select_and_count(samples: Array, n0: int, num_classes: int | None = None) -> tuple[Array, Array]:
    """Selected class (mode of the first n0 draws; ties -> smallest id) and its count in the rest.

    samples: (n0 + n, *spatial) class ids in 0..num_classes - 1 (checked first; without num_classes,
    ids >= 0 and below MAX_INFERRED_CLASSES). Returns selected and counts, (*spatial) int64.
    """
    check_class_ids(samples, num_classes, "class ids in samples")
    selection = samples[:n0]
    classes = num_classes if num_classes is not None else int(selection.max()) + 1
    stack = torch.stack if isinstance(samples, torch.Tensor) else np.stack
    histogram = stack([(selection == c).sum(0) for c in range(max(classes, 1))])
    selected = histogram.argmax(0)
    return selected, count_agreement(samples[n0:], selected)


def certify(
    samples: Array,
    n0: int,
    *,
    sigma: float,
    tau: float = 0.75,
    alpha: float = 0.001,
    correction: Correction = "holm",
    num_classes: int | None = None,
) -> Certificate:
    """Certify every pixel from sampled class ids.

    samples: (n0 + n, H, W) (or (n0 + n, D, H, W) for a volume) integer class ids of the base segmenter
    on n0 + n independent noisy copies of one image; the first n0 select, the other n estimate. Ids must lie in
    0..num_classes - 1 when num_classes is given (checked before anything is counted).
    """
    if not isinstance(samples, (torch.Tensor, np.ndarray)):
        raise TypeError(f"samples must be a torch.Tensor or numpy.ndarray, got {type(samples).__name__}")
    if len(samples.shape) - 1 not in SPATIAL_DIMS:
        raise ValueError(f"samples must have shape (n0 + n, H, W) or (n0 + n, D, H, W), got {tuple(samples.shape)}")
    if not _is_integer_dtype(samples):
        raise TypeError(f"samples must hold integer class ids, got dtype {samples.dtype}")
    check_draws("n0 (the number of selection draws)", n0)
    n = int(samples.shape[0]) - int(n0)
    if n < 1:
        raise ValueError(
            f"samples has {samples.shape[0]} draws, so n = {n}; it must hold n0 = {n0} selection "
            "draws plus n >= 1 estimation draws"
        )
    _validate_parameters(n, tau, alpha, sigma, correction)
    selected, counts = select_and_count(samples, int(n0), num_classes)
    return certify_counts(
        selected, counts, n, sigma=sigma, tau=tau, alpha=alpha, correction=correction, n0=int(n0),
        num_classes=num_classes,
    )


def two_sided_pvalues(top: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Two-sided binomial test at 1/2 of a top count against the total of the top two counts.

    top, total: equal-shape integer arrays with top <= total. Equals
    ``scipy.stats.binomtest(top, total, 0.5).pvalue`` where top > total / 2, and 1 otherwise.
    """
    top, total = np.asarray(top, np.int64), np.asarray(total, np.int64)
    with np.errstate(invalid="ignore"):
        pvalues = binom.cdf(total - top, total, 0.5) + binom.sf(top - 1, total, 0.5)
    return np.where(2 * top > total, np.minimum(pvalues, 1.0), 1.0).astype(np.float64)


def _unique_with_inverse(codes: Array) -> tuple[np.ndarray, np.ndarray, Array]:
    """Distinct values (numpy), their counts (numpy) and each element's index into them (input family)."""
    if isinstance(codes, torch.Tensor):
        values, inverse, sizes = torch.unique(codes, return_inverse=True, return_counts=True)
        return values.cpu().numpy(), sizes.cpu().numpy(), inverse
    values, inverse, sizes = np.unique(codes, return_inverse=True, return_counts=True)
    return values, sizes, inverse


def predict_counts(
    top_class: Array,
    top_count: Array,
    runner_up_count: Array,
    n: int,
    *,
    alpha: float = 0.001,
    correction: Correction = "holm",
) -> Array:
    """Smoothed prediction without certificate (Cohen et al.'s PREDICT, per pixel, corrected).

    top_class, top_count, runner_up_count: (H, W) (or (D, H, W)) integers from n draws. A pixel keeps its top
    class when the two-sided binomial test of top_count against top_count + runner_up_count at
    1/2 is rejected by ``correction`` at level ``alpha`` over all pixels; otherwise ABSTAIN.
    Only the (top, runner-up) count pairs that occur get a p-value (at most H * W of them, not
    the (n + 1)^2 possible ones), so n = 100,000 costs no more memory than n = 100.
    Returns (H, W) int64 of the input's family.
    """
    check_alpha(alpha)
    check_draws("n", n)
    check_correction(correction)
    if int(top_count.min()) < 0 or int(runner_up_count.min()) < 0 or int((top_count + runner_up_count).max()) > n:
        raise ValueError(f"top and runner-up counts must be >= 0 with a sum of at most n = {n}")
    torch_input = isinstance(top_count, torch.Tensor)
    top = top_count.long() if torch_input else np.asarray(top_count, np.int64)
    total = top + (runner_up_count.long() if torch_input else np.asarray(runner_up_count, np.int64))
    codes, sizes, inverse = _unique_with_inverse((top * (n + 1) + total).reshape(-1))
    pair_pvalues = two_sided_pvalues(codes // (n + 1), codes % (n + 1))
    rejected = reject_groups(pair_pvalues, sizes, alpha, correction)
    if torch_input:
        keep = torch.as_tensor(rejected, device=top_count.device)[inverse].reshape(top_count.shape)
        return torch.where(keep, top_class.long(), torch.full_like(top_class, ABSTAIN, dtype=torch.int64))
    return np.where(rejected[inverse].reshape(top_count.shape), top_class, ABSTAIN).astype(np.int64)
