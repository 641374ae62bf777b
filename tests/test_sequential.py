"""Sequential certification: the mixture e-process against a direct implementation, its supermartingale
property by exact binomial sums, the family-wise error at every stopping rule (Monte-Carlo, alpha = 0.1),
a planted optional-stopping bug that the same test catches, and the analytic oracle end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from medcert_core import ABSTAIN
from medcert_core.sequential import (
    ALTERNATIVE_SHARES,
    certify_sequentially,
    counts_at,
    default_looks,
    holm_certified,
    log_e_values,
    replay_sequential,
)

TAU, ALPHA = 0.75, 0.1


def direct_e_value(sequence: list[int], tau: float) -> float:
    """The mixture likelihood ratio of a 0/1 sequence, draw by draw, in plain Python."""
    total = 0.0
    for share in ALTERNATIVE_SHARES:
        q, ratio = 1 - (1 - tau) * share, 1.0
        for outcome in sequence:
            ratio *= q / tau if outcome else (1 - q) / (1 - tau)
        total += ratio / len(ALTERNATIVE_SHARES)
    return total


def test_the_e_value_is_the_mixture_likelihood_ratio_draw_by_draw():
    rng = np.random.default_rng(0)
    for tau in (0.6, 0.75, 0.95):
        for _ in range(20):
            sequence = (rng.random(int(rng.integers(1, 60))) < rng.uniform(0.5, 1)).astype(int).tolist()
            expected = direct_e_value(sequence, tau)
            assert math.exp(float(log_e_values(sum(sequence), len(sequence), tau))) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("tau", [0.6, 0.75, 0.95])
def test_the_e_value_has_mean_at_most_one_under_every_null(tau):
    """E_p[E_t] = sum_k binom(k; t, p) E(k, t): 1 at p = tau, below it for p < tau, above for p > tau."""
    for draws in (1, 10, 100):
        k = np.arange(draws + 1)
        e = np.exp(log_e_values(k, draws, tau))
        for p in (tau - 0.3, tau - 0.05, tau):
            assert float((binom.pmf(k, draws, p) * e).sum()) <= 1 + 1e-9
        assert float((binom.pmf(k, draws, tau) * e).sum()) == pytest.approx(1.0, rel=1e-9)
        assert float((binom.pmf(k, draws, min(0.999, tau + 0.1)) * e).sum()) > 1


def simulate(rng, p, looks, *, stop_undecided=0.0, pvalue_rule=None):
    """One image of pixels with agreement probabilities ``p`` (selected class fixed), through
    certify_sequentially; ``pvalue_rule`` plants a bug (see the planted test)."""
    def batches():
        previous = 0
        for look in looks:
            yield rng.binomial(look - previous, p)
            previous = look

    if pvalue_rule is None:
        return certify_sequentially(np.ones(p.shape, dtype=np.int64), batches(), looks, n_max=looks[-1], sigma=0.25,
                                    tau=TAU, alpha=ALPHA, stop_undecided=stop_undecided)
    successes = np.zeros(p.shape, dtype=np.int64)  # the planted procedure: a fixed-n p-value at every look
    for look, new in zip(looks, batches()):
        successes += new
        certified = holm_certified(pvalue_rule(successes, look), ALPHA)
        if certified.any():
            return certified
    return certified


def upper_bound(trials: int) -> float:
    return ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / trials)


@pytest.mark.parametrize("stop_undecided", [0.0, 0.3, 0.9])
def test_the_family_wise_error_stays_below_alpha_at_every_stopping_rule(stop_undecided):
    """Pixels at p = tau exactly (the null at its edge, where errors are likeliest) mixed with clearly
    certifiable ones; any certified null pixel is an error. Stopping early only stops sampling."""
    rng = np.random.default_rng(1)
    trials, errors, draws = 1500, 0, []
    looks = default_looks(400, first=10)
    for _ in range(trials):
        p = np.where(rng.random(40) < 0.5, TAU, 0.995)
        result = simulate(rng, p, looks, stop_undecided=stop_undecided)
        errors += bool(((result.certificate.labels != ABSTAIN) & (p <= TAU)).any())
        draws.append(result.draws)
    assert errors / trials <= upper_bound(trials), f"family-wise error {errors / trials:.4f}"
    if stop_undecided >= 0.3:
        assert np.mean(draws) < 400, "the stopping rule stops before n_max"


def test_a_planted_optional_stopping_bug_is_caught():
    """Fixed-n binomial p-values looked at after every batch, stopping at the first certified pixel:
    the same test measures a family-wise error far above alpha."""
    rng = np.random.default_rng(2)
    trials, errors = 1000, 0
    looks = tuple(range(10, 401, 10))
    for _ in range(trials):
        p = np.full(40, TAU)
        certified = simulate(rng, p, looks, pvalue_rule=lambda k, t: binom.sf(k - 1, t, TAU))
        errors += bool(certified.any())
    assert errors / trials > upper_bound(trials), f"the planted bug went unseen ({errors / trials:.4f})"


def test_it_stops_when_all_pixels_are_decided_and_certifies_the_clear_ones():
    rng = np.random.default_rng(3)
    p = np.array([1.0] * 30 + [0.3] * 10)  # 30 always agree; 10 never can be certified
    result = simulate(rng, p, default_looks(2000))
    assert result.stopped == "all decided" and result.draws < 2000
    labels = result.certificate.labels
    assert (labels[:30] == 1).all() and (labels[30:] == ABSTAIN).all()
    assert result.certificate.n == result.draws and result.looks[-1].undecided == 0.0


def test_bad_looks_and_fractions_are_refused():
    with pytest.raises(ValueError, match="strictly increasing positive draw counts ending at n_max = 100"):
        certify_sequentially(np.ones(4), iter([]), (50, 40, 100), n_max=100, sigma=0.25)
    with pytest.raises(ValueError, match="stop_undecided must be a fraction in"):
        certify_sequentially(np.ones(4), iter([]), (100,), n_max=100, sigma=0.25, stop_undecided=1.0)


def test_recorded_draws_replay_to_the_direct_sequential_and_fixed_n_certificates():
    """agreement_path + replay_sequential / counts_at (how stopping rules are studied offline) give what
    certify_sequential at two n_max and certify at a fixed n give with the same seed."""
    from test_oracle import make_oracle, mixed_targets

    from medcert_core.certify import certify_counts
    from medcert_core.smoothing import SmoothedSegmenter

    rng = np.random.default_rng(5)
    oracle = make_oracle(rng, 1, 6, 6, mixed_targets(rng, 6, 6))
    smoothed = SmoothedSegmenter(oracle.module(), 2, oracle.sigma, device="cpu", batch_size=16)
    checkpoints = tuple(sorted(set(default_looks(60)) | set(default_looks(200))))
    selected, cumulative = smoothed.agreement_path(oracle.tensor(), 10, checkpoints,
                                                   generator=torch.Generator().manual_seed(7))
    assert cumulative.shape == (len(checkpoints), 6, 6) and (np.diff(cumulative, axis=0) >= 0).all()
    for n_max in (60, 200):
        direct = smoothed.certify_sequential(oracle.tensor(), 10, n_max, tau=TAU, alpha=ALPHA,
                                             generator=torch.Generator().manual_seed(7))
        replayed = replay_sequential(selected, checkpoints, cumulative, n_max=n_max, sigma=oracle.sigma, tau=TAU,
                                     alpha=ALPHA, n0=10)
        assert replayed.draws == direct.draws and replayed.stopped == direct.stopped
        np.testing.assert_array_equal(replayed.certificate.labels, direct.certificate.labels.numpy())
        np.testing.assert_array_equal(replayed.certificate.pvalues, direct.certificate.pvalues.numpy())
    fixed = smoothed.certify(oracle.tensor(), 10, 60, tau=TAU, alpha=ALPHA, generator=torch.Generator().manual_seed(7))
    from_path = certify_counts(selected, counts_at(checkpoints, cumulative, 60), 60, sigma=oracle.sigma, tau=TAU,
                               alpha=ALPHA, n0=10)
    np.testing.assert_array_equal(from_path.labels, fixed.labels.numpy())
    with pytest.raises(ValueError, match="not among the recorded checkpoints"):
        replay_sequential(selected, checkpoints[:-1], cumulative[:-1], n_max=150, sigma=oracle.sigma)
    with pytest.raises(ValueError, match="n = 61 is not among"):
        counts_at(checkpoints, cumulative, 61)


@pytest.mark.slow
def test_the_analytic_oracle_end_to_end_with_real_noise():
    """The per-pixel linear base models of test_oracle.py through SmoothedSegmenter.certify_sequential:
    no certified pixel whose exact smoothed probability is at most tau, over many images, within alpha."""
    from test_oracle import make_oracle, mixed_targets  # the oracle's own construction

    from medcert_core.smoothing import SmoothedSegmenter

    rng = np.random.default_rng(4)
    trials, errors, draws = 150, 0, []
    for trial in range(trials):
        q = mixed_targets(rng, 4, 4)
        oracle = make_oracle(rng, 1, 4, 4, q)
        smoothed = SmoothedSegmenter(oracle.module(), 2, oracle.sigma, device="cpu", batch_size=64)
        result = smoothed.certify_sequential(oracle.tensor(), 10, 400, tau=TAU, alpha=ALPHA,
                                             generator=torch.Generator().manual_seed(trial))
        labels = result.certificate.labels.numpy()
        probability_of_label = np.where(labels == 1, oracle.p1, 1 - oracle.p1)
        errors += bool(((labels != ABSTAIN) & (probability_of_label <= TAU)).any())
        draws.append(result.draws)
    assert errors / trials <= upper_bound(trials), f"family-wise error {errors / trials:.4f}"
    assert set(draws) == {400}, "edge nulls stay undecided: the rule samples to n_max"


def test_certify_sequential_from_the_command_line(tmp_path, capsys):
    import json

    from PIL import Image

    from medcert_core.__main__ import main
    from test_own_model import grey_image, medcert_checkpoint

    checkpoint, _ = medcert_checkpoint(tmp_path / "model.pt")
    image = grey_image(tmp_path / "x.png")
    main(["certify", str(image), "--checkpoint", str(checkpoint), "--sigma", "0.25", "--n", "400", "--sequential",
          "--stop-undecided", "0.5", "--seed", "1", "--output-dir", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    sequential = summary["sequential"]
    assert sequential["n_max"] == 400 and 0 < sequential["draws"] < 400 and summary["n"] == sequential["draws"]
    labels = np.array(Image.open(tmp_path / "out" / "x_labels.png"))
    assert summary["abstain_fraction"] == pytest.approx((labels == 255).mean())

    from medcert_core.single_image import legend_lines

    text = [line for _, line in legend_lines(summary, ("background", "lung"))]
    assert f"n = {sequential['draws']} of n_max 400 (sequential), tau = 0.75, alpha = 0.001" in text

    # an n_max the fixed-n test could use but the anytime-valid one cannot: refused before any draw
    from medcert_core.certify import smallest_certifiable_n
    from medcert_core.sequential import smallest_certifiable_n_max

    fixed, anytime = smallest_certifiable_n(16 * 16, 0.75, 0.001, "holm"), smallest_certifiable_n_max(16 * 16, 0.75, 0.001)
    assert fixed < anytime
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", str(image), "--checkpoint", str(checkpoint), "--sigma", "0.25", "--n", str(anytime - 1),
              "--sequential", "--output-dir", str(tmp_path / "too_few")])
    assert exit_info.value.code == 2
    assert (f"sequential certification with n_max = {anytime - 1} cannot certify any pixel of a 16 x 16 image at "
            f"tau = 0.75, alpha = 0.001 (Holm over 256 pixels); use n >= {anytime}") in capsys.readouterr().err
    assert not (tmp_path / "too_few").exists()


@pytest.mark.parametrize("pixels, tau", [(1, 0.75), (256, 0.75), (128 * 128, 0.75), (128 * 128, 0.95), (10**6, 0.9)])
def test_the_sequential_minimum_is_the_first_n_max_whose_unanimous_e_value_reaches_holms_threshold(pixels, tau):
    from medcert_core.sequential import smallest_certifiable_n_max

    n = smallest_certifiable_n_max(pixels, tau, 0.001)
    reaches = [log_e_values(t, t, tau) >= np.log(pixels / 0.001) for t in range(1, n + 1)]
    assert reaches[-1] and not any(reaches[:-1]), "a direct scan agrees"
