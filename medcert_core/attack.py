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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.certify import ABSTAIN
from medcert_core.smoothing import SmoothedSegmenter, denoise, draw_noise, image_seed, is_stochastic

# the counts of ``compare_certificates`` that say what changed (the others count pixels of x)
CHANGE_COUNTS = ("certified_flips", "certified_to_abstain", "noncertified_changed")

# independent random streams per image, see ``image_seed``
STREAM_CERTIFY, STREAM_ATTACK, STREAM_RECERTIFY, STREAM_RANDOM, STREAM_LOSS = 0, 1, 2, 3, 4


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


def smoothed_log_probabilities(
    segmenter: torch.nn.Module,
    denoiser: torch.nn.Module | None,
    x: torch.Tensor,
    sigma: float,
    draws: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """log of the soft smoothed classifier, log (1/m) sum_j softmax(f(D(x + delta_j))): (K, H, W).

    x: (C, H, W), may require grad. One generator call per draw (as in ``SmoothedSegmenter``); a
    stochastic denoiser gets one generator per draw, seeded from ``generator`` after that draw.
    """
    noise, generators = draw_noise(tuple(x.shape), draws, generator, x.device, is_stochastic(denoiser), x.dtype)
    batch = denoise(denoiser, x.unsqueeze(0) + sigma * noise, generators)
    log_probs = log_probabilities(segmenter(batch))  # (m, K, H, W)
    return torch.logsumexp(log_probs, dim=0) - np.log(draws)


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
        log_probs = smoothed_log_probabilities(smoothed.segmenter, smoothed.denoiser, x_adv, smoothed.sigma,
                                               pgd.draws, generator)
        return pixel_nll(log_probs, labels, mask)

    return pgd_l2(loss_fn, x, eps, pgd.steps, pgd.relative_step * eps, progress=progress, desc="PGD smoothed")


def base_prediction(segmenter: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class ids (H, W) of the plain segmenter on one image x (C, H, W)."""
    with torch.inference_mode():
        return log_probabilities(segmenter(x.unsqueeze(0)))[0].argmax(0)


def attack_base(
    segmenter: torch.nn.Module,
    x: torch.Tensor,
    eps: float,
    pgd: PGDConfig,
    *,
    progress: bool = False,
) -> PGDResult:
    """PGD on the undefended segmenter's own logits: push every pixel away from its clean prediction.

    x: (C, H, W) in [0, 1], on the segmenter's device.

    Pixels already flipped drop out of the loss (the model is deterministic), so the attack keeps
    working on the ones it has not flipped yet.
    """
    segmenter.eval()
    clean = base_prediction(segmenter, x)

    def loss_fn(x_adv: torch.Tensor) -> torch.Tensor:
        log_probs = log_probabilities(segmenter(x_adv.unsqueeze(0)))[0]
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
            log_probs = smoothed_log_probabilities(smoothed.segmenter, smoothed.denoiser, image.to(smoothed.device),
                                                   smoothed.sigma, draws, generator)
            losses.append(float(pixel_nll(log_probs, labels, mask)))
    return losses


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
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Certify x (C, H, W), attack it at eps_factor * R, re-certify with fresh noise; attack the base model.

    Streams (independent seeds per image, :func:`image_seed`): the certificate of x, the PGD noise,
    the re-certification, a random direction, the loss evaluation. Two controls share the
    re-certification's noise: x itself (``control_*``: the Monte Carlo churn of a fresh
    certificate; ``changed_vs_control``: pixels whose certificate changes because of the attack
    alone, ``changed_vs_control_certified`` those of them certified at x) and x plus a random
    direction of the same length (``random_*``).

    Returns (one tidy row of counts, losses and seconds; arrays for a figure: image, adversarial
    image, the certificates' labels, the base model's clean and attacked predictions).
    """
    device = smoothed.device
    generator = lambda stream: torch.Generator(device=device).manual_seed(image_seed(seed, index, stream))  # noqa: E731
    options = dict(tau=tau, alpha=alpha)
    x = x.to(device)
    start = time.perf_counter()
    before = smoothed.certify(x, n0, n, generator=generator(STREAM_CERTIFY), **options)
    eps = pgd.eps_factor * before.radius
    certified_at = time.perf_counter()
    smoothed_attack = attack_smoothed(smoothed, x, before.labels, eps, pgd, generator(STREAM_ATTACK), progress=progress)
    attacked_at = time.perf_counter()
    after = smoothed.certify(smoothed_attack.x_adv, n0, n, generator=generator(STREAM_RECERTIFY), **options)
    recertified_at = time.perf_counter()
    x_random = random_perturbation(x, eps, generator(STREAM_RANDOM))
    control = smoothed.certify(x, n0, n, generator=generator(STREAM_RECERTIFY), **options)
    random = smoothed.certify(x_random, n0, n, generator=generator(STREAM_RECERTIFY), **options)
    losses = smoothed_losses(smoothed, [x, smoothed_attack.x_adv, x_random],
                             torch.as_tensor(before.labels, device=device), pgd.loss_draws,
                             image_seed(seed, index, STREAM_LOSS))
    control_at = time.perf_counter()
    base_attack = attack_base(smoothed.segmenter, x, eps, pgd)
    base_clean = base_prediction(smoothed.segmenter, x).cpu()
    base_adv = base_prediction(smoothed.segmenter, base_attack.x_adv).cpu()
    base_random = base_prediction(smoothed.segmenter, x_random).cpu()
    base_at = time.perf_counter()

    labels = {name: cert.labels.cpu() for name, cert in
              {"before": before, "after": after, "control": control, "random": random}.items()}
    counts = compare_certificates(labels["before"], labels["after"])
    control_counts = compare_certificates(labels["before"], labels["control"])
    random_counts = compare_certificates(labels["before"], labels["random"])
    certified = labels["before"] != ABSTAIN
    base_flipped = base_adv != base_clean
    row = {
        "radius": before.radius,
        "eps": eps,
        "delta_norm": float((smoothed_attack.x_adv - x).norm()),
        **counts,
        **{f"{name}_{key}": value for name, other in (("control", control_counts), ("random", random_counts))
           for key, value in other.items() if key in CHANGE_COUNTS},
        "changed_vs_control": int((labels["after"] != labels["control"]).sum()),
        "changed_vs_control_certified": int(((labels["after"] != labels["control"]) & certified).sum()),
        "random_changed_vs_control": int((labels["random"] != labels["control"]).sum()),
        "loss_clean": losses[0],
        "loss_attacked": losses[1],
        "loss_random": losses[2],
        "base_delta_norm": float((base_attack.x_adv - x).norm()),
        "base_flips": int(base_flipped.sum()),
        "base_flips_on_certified": int((base_flipped & certified).sum()),
        "base_random_flips": int((base_random != base_clean).sum()),
        "seconds_certify": certified_at - start + recertified_at - attacked_at,
        "seconds_attack": attacked_at - certified_at,
        "seconds_controls": control_at - recertified_at,
        "seconds_base": base_at - control_at,
        "seconds": base_at - start,
    }
    maps = {
        "image": x.cpu().numpy(), "adversarial": smoothed_attack.x_adv.cpu().numpy(),
        "labels": labels["before"].numpy(), "attacked_labels": labels["after"].numpy(),
        "control_labels": labels["control"].numpy(), "base_clean": base_clean.numpy(),
        "base_attacked": base_adv.numpy(),
    }
    return row, maps
