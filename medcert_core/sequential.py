"""Sequential certification: stop drawing once every pixel is decided, with anytime-valid p-values.

Per pixel, after its class c is selected from n0 independent draws, the null is H0: p_c <= tau, where
p_c is the probability that f(D(x + delta)) gives c. The k estimation draws that give c among t are
tested by the mixture likelihood ratio (Robbins 1970; Ville 1939; Howard et al. 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences")

    E_t = sum_j w_j (q_j / tau)^k ((1 - q_j) / (1 - tau))^(t - k),   q_j in (tau, 1), sum_j w_j = 1.

For every q > tau the factor of one draw has mean p q / tau + (1 - p)(1 - q) / (1 - tau) <= 1 when
p <= tau, so E_t is a nonnegative supermartingale with E_0 = 1 under every null, and Ville's inequality
gives P(sup_t E_t >= 1 / a) <= a. The anytime-valid p-value ``1 / max_{s <= t} E_s`` is therefore a
valid p-value at any stopping time, whatever decides the stop (all other pixels included), and Holm's
procedure over the pixels at the stopping time keeps the family-wise error at most alpha (Holm needs
only valid marginal p-values). Holm is monotone and the p-values only fall, so a pixel once certified
stays certified.

Looks: E is evaluated at a schedule of draw counts (:func:`default_looks`, geometric); sampling stops
at the first look where every pixel is certified or provably cannot be by ``n_max`` (even if every
remaining draw gave its class, its E would stay below 1 / alpha, the largest Holm threshold's inverse),
or, if asked, where at most a fraction ``stop_undecided`` of the pixels is neither (they abstain; this
only stops sampling early, so the guarantee is unchanged).

Where fixed n is the better choice: the mixture pays for not knowing n in advance. At a fixed n the
exact binomial test certifies with fewer draws a pixel whose draws all agree (58 against 62 at
tau = 0.75, 324 against 348 at tau = 0.95, on a 128 x 128 image at alpha = 0.001), so when nearly every
image has some pixels that stay undecided until n_max, sequential sampling uses as many draws and
certifies a little less.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from medcert_core.certify import (
    ABSTAIN,
    Certificate,
    certified_radius,
    check_alpha,
    check_tau,
    reject_groups,
)

# the alternatives q_j = 1 - (1 - tau) s_j, equal weights: from just above tau to nearly 1 (most pixels)
ALTERNATIVE_SHARES = (0.8, 0.6, 0.4, 0.2, 0.08, 0.04, 0.02, 0.01)


def alternatives(tau: float, shares: Iterable[float] = ALTERNATIVE_SHARES) -> np.ndarray:
    """The alternatives q_j = 1 - (1 - tau) s_j of the mixture, each in (tau, 1)."""
    return 1 - (1 - tau) * np.asarray(tuple(shares), dtype=np.float64)


def log_e_values(successes: np.ndarray, draws: int | np.ndarray, tau: float,
                 shares: Iterable[float] = ALTERNATIVE_SHARES) -> np.ndarray:
    """log E_t of the mixture likelihood ratio (module doc) for k = ``successes`` of t = ``draws`` (any shape)."""
    q = alternatives(tau, shares)
    k = np.asarray(successes, dtype=np.float64)[..., None]
    failures = np.asarray(draws, dtype=np.float64)[..., None] - k
    terms = k * np.log(q / tau) + failures * np.log((1 - q) / (1 - tau))
    return logsumexp(terms, axis=-1) - np.log(len(q))


def default_looks(n_max: int, first: int = 25, growth: float = 1.5) -> tuple[int, ...]:
    """Draw counts at which E is evaluated: first, first * growth, ... (rounded up), and n_max."""
    looks, look = [], float(first)
    while look < n_max:
        looks.append(int(np.ceil(look)))
        look *= growth
    return tuple(sorted(set(looks) | {n_max}))


def check_looks(looks: Iterable[int], n_max: int) -> tuple[int, ...]:
    """Strictly increasing positive draw counts ending at n_max; ValueError naming the rule."""
    looks = tuple(int(look) for look in looks)
    if not looks or looks[0] < 1 or any(b <= a for a, b in zip(looks, looks[1:])) or looks[-1] != n_max:
        raise ValueError(f"looks must be strictly increasing positive draw counts ending at n_max = {n_max}, "
                         f"got {looks}")
    return looks


@dataclass(frozen=True)
class Look:
    """The state at one look: draws so far, and the fractions of pixels certified and undecided."""

    draws: int
    certified: float
    undecided: float


@dataclass(frozen=True, eq=False)
class SequentialCertificate:
    """A sequential certificate: ``certificate`` (its ``n`` = the estimation draws used, its ``pvalues`` the
    anytime-valid ones at the stop), the draws used, n_max, why sampling stopped and every look."""

    certificate: Certificate
    draws: int
    n_max: int
    stopped: str  # "all decided", "undecided fraction <= ...", "n_max"
    looks: tuple[Look, ...]


def smallest_certifiable_n_max(num_pixels: int, tau: float, alpha: float,
                               shares: Iterable[float] = ALTERNATIVE_SHARES) -> int:
    """The smallest n_max for which a pixel whose draws all agree can be certified sequentially: its E at
    n_max (the largest it reaches) must reach num_pixels / alpha, Holm's smallest threshold's inverse.
    Larger than the fixed-n minimum (the mixture pays for not knowing n)."""
    threshold, n = np.log(num_pixels / alpha), 1
    while log_e_values(n, n, tau, shares) < threshold:
        n *= 2
    low, high = n // 2, n  # E(n, n) grows with n: bisect between the last miss and the first hit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if log_e_values(middle, middle, tau, shares) >= threshold else (middle, high)
    return high


def holm_certified(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Holm over all pixels (any shape): which are rejected (certified)."""
    flat = pvalues.reshape(-1)
    return reject_groups(flat, np.ones(flat.size, dtype=np.int64), alpha, "holm").reshape(pvalues.shape)


def certify_sequentially(selected: np.ndarray, batches: Iterator[np.ndarray], looks: Iterable[int], *, n_max: int,
                         sigma: float, tau: float = 0.75, alpha: float = 0.001, n0: int = 0,
                         stop_undecided: float = 0.0) -> SequentialCertificate:
    """The sequential certificate from a stream of agreement counts.

    selected: (H, W), or (D, H, W) for a volume, the class selected from the n0 selection draws (independent
        of the stream).
    batches: yields, per look, the selected shape's number of new estimation draws that gave ``selected``
        since the previous look (``looks[i] - looks[i - 1]`` draws); it is not advanced past the stop.
    """
    check_tau(tau)
    check_alpha(alpha)
    if not 0.0 <= stop_undecided < 1.0:
        raise ValueError(f"stop_undecided must be a fraction in [0, 1), got {stop_undecided}")
    looks = check_looks(looks, n_max)
    successes = np.zeros(np.shape(selected), dtype=np.int64)
    best_log_e = np.zeros(np.shape(selected), dtype=np.float64)  # log max_{s <= t} E_s; E_0 = 1
    threshold = np.log(1 / alpha)
    history, stopped, certified = [], "n_max", np.zeros(np.shape(selected), dtype=bool)
    for look in looks:
        successes += np.asarray(next(batches), dtype=np.int64)
        best_log_e = np.maximum(best_log_e, log_e_values(successes, look, tau))
        certified = holm_certified(np.exp(-best_log_e).clip(max=1.0), alpha)
        reachable = np.maximum(best_log_e, log_e_values(successes + (n_max - look), n_max, tau)) >= threshold
        undecided = ~certified & reachable
        history.append(Look(look, float(certified.mean()), float(undecided.mean())))
        if not undecided.any():
            stopped = "all decided"
            break
        if stop_undecided > 0 and undecided.mean() <= stop_undecided:
            stopped = f"undecided fraction <= {stop_undecided:g}"
            break
    pvalues = np.exp(-best_log_e).clip(max=1.0)
    labels = np.where(certified, np.asarray(selected, dtype=np.int64), ABSTAIN)
    draws = history[-1].draws
    certificate = Certificate(labels, pvalues, certified_radius(sigma, tau), n0, draws, tau, alpha, sigma, "holm")
    return SequentialCertificate(certificate, draws, n_max, stopped, tuple(history))


def replay_sequential(selected: np.ndarray, checkpoints: Iterable[int], cumulative: np.ndarray, *, n_max: int,
                      looks: Iterable[int] | None = None, **options) -> SequentialCertificate:
    """The sequential certificate of recorded draws (``SmoothedSegmenter.agreement_path``): stopping as
    :func:`certify_sequentially` does at ``looks`` (default ``default_looks(n_max)``), each of which must be
    a checkpoint; ``cumulative`` (len(checkpoints), H, W) counts the first t estimation draws that gave
    ``selected``. ``options``: sigma, tau, alpha, n0, stop_undecided."""
    checkpoints = tuple(int(t) for t in checkpoints)
    looks = check_looks(default_looks(n_max) if looks is None else looks, n_max)
    missing = sorted(set(looks) - set(checkpoints))
    if missing:
        raise ValueError(f"looks {missing} are not among the recorded checkpoints {checkpoints}")
    if np.shape(cumulative)[0] != len(checkpoints):
        raise ValueError(f"cumulative has {np.shape(cumulative)[0]} rows for {len(checkpoints)} checkpoints")
    at = {t: np.asarray(cumulative[i], dtype=np.int64) for i, t in enumerate(checkpoints)}
    increments = (at[look] - (at[before] if before else 0) for before, look in zip((0, *looks), looks))
    return certify_sequentially(selected, increments, looks, n_max=n_max, **options)


def counts_at(checkpoints: Iterable[int], cumulative: np.ndarray, n: int) -> np.ndarray:
    """The (H, W) agreement counts of the first ``n`` estimation draws, from recorded draws: the counts a
    fixed-n certificate (``certify_counts``) uses; ``n`` must be a checkpoint."""
    checkpoints = tuple(int(t) for t in checkpoints)
    if n not in checkpoints:
        raise ValueError(f"n = {n} is not among the recorded checkpoints {checkpoints}")
    return np.asarray(cumulative[checkpoints.index(n)], dtype=np.int64)
