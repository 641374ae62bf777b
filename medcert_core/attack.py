"""Attacking our own certificates: L2 PGD on the smoothed model and on the undefended base model.

A certificate of x says: with probability at least 1 - alpha over the certification's noise, every
certified pixel p keeps its class c(p) under any perturbation eps with ||eps||_2 < R. This module
tries to break that statement empirically.

The smoothed model is attacked as in SmoothAdv (Salman et al., NeurIPS 2019): the soft smoothed
classifier

    G(x')_p = (1 / m) sum_j softmax(f(D(x' + delta_j)))_p,      delta_j ~ N(0, sigma^2 I)

is estimated with m fresh draws at every PGD step, and the attack maximises the cross-entropy
-log G(x')_{p, c(p)} averaged over the certified pixels of x, stepping along the L2-normalised
gradient over the whole (C, H, W) tensor and projecting onto {x' : ||x' - x||_2 <= eps,
0 <= x' <= 1} (the exact Euclidean projection, :func:`project_l2_box`).

The attacked image is then certified with fresh noise. A certified pixel of x that is certified
with another class at x + eps is a *flip*; it needs one of the two certificates to be wrong (the
first says P[c] > 1/2 at x + eps, the second P[c'] > tau >= 1/2), so an image has a flip with
probability at most 2 alpha, whatever the attack. The undefended base model f (the method's own
segmenter on the clean image, no noise, no denoiser) is attacked with the same PGD at the same
eps on its own logits, to show the attack is strong enough to matter.

What a flip count can see is limited. For a pixel whose smoothed probability of its class c is p at
x, any eps lowers it at most to Phi(Phi^-1(p) - ||eps|| / sigma) (Phi^-1 of a Gaussian-smoothed
[0, 1]-valued function is 1/sigma-Lipschitz; Salman et al. 2019). A detected flip at ||eps|| = k R
needs the re-certification to find another class above tau, i.e. p_c(x + eps) < 1 - tau, so a
certified pixel with p < Phi((k - 1) Phi^-1(tau)) at x: at k = 1, p < 1/2. A bug that certifies
pixels with p a little below tau never produces one. The *sharp* attack (:func:`sharp_attack`)
measures instead how close PGD comes to that bound: it takes the certified pixels with the lowest
agreement counts, a group at a time, pushes each towards its runner-up class with the same L2 PGD
at the same eps, and estimates the group's mean probability of the certified classes with fresh
draws at x, at x + eps and at a random x + eps of the same length (common noise), with confidence
intervals, against the bound Phi(Phi^-1(p_before_lower) - ||eps|| / sigma).

Every network call runs as certification runs it: under ``smoothing.autocast(device, precision)``
of the smoother, its outputs checked (``check_segmenter_output``; ``denoise`` checks the denoiser).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import beta, norm, t as student_t
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.certify import ABSTAIN, Certificate, binomial_pvalue_table
from medcert_core.devices import autocast
from medcert_core.smoothing import (
    SmoothedSegmenter,
    check_segmenter_output,
    denoise,
    draw_noise,
    image_seed,
    is_stochastic,
)

# the counts of ``compare_certificates`` that say what changed (the others count pixels of x)
CHANGE_COUNTS = ("certified_flips", "certified_to_abstain", "noncertified_changed")

# independent random streams per image, see ``image_seed``
STREAM_CERTIFY, STREAM_ATTACK, STREAM_RECERTIFY, STREAM_RANDOM, STREAM_LOSS = 0, 1, 2, 3, 4
# the sharp attack's streams: the estimates' common noise, the runner-up's soft draws, the random
# direction, the PGD noise of each group (keyed by the group too)
STREAM_SHARP_ESTIMATE, STREAM_SHARP_SOFT, STREAM_SHARP_RANDOM, STREAM_SHARP_ATTACK = 5, 6, 7, 8


@dataclass(frozen=True)
class PGDConfig:
    """L2 PGD settings.

    steps: PGD iterations.
    draws: noise draws m per step for the smoothed model (the base model needs none).
    step_size: L2 length of each step, as a fraction of eps (the default 2.5 / steps lets the
        iterate cross the ball, Madry et al. 2018).
    eps_factor: the attack radius is eps_factor * R, just inside the certified radius R.
    loss_draws: common noise draws for the reported losses at x, the attacked and a random image.
    """

    steps: int = 15
    draws: int = 8
    step_size: float | None = None
    eps_factor: float = 0.999
    loss_draws: int = 16

    def __post_init__(self) -> None:
        if min(self.steps, self.draws, self.loss_draws) < 1:
            raise ValueError(f"steps, draws and loss_draws must be >= 1, got {self.steps}, {self.draws}, "
                             f"{self.loss_draws}")
        if not 0 < self.eps_factor:
            raise ValueError(f"eps_factor must be > 0, got {self.eps_factor}")

    @property
    def relative_step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 / self.steps


@dataclass(frozen=True)
class PGDResult:
    """x_adv: (C, H, W) attacked image; losses: (steps + 1,) loss at each iterate, the last one included."""

    x_adv: torch.Tensor
    losses: list[float]


def project_l2_box(x: torch.Tensor, y: torch.Tensor, eps: float, iterations: int = 60) -> torch.Tensor:
    """The exact Euclidean projection of y onto {z : ||z - x||_2 <= eps, 0 <= z <= 1}; x in [0, 1].

    x, y: tensors of the same shape (any). By the KKT conditions the projection is
    z(lam) = clamp(x + lam (y - x), 0, 1) for the largest lam in [0, 1] with ||z(lam) - x|| <= eps
    (the box is separable and the ball's multiplier shrinks y towards x); ||z(lam) - x|| grows
    with lam, so lam is found by bisection. The returned point is always feasible.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x64, direction = x.double(), (y - x).double()

    def norm_at(lam: float) -> float:
        return float(((x64 + lam * direction).clamp(0, 1) - x64).norm())

    if norm_at(1.0) <= eps:
        return (x64 + direction).clamp(0, 1).to(y.dtype)
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if norm_at(middle) <= eps else (low, middle)
    return (x64 + low * direction).clamp(0, 1).to(y.dtype)


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel log class probabilities (B, K, H, W) of logits (B, K, H, W); one binary logit -> K = 2."""
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits.log_softmax(1)


def pixel_nll(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the pixels in mask of -log_probs[labels]: log_probs (K, H, W), labels and mask (H, W)."""
    picked = log_probs.gather(0, labels.clamp(min=0).unsqueeze(0))[0]
    return -(picked[mask]).mean()


def network_logits(
    segmenter: torch.nn.Module,
    denoiser: torch.nn.Module | None,
    batch: torch.Tensor,
    *,
    num_classes: int | None = None,
    precision: str = "fp32",
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """fp32 logits (B, K, H, W) of f(D(batch)) for a (B, C, H, W) batch, as certification computes them.

    The networks run under ``smoothing.autocast(batch.device, precision)``; the segmenter's output is
    checked (``check_segmenter_output``: K = num_classes, the input's (H, W)), the denoiser's by
    ``denoise``. Differentiable.
    """
    with autocast(batch.device, precision):
        logits = segmenter(denoise(denoiser, batch, generators))
    check_segmenter_output(logits, tuple(batch.shape), num_classes)
    return logits.float()


def smoothed_log_probabilities(
    segmenter: torch.nn.Module,
    denoiser: torch.nn.Module | None,
    x: torch.Tensor,
    sigma: float,
    draws: int,
    generator: torch.Generator,
    *,
    num_classes: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """log of the soft smoothed classifier, log (1/m) sum_j softmax(f(D(x + delta_j))): (K, H, W).

    x: (C, H, W), may require grad. One generator call per draw (as in ``SmoothedSegmenter``); a
    stochastic denoiser gets one generator per draw, seeded from ``generator`` after that draw.
    The networks run as :func:`network_logits` runs them.
    """
    noise, generators = draw_noise(tuple(x.shape), draws, generator, x.device, is_stochastic(denoiser), x.dtype)
    logits = network_logits(segmenter, denoiser, x.unsqueeze(0) + sigma * noise, num_classes=num_classes,
                            precision=precision, generators=generators)
    log_probs = log_probabilities(logits)  # (m, K, H, W)
    return torch.logsumexp(log_probs, dim=0) - np.log(draws)


def smoother_log_probabilities(smoothed: SmoothedSegmenter, x: torch.Tensor, draws: int,
                               generator: torch.Generator) -> torch.Tensor:
    """:func:`smoothed_log_probabilities` of a smoother's f(D(.)), at its sigma, classes and precision."""
    return smoothed_log_probabilities(smoothed.segmenter, smoothed.denoiser, x, smoothed.sigma, draws, generator,
                                      num_classes=smoothed.num_classes, precision=smoothed.precision)


def pgd_l2(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    *,
    progress: bool = False,
    desc: str = "PGD",
) -> PGDResult:
    """Maximise loss_fn over the L2 ball of radius eps around x (C, H, W) intersected with [0, 1].

    Each step moves x_adv by step_size along grad / ||grad||_2 (the whole tensor), then projects
    (:func:`project_l2_box`). Starts at x; returns the last iterate and the loss of every iterate.
    """
    x = x.detach()
    x_adv = x.clone()
    losses = []
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            x_adv.requires_grad_(True)
            loss = loss_fn(x_adv)
            (gradient,) = torch.autograd.grad(loss, x_adv)
            losses.append(float(loss.detach()))
            norm = gradient.norm()
            x_adv = x_adv.detach()
            if norm > 0 and torch.isfinite(norm):
                x_adv = project_l2_box(x, x_adv + step_size * gradient / norm, eps)
        losses.append(float(loss_fn(x_adv).detach()))
    return PGDResult(x_adv.detach(), losses)


def attack_smoothed(
    smoothed: SmoothedSegmenter,
    x: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    pgd: PGDConfig,
    generator: torch.Generator,
    *,
    progress: bool = False,
) -> PGDResult:
    """SmoothAdv PGD on f(D(.)) pushing the certified pixels of x away from their certified class.

    x: (C, H, W) in [0, 1]; labels: (H, W) certified class or ABSTAIN (all-abstain: x unchanged).
    Fresh noise at every step from ``generator``; the last loss is estimated with fresh noise too.
    """
    smoothed.eval_modules()
    x = x.to(smoothed.device)
    labels = torch.as_tensor(labels, device=smoothed.device)
    mask = labels != ABSTAIN
    if not bool(mask.any()) or eps <= 0:
        return PGDResult(x.clone(), [])

    def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
        return pixel_nll(smoother_log_probabilities(smoothed, x_adv, pgd.draws, generator), labels, mask)

    return pgd_l2(loss_fn, x, eps, pgd.steps, pgd.relative_step * eps, progress=progress, desc="PGD smoothed")


def base_prediction(segmenter: torch.nn.Module, x: torch.Tensor, *, num_classes: int | None = None,
                    precision: str = "fp32") -> torch.Tensor:
    """Class ids (H, W) of the plain segmenter on one image x (C, H, W), run as :func:`network_logits`."""
    with torch.inference_mode():
        logits = network_logits(segmenter, None, x.unsqueeze(0), num_classes=num_classes, precision=precision)
        return log_probabilities(logits)[0].argmax(0)


def attack_base(
    segmenter: torch.nn.Module,
    x: torch.Tensor,
    eps: float,
    pgd: PGDConfig,
    *,
    num_classes: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> PGDResult:
    """PGD on the undefended segmenter's own logits: push every pixel away from its clean prediction.

    x: (C, H, W) in [0, 1], on the segmenter's device; the segmenter runs as :func:`network_logits`.

    Pixels already flipped drop out of the loss (the model is deterministic), so the attack keeps
    working on the ones it has not flipped yet.
    """
    segmenter.eval()
    clean = base_prediction(segmenter, x, num_classes=num_classes, precision=precision)

    def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
        logits = network_logits(segmenter, None, x_adv.unsqueeze(0), num_classes=num_classes, precision=precision)
        log_probs = log_probabilities(logits)[0]
        mask = log_probs.argmax(0) == clean
        if not bool(mask.any()):
            mask = torch.ones_like(mask)
        return pixel_nll(log_probs, clean, mask)

    return pgd_l2(loss_fn, x, eps, pgd.steps, pgd.relative_step * eps, progress=progress, desc="PGD base")


def compare_certificates(before: torch.Tensor, after: torch.Tensor) -> dict[str, int]:
    """Counts comparing two certificates' labels (H, W) (class or ABSTAIN) of x and x + eps.

    certified: pixels certified at x (the attacked pixels); certified_flips: of those, certified
    with another class at x + eps (a broken certificate); certified_to_abstain: of those, abstaining
    at x + eps (allowed: the certificate promises P[c] > 1/2 there, not > tau); noncertified: pixels
    abstaining at x; noncertified_changed: of those, certified with some class at x + eps.
    """
    before, after = torch.as_tensor(before).cpu(), torch.as_tensor(after).cpu()
    certified = before != ABSTAIN
    return {
        "pixels": int(before.numel()),
        "certified": int(certified.sum()),
        "certified_flips": int((certified & (after != ABSTAIN) & (after != before)).sum()),
        "certified_to_abstain": int((certified & (after == ABSTAIN)).sum()),
        "noncertified": int((~certified).sum()),
        "noncertified_changed": int((~certified & (after != before)).sum()),
    }


def random_perturbation(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """x (C, H, W) plus a uniformly random direction of L2 length eps, projected onto [0, 1]."""
    direction = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return project_l2_box(x, x + eps * direction / direction.norm(), eps)


def smoothed_losses(
    smoothed: SmoothedSegmenter,
    images: Sequence[torch.Tensor],
    labels: torch.Tensor,
    draws: int,
    seed: int,
) -> list[float]:
    """The attack's loss at each image (C, H, W), with the same ``draws`` noise draws for all of them.

    Common noise makes the differences between the images precise (the noise is not re-drawn).
    """
    mask = labels != ABSTAIN
    if not bool(mask.any()):
        return [float("nan")] * len(images)
    losses = []
    with torch.inference_mode():
        for image in images:
            generator = torch.Generator(device=smoothed.device).manual_seed(seed)
            log_probs = smoother_log_probabilities(smoothed, image.to(smoothed.device), draws, generator)
            losses.append(float(pixel_nll(log_probs, labels, mask)))
    return losses


@dataclass(frozen=True)
class ImageAttack:
    """What :func:`attack_image` measured on one image: row (counts, losses, seconds), groups (one row per
    group of the sharp attack), maps (arrays for a figure)."""

    row: dict[str, Any]
    groups: list[dict[str, Any]]
    maps: dict[str, np.ndarray]


@dataclass(frozen=True)
class SharpConfig:
    """The sharp attack: L2 PGD on the lowest-margin certified pixels, one group at a time.

    group_sizes: one group per entry, in order, each the next lowest-margin certified pixels (a group
        of one pixel gets the whole L2 budget; pixels of a larger group share it).
    steps, draws, step_size: each group's PGD, as in :class:`PGDConfig` (its eps is the image's).
    estimate_draws: fresh draws for every estimate of a group's probability (at x, x + eps and a
        random x + eps, common noise); confidence: two-sided level of the estimates' intervals.
    """

    group_sizes: tuple[int, ...] = (1, 1, 16)
    steps: int = 20
    draws: int = 8
    step_size: float | None = None
    estimate_draws: int = 300
    confidence: float = 0.99

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_sizes", tuple(int(size) for size in self.group_sizes))
        if not self.group_sizes or min(self.group_sizes) < 1:
            raise ValueError(f"group_sizes must be a non-empty sequence of sizes >= 1, got {self.group_sizes}")
        if min(self.steps, self.draws) < 1 or self.estimate_draws < 2:
            raise ValueError(f"steps and draws must be >= 1 and estimate_draws >= 2, got {self.steps}, "
                             f"{self.draws}, {self.estimate_draws}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    @property
    def relative_step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 / self.steps


@dataclass(frozen=True)
class Estimate:
    """A mean of i.i.d. per-draw values in [0, 1] with its two-sided confidence interval."""

    mean: float
    lower: float
    upper: float
    draws: int


def estimate_mean(values: np.ndarray, confidence: float) -> Estimate:
    """Mean of i.i.d. per-draw values (m,) in [0, 1] and its two-sided interval at ``confidence``.

    Values all 0 or 1 (a one-pixel group), or all equal: Clopper-Pearson's interval of a proportion
    mean * m of m (exact for 0/1 values, and at least as wide as any [0, 1] variable needs when there
    is no spread to estimate). Otherwise the Student-t interval, clipped to [0, 1].
    """
    values = np.asarray(values, dtype=np.float64)
    draws, mean = len(values), float(values.mean())
    level = (1 - confidence) / 2
    spread = float(values.std(ddof=1)) if draws > 1 else 0.0
    if spread > 0 and not np.isin(values, (0.0, 1.0)).all():
        half = float(student_t.ppf(1 - level, draws - 1)) * spread / np.sqrt(draws)
        return Estimate(mean, float(max(0.0, mean - half)), float(min(1.0, mean + half)), draws)
    successes = mean * draws
    lower = float(beta.ppf(level, successes, draws - successes + 1)) if successes > 0 else 0.0
    upper = float(beta.ppf(1 - level, successes + 1, draws - successes)) if successes < draws else 1.0
    return Estimate(mean, lower, upper, draws)


def lipschitz_bound(p: float, eps: float, sigma: float) -> float:
    """Phi(Phi^-1(p) - eps / sigma): the least a Gaussian-smoothed probability p at x can be at x + eps.

    Phi^-1 of a [0, 1]-valued function smoothed with N(0, sigma^2 I) is 1/sigma-Lipschitz (Salman et al.
    2019, Lemma 2; Cohen et al. 2019), whatever the base model. p = 1 gives 1 (nothing can move it).
    """
    if p >= 1:
        return 1.0
    return float(norm.cdf(norm.ppf(min(max(p, 0.0), 1.0)) - eps / sigma))


def drop_fraction(before: float, after: float, bound: float) -> float:
    """(before - after) / (before - bound): the share of the drop the bound allows that an attack achieved."""
    allowed = before - bound
    return float((before - after) / allowed) if allowed > 0 else float("nan")


def lowest_margin_groups(labels: torch.Tensor, pvalues: torch.Tensor | np.ndarray,
                         sizes: Sequence[int]) -> list[torch.Tensor]:
    """Flat pixel indices of consecutive groups of certified pixels, lowest margin first, one per size
    in ``sizes``, as long as enough certified pixels are left for a full group.

    labels (H, W): certified class or ABSTAIN; pvalues (H, W): the certificate's raw p-values, which
    grow as the agreement count falls, so the largest p-values are the lowest counts; ties keep
    raster order.
    """
    flat_labels = torch.as_tensor(labels).cpu().reshape(-1)
    flat_pvalues = np.asarray(torch.as_tensor(pvalues).cpu(), dtype=np.float64).reshape(-1)
    certified = np.flatnonzero(flat_labels.numpy() != ABSTAIN)
    order = certified[np.argsort(-flat_pvalues[certified], kind="stable")]
    groups, start = [], 0
    for size in sizes:
        if start + size > len(order):
            break
        groups.append(torch.as_tensor(order[start:start + size]))
        start += size
    return groups


def runner_up_classes(histogram: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Per pixel (H, W), the class other than labels that came out most often in histogram (K, H, W);
    ties, and pixels where no other class came out, go to the larger soft probability soft (K, H, W)."""
    score = histogram.double() + 0.5 * soft.double().clamp(0, 1)  # counts differ by >= 1, soft by <= 0.5
    score.scatter_(0, labels.clamp(min=0).unsqueeze(0), float("-inf"))
    return score.argmax(0)


def sample_classes(smoothed: SmoothedSegmenter, x: torch.Tensor, draws: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Class ids (draws, H, W) of f(D(x + delta_j)) for fresh draws: the smoother's own sampling (batches,
    precision, output checks)."""
    smoothed.eval_modules()
    return torch.cat([classes for _, classes in smoothed.draw_batches(x.to(smoothed.device), draws, generator)])


def class_histogram(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-pixel class counts (K, H, W) int64 of class ids (m, H, W)."""
    flat = classes.reshape(classes.shape[0], -1)
    histogram = torch.zeros((num_classes, flat.shape[1]), dtype=torch.int64, device=classes.device)
    histogram.scatter_add_(0, flat, torch.ones_like(flat))
    return histogram.reshape(num_classes, *classes.shape[1:])


def group_agreement(classes: torch.Tensor, pixels: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Per draw (m,), the fraction of a group's pixels (flat indices) whose class in classes (m, H, W) is
    their target class (the certified one): i.i.d. draws of a [0, 1]-valued function of the noise."""
    picked = classes.reshape(classes.shape[0], -1)[:, pixels.to(classes.device)]
    return (picked == targets.to(classes.device)).double().mean(1).cpu().numpy()


def attack_group(
    smoothed: SmoothedSegmenter,
    x: torch.Tensor,
    pixels: torch.Tensor,
    certified: torch.Tensor,
    targets: torch.Tensor,
    eps: float,
    config: SharpConfig,
    generator: torch.Generator,
) -> PGDResult:
    """L2 PGD at eps pushing one group of pixels (flat indices) from their certified to their target class.

    Maximises the group's mean log-odds log G_target - log G_certified of the soft smoothed
    classifier, fresh draws at every step (as :func:`attack_smoothed`).
    """
    pixels, certified, targets = (t.to(smoothed.device) for t in (pixels, certified, targets))

    def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
        log_probs = smoother_log_probabilities(smoothed, x_adv, config.draws, generator).flatten(1)
        return (log_probs[targets, pixels] - log_probs[certified, pixels]).mean()

    smoothed.eval_modules()
    return pgd_l2(loss_fn, x.to(smoothed.device), eps, config.steps, config.relative_step * eps, desc="PGD group")


def group_row(before: Estimate, after: Estimate, random: Estimate, eps: float, sigma: float,
              tau: float) -> dict[str, Any]:
    """The measurements of one attacked group: the estimates, the bound, the achieved share of the drop."""
    bound, bound_point = lipschitz_bound(before.lower, eps, sigma), lipschitz_bound(before.mean, eps, sigma)
    return {
        "p_before": before.mean, "p_before_lower": before.lower, "p_before_upper": before.upper,
        "p_after": after.mean, "p_after_lower": after.lower, "p_after_upper": after.upper,
        "p_random": random.mean, "p_random_lower": random.lower, "p_random_upper": random.upper,
        "bound": bound, "bound_point": bound_point,
        "drop_fraction": drop_fraction(before.mean, after.mean, bound_point),
        "random_drop_fraction": drop_fraction(before.mean, random.mean, bound_point),
        "below_bound": bool(after.upper < bound),  # the smoothed model moved faster than sigma allows: a bug
        "below_half": bool(after.upper < 0.5),  # the smoothed class changed inside R: a certificate was wrong
        "before_below_tau": bool(before.upper < tau),  # a certified group below tau: a certificate was wrong
    }


def sharp_attack(
    smoothed: SmoothedSegmenter,
    x: torch.Tensor,
    certificate: Certificate,
    eps: float,
    config: SharpConfig,
    *,
    seed: int,
    index: int,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Attack the lowest-margin certified pixels of x (C, H, W), a group at a time, at L2 radius eps.

    Per group: the mean probability of the certified classes from ``estimate_draws`` fresh draws at
    x (p_before), at the group's PGD image (p_after) and at x plus a random direction of length eps
    (p_random), all on the same noise (stream STREAM_SHARP_ESTIMATE), with ``confidence`` intervals;
    the bound Phi(Phi^-1(p_before_lower) - eps / sigma) and the share of the allowed drop achieved.
    Targets: each pixel's runner-up class at x (:func:`runner_up_classes`).

    Returns (one row per group; arrays for a figure: the attacked pixels of all groups, the first group's image).
    """
    device = smoothed.device
    generator = lambda *keys: stream_generator(device, seed, index, *keys)  # noqa: E731
    x = x.to(device)
    labels = torch.as_tensor(certificate.labels, device=device)
    groups = lowest_margin_groups(labels, certificate.pvalues, config.group_sizes)
    if not groups or eps <= 0:
        return [], {}
    draws = config.estimate_draws
    classes_at_x = sample_classes(smoothed, x, draws, generator(STREAM_SHARP_ESTIMATE))
    histogram = class_histogram(classes_at_x, smoothed.num_classes)
    with torch.inference_mode():
        soft = smoother_log_probabilities(smoothed, x, config.draws, generator(STREAM_SHARP_SOFT)).exp()
    targets = runner_up_classes(histogram, labels, soft).reshape(-1)
    x_random = random_perturbation(x, eps, generator(STREAM_SHARP_RANDOM))
    classes_random = sample_classes(smoothed, x_random, draws, generator(STREAM_SHARP_ESTIMATE))
    flat_labels = labels.reshape(-1)
    rows, maps = [], {}
    for number, pixels in enumerate(groups):
        start = time.perf_counter()
        certified = flat_labels[pixels.to(device)]
        result = attack_group(smoothed, x, pixels, certified, targets[pixels.to(device)], eps, config,
                              generator(STREAM_SHARP_ATTACK, number))
        classes_after = sample_classes(smoothed, result.x_adv, draws, generator(STREAM_SHARP_ESTIMATE))
        before, after, random = (estimate_mean(group_agreement(classes, pixels, certified), config.confidence)
                                 for classes in (classes_at_x, classes_after, classes_random))
        counts = certificate_counts(certificate, pixels)
        rows.append({
            "group": number, "group_pixels": len(pixels), "eps": eps, "sigma": smoothed.sigma,
            "delta_norm": float((result.x_adv - x).norm()), "count_min": int(counts.min()),
            "count_max": int(counts.max()), "n": certificate.n,
            **group_row(before, after, random, eps, smoothed.sigma, certificate.tau),
            "loss_first": result.losses[0], "loss_last": result.losses[-1],
            "seconds": time.perf_counter() - start,
        })
        if number == 0:
            maps["group_adversarial"] = result.x_adv.cpu().numpy()
    attacked = np.zeros(flat_labels.numel(), dtype=bool)
    attacked[torch.cat(groups).numpy()] = True
    return rows, {**maps, "group_pixels": attacked.reshape(labels.shape)}


def certificate_counts(certificate: Certificate, pixels: torch.Tensor) -> np.ndarray:
    """The agreement counts k of some pixels (flat indices), recovered from their p-values
    P[Binom(n, tau) >= k] (strictly decreasing in k)."""
    table = np.log(binomial_pvalue_table(certificate.n, certificate.tau))
    pvalues = np.asarray(torch.as_tensor(certificate.pvalues).cpu(), dtype=np.float64).reshape(-1)[pixels.numpy()]
    return np.abs(table[None, :] - np.log(pvalues)[:, None]).argmin(1)


@dataclass(frozen=True)
class _SmoothedAttack:
    """The smoothed half of :func:`attack_image`. certificates: "before" (x, its own noise), then on the
    re-certification's noise "after" (the PGD image), "control" (x) and "random" (x_random); eps: the
    attack radius; losses: at x, the PGD image and x_random (common noise); seconds: "certify",
    "attack", "controls"."""

    certificates: dict[str, Certificate]
    eps: float
    attack: PGDResult
    x_random: torch.Tensor
    losses: list[float]
    seconds: dict[str, float]


@dataclass(frozen=True)
class _BaseAttack:
    """The undefended segmenter under its own PGD: the attack and the class ids (H, W) it predicts at x, at
    the attacked image and at x_random (on the CPU)."""

    attack: PGDResult
    clean: torch.Tensor
    attacked: torch.Tensor
    random: torch.Tensor


def stream_generator(device: torch.device, seed: int, index: int, *keys: object) -> torch.Generator:
    """A generator on ``device`` seeded for one random stream of one image (:func:`image_seed`)."""
    return torch.Generator(device=device).manual_seed(image_seed(seed, index, *keys))


def _attack_smoothed_model(smoothed: SmoothedSegmenter, x: torch.Tensor, *, n0: int, n: int, tau: float,
                           alpha: float, pgd: PGDConfig, seed: int, index: int, progress: bool) -> _SmoothedAttack:
    """Certify x (C, H, W), attack it at eps_factor * R, re-certify the attacked image, certify the two
    controls (x, and x plus a random direction of length eps) on the re-certification's noise, and
    measure the attack's loss at the three images."""
    generator = lambda stream: stream_generator(smoothed.device, seed, index, stream)  # noqa: E731
    options = dict(tau=tau, alpha=alpha)
    start = time.perf_counter()
    before = smoothed.certify(x, n0, n, generator=generator(STREAM_CERTIFY), **options)
    eps = pgd.eps_factor * before.radius
    certified_at = time.perf_counter()
    attack = attack_smoothed(smoothed, x, before.labels, eps, pgd, generator(STREAM_ATTACK), progress=progress)
    attacked_at = time.perf_counter()
    after = smoothed.certify(attack.x_adv, n0, n, generator=generator(STREAM_RECERTIFY), **options)
    recertified_at = time.perf_counter()
    x_random = random_perturbation(x, eps, generator(STREAM_RANDOM))
    control = smoothed.certify(x, n0, n, generator=generator(STREAM_RECERTIFY), **options)
    random = smoothed.certify(x_random, n0, n, generator=generator(STREAM_RECERTIFY), **options)
    losses = smoothed_losses(smoothed, [x, attack.x_adv, x_random], torch.as_tensor(before.labels, device=x.device),
                             pgd.loss_draws, image_seed(seed, index, STREAM_LOSS))
    control_at = time.perf_counter()
    seconds = {"certify": certified_at - start + recertified_at - attacked_at, "attack": attacked_at - certified_at,
               "controls": control_at - recertified_at}
    certificates = {"before": before, "after": after, "control": control, "random": random}
    return _SmoothedAttack(certificates, eps, attack, x_random, losses, seconds)


def _attack_base_model(smoothed: SmoothedSegmenter, x: torch.Tensor, x_random: torch.Tensor, eps: float,
                       pgd: PGDConfig) -> _BaseAttack:
    """PGD at eps on the smoother's own segmenter (no noise, no denoiser), run at its precision."""
    network = dict(num_classes=smoothed.num_classes, precision=smoothed.precision)
    attack = attack_base(smoothed.segmenter, x, eps, pgd, **network)
    predict = lambda image: base_prediction(smoothed.segmenter, image, **network).cpu()  # noqa: E731
    return _BaseAttack(attack, predict(x), predict(attack.x_adv), predict(x_random))


def _image_row(x: torch.Tensor, smoothed: _SmoothedAttack, labels: dict[str, torch.Tensor],
               base: _BaseAttack) -> dict[str, Any]:
    """The tidy row of :func:`attack_image` (counts and losses; seconds are added by the caller) from the
    certificates' labels (H, W) by name."""
    counts = compare_certificates(labels["before"], labels["after"])
    controls = {name: compare_certificates(labels["before"], labels[name]) for name in ("control", "random")}
    certified = labels["before"] != ABSTAIN
    base_flipped = base.attacked != base.clean
    changed = labels["after"] != labels["control"]
    return {
        "radius": smoothed.certificates["before"].radius,
        "eps": smoothed.eps,
        "delta_norm": float((smoothed.attack.x_adv - x).norm()),
        **counts,
        **{f"{name}_{key}": value for name, other in controls.items() for key, value in other.items()
           if key in CHANGE_COUNTS},
        "changed_vs_control": int(changed.sum()),
        "changed_vs_control_certified": int((changed & certified).sum()),
        "random_changed_vs_control": int((labels["random"] != labels["control"]).sum()),
        "loss_clean": smoothed.losses[0],
        "loss_attacked": smoothed.losses[1],
        "loss_random": smoothed.losses[2],
        "base_delta_norm": float((base.attack.x_adv - x).norm()),
        "base_flips": int(base_flipped.sum()),
        "base_flips_on_certified": int((base_flipped & certified).sum()),
        "base_random_flips": int((base.random != base.clean).sum()),
    }


def attack_image(
    smoothed: SmoothedSegmenter,
    x: torch.Tensor,
    *,
    n0: int,
    n: int,
    tau: float,
    alpha: float,
    pgd: PGDConfig,
    seed: int,
    index: int,
    sharp: SharpConfig | None = None,
    progress: bool = False,
) -> ImageAttack:
    """Certify x (C, H, W), attack it at eps_factor * R, re-certify with fresh noise; attack the base model;
    with ``sharp``, also attack its lowest-margin certified pixels group by group (:func:`sharp_attack`).

    Streams (independent seeds per image, :func:`image_seed`): the certificate of x, the PGD noise,
    the re-certification, a random direction, the loss evaluation. Two controls share the
    re-certification's noise: x itself (``control_*``: the Monte Carlo churn of a fresh
    certificate; ``changed_vs_control``: pixels whose certificate changes because of the attack
    alone, ``changed_vs_control_certified`` those of them certified at x) and x plus a random
    direction of the same length (``random_*``).

    Returns an :class:`ImageAttack`: one tidy row of counts, losses and seconds; the sharp attack's
    group rows; arrays for a figure (image, adversarial image, the certificates' labels, the base
    model's clean and attacked predictions, the first group's pixels and image).
    """
    x = x.to(smoothed.device)
    start = time.perf_counter()
    attacked = _attack_smoothed_model(smoothed, x, n0=n0, n=n, tau=tau, alpha=alpha, pgd=pgd, seed=seed, index=index,
                                      progress=progress)
    control_at = time.perf_counter()
    base = _attack_base_model(smoothed, x, attacked.x_random, attacked.eps, pgd)
    base_at = time.perf_counter()
    before = attacked.certificates["before"]
    groups, group_maps = ([], {}) if sharp is None else sharp_attack(smoothed, x, before, attacked.eps, sharp,
                                                                   seed=seed, index=index)
    sharp_at = time.perf_counter()
    labels = {name: certificate.labels.cpu() for name, certificate in attacked.certificates.items()}
    row = {
        **_image_row(x, attacked, labels, base),
        **{f"seconds_{name}": seconds for name, seconds in attacked.seconds.items()},
        "seconds_base": base_at - control_at,
        "seconds_sharp": sharp_at - base_at,
        "seconds": sharp_at - start,
    }
    maps = {
        "image": x.cpu().numpy(), "adversarial": attacked.attack.x_adv.cpu().numpy(),
        "labels": labels["before"].numpy(), "attacked_labels": labels["after"].numpy(),
        "control_labels": labels["control"].numpy(), "base_clean": base.clean.numpy(),
        "base_attacked": base.attacked.numpy(), **group_maps,
    }
    return ImageAttack(row, groups, maps)
