"""L2 PGD on the smoothed model and on the base model, and the certificate-attack experiment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import beta, norm

from medcert_core import ABSTAIN, attack, smoothing
from medcert_core.attack import (
    PGDConfig,
    SharpConfig,
    attack_base,
    attack_group,
    attack_smoothed,
    base_prediction,
    certificate_counts,
    class_histogram,
    compare_certificates,
    drop_fraction,
    estimate_mean,
    group_agreement,
    lipschitz_bound,
    lowest_margin_groups,
    pgd_l2,
    project_l2_box,
    random_perturbation,
    runner_up_classes,
    sharp_attack,
    smoothed_log_probabilities,
)
from medcert_core.smoothing import SmoothedSegmenter, image_seed
from medcert_core.study.soundness import attack_certificates, attack_payload, summarize_attack, summarize_groups


def tiny_segmenter(in_channels: int = 1, num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """Two 3x3 convolutions with random weights, scaled up to confident logits (B, num_classes, H, W)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, num_classes, 3, padding=1),
    ).eval()
    with torch.no_grad():
        model[2].weight.mul_(20)
    return model


class BlurDenoiser(torch.nn.Module):
    """A fixed 3x3 box blur, clamped to [0, 1]: differentiable, like the diffusion denoiser."""

    sigma = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.full((x.shape[1], 1, 3, 3), 1 / 9, dtype=x.dtype, device=x.device)
        return torch.nn.functional.conv2d(x, weight, padding=1, groups=x.shape[1]).clamp(0, 1)


def dykstra_projection(x: torch.Tensor, y: torch.Tensor, eps: float, iterations: int = 2000) -> torch.Tensor:
    """Dykstra's alternating projections onto ball(x, eps) and [0, 1]: converges to the exact projection."""
    z, p, q = y.double().clone(), torch.zeros_like(y, dtype=torch.float64), torch.zeros_like(y, dtype=torch.float64)
    x = x.double()
    for _ in range(iterations):
        w = z + p
        offset = w - x
        ball = x + offset * min(1.0, eps / float(offset.norm()))
        p = w - ball
        w = ball + q
        z = w.clamp(0, 1)
        q = w - z
    return z


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_projection_is_exact_and_feasible(scale):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 4, 4, generator=generator, dtype=torch.float64)
    y = x + scale * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    eps = 0.5
    z = project_l2_box(x, y, eps)
    assert float((z - x).norm()) <= eps * (1 + 1e-9)
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    torch.testing.assert_close(z, dykstra_projection(x, y, eps), atol=1e-6, rtol=0)
    # no feasible point is nearer to y
    for _ in range(50):
        w = project_l2_box(x, x + torch.randn(x.shape, generator=generator, dtype=torch.float64), eps)
        assert float((y - z).norm()) <= float((y - w).norm()) + 1e-9


def test_projection_keeps_feasible_points_and_clamps_inside_the_ball():
    x = torch.full((1, 3, 3), 0.5)
    inside = x + 0.01
    assert torch.equal(project_l2_box(x, inside, 1.0), inside)
    y = x.clone()
    y[0, 0, 0] = 1.2  # 0.7 away: in the ball of radius 1, out of the box
    expected = x.clone()
    expected[0, 0, 0] = 1.0
    torch.testing.assert_close(project_l2_box(x, y, 1.0), expected)
    with pytest.raises(ValueError, match="eps"):
        project_l2_box(x, y, -1.0)


def test_pgd_stays_in_the_ball_and_the_box():
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.ones_like(x)
    result = pgd_l2(lambda z: -((z - target) ** 2).sum(), x, eps=0.4, steps=20, step_size=0.1)
    assert float((result.x_adv - x).norm()) <= 0.4 * (1 + 1e-6)
    assert 0 <= float(result.x_adv.min()) and float(result.x_adv.max()) <= 1
    assert len(result.losses) == 21 and result.losses[-1] > result.losses[0]


def test_image_seeds_are_distinct_streams():
    seeds = {image_seed(0, index, stream) for index in range(5) for stream in range(3)}
    assert len(seeds) == 15
    assert image_seed(0, 1, 2) == image_seed(0, 1, 2) != image_seed(1, 1, 2)


def test_smoothed_log_probabilities_are_a_distribution():
    segmenter = tiny_segmenter()
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    log_probs = smoothed_log_probabilities(segmenter, BlurDenoiser(), x, 0.25, 4, torch.Generator().manual_seed(0))
    assert log_probs.shape == (3, 8, 8)
    torch.testing.assert_close(log_probs.exp().sum(0), torch.ones(8, 8))


def smoothed_tiny(sigma: float = 0.25) -> SmoothedSegmenter:
    return SmoothedSegmenter(tiny_segmenter(), 3, sigma, denoiser=BlurDenoiser(), batch_size=32, device="cpu")


def test_smoothed_attack_increases_the_loss_and_is_reproducible():
    smoothed = smoothed_tiny()
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = smoothed.certify(x, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(0)).labels
    assert (labels != ABSTAIN).any(), "the test needs some certified pixels"
    pgd = PGDConfig(steps=10, draws=16)
    first = attack_smoothed(smoothed, x, labels, 2.0, pgd, torch.Generator().manual_seed(7))
    again = attack_smoothed(smoothed, x, labels, 2.0, pgd, torch.Generator().manual_seed(7))
    assert torch.equal(first.x_adv, again.x_adv) and first.losses == again.losses
    assert first.losses[-1] > first.losses[0] + 0.1
    assert float((first.x_adv - x).norm()) <= 2.0 * (1 + 1e-6)
    other = attack_smoothed(smoothed, x, labels, 2.0, pgd, torch.Generator().manual_seed(8))
    assert not torch.equal(first.x_adv, other.x_adv)
    # nothing certified: nothing to attack
    untouched = attack_smoothed(smoothed, x, torch.full_like(labels, ABSTAIN), 2.0, pgd, torch.Generator())
    assert torch.equal(untouched.x_adv, x) and untouched.losses == []


def test_undefended_base_model_is_flipped_at_a_large_radius():
    segmenter = tiny_segmenter()
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    result = attack_base(segmenter, x, 4.0, PGDConfig(steps=20))
    clean, attacked = segmenter(x[None]).argmax(1), segmenter(result.x_adv[None]).argmax(1)
    assert result.losses[-1] > result.losses[0]
    assert float((attacked != clean).float().mean()) > 0.5
    assert float((result.x_adv - x).norm()) <= 4.0 * (1 + 1e-6)


def test_compare_certificates_counts():
    A = ABSTAIN
    before = torch.tensor([[0, 1, A], [2, A, 1]])
    after = torch.tensor([[0, 2, 1], [A, A, 1]])
    assert compare_certificates(before, after) == {
        "pixels": 6, "certified": 4, "certified_flips": 1, "certified_to_abstain": 1,
        "noncertified": 2, "noncertified_changed": 1,
    }


def test_summary_totals_and_worst_image():
    rows = pd.DataFrame({
        "method_label": ["a", "a", "b"], "sigma": [0.25, 0.25, 0.25], "image_id": ["0", "1", "0"],
        "radius": [0.17] * 3, "eps": [0.169] * 3, "pixels": [10] * 3, "certified": [6, 4, 5],
        "certified_flips": [0, 2, 0], "certified_to_abstain": [1, 0, 0], "noncertified": [4, 6, 5],
        "noncertified_changed": [1, 2, 3], "changed_vs_control": [1, 1, 1], "changed_vs_control_certified": [0] * 3,
        "control_noncertified_changed": [0, 1, 0], "control_certified_flips": [0] * 3,
        "control_certified_to_abstain": [0] * 3, "base_flips": [3, 0, 1], "base_flips_on_certified": [1, 0, 0],
        "random_certified_flips": [0] * 3, "random_certified_to_abstain": [0] * 3,
        "random_noncertified_changed": [1] * 3, "random_changed_vs_control": [1] * 3,
        "base_random_flips": [0] * 3, "loss_clean": [0.1] * 3, "loss_attacked": [0.2] * 3, "loss_random": [0.1] * 3,
        "seconds": [1.0, 2.0, 3.0],
    })
    summary = summarize_attack(rows).set_index("method_label")
    assert summary.loc["a", "pixels_attacked"] == 10 and summary.loc["a", "certified_flips"] == 2
    assert summary.loc["a", "worst_image_flips"] == 2 and summary.loc["a", "images_with_flip"] == 1
    assert summary.loc["a", "base_flips"] == 3 and summary.loc["a", "base_images_flipped"] == 1
    assert summary.loc["a", "seconds"] == 3.0 and summary.loc["b", "images"] == 1
    payload = attack_payload(rows, {"x": 1})
    assert payload["parameters"] == {"x": 1} and len(payload["images"]) == 3 and len(payload["summary"]) == 2
    assert payload["groups"] == [] and payload["group_summary"] == []


@pytest.fixture
def one_thread():
    """One intra-op thread: at 32 px it is as fast, and it does not collapse when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_certified_pixels_survive_pgd_at_the_certified_radius(tmp_path, one_thread):
    """End to end on 1-epoch smoke models at 32 px: no certified pixel flips; the base model does."""
    from medcert_core.study.settings import DataSpec
    from medcert_core.study.settings import training_spec
    from medcert_core.study.runs.run import CertificationRun, ours, segcertify

    data = DataSpec("phantom", None, 32, 0)
    runs = [CertificationRun(data=data, training=training_spec("smoke"), arch="unet", method=method, sigma=0.5,
                             n0=10, n=60, alpha=0.001) for method in (segcertify(), ours("ddpm:auto"))]
    sharp = SharpConfig(group_sizes=(1, 16), steps=6, draws=4, estimate_draws=40)
    frame, groups = attack_certificates(runs, tmp_path / "cache", images=2, pgd=PGDConfig(steps=8, draws=4),
                                        sharp=sharp, sharp_images=1, device="cpu", progress=False)
    assert len(frame) == 4 and set(frame["method"]) == {"segcertify", "ours"}
    assert frame["radius"].iloc[0] == pytest.approx(0.5 * norm.ppf(0.75))
    assert (frame["eps"] < frame["radius"]).all() and (frame["delta_norm"] <= frame["eps"] * (1 + 1e-6)).all()
    assert frame["certified"].sum() > 0, "nothing certified: nothing was attacked"
    assert frame["certified_flips"].sum() == 0
    assert frame["base_flips"].sum() > 0
    assert (frame["changed_vs_control"] >= 0).all() and (frame["loss_attacked"] > 0).all()
    summary = summarize_attack(frame)
    assert len(summary) == 2 and (summary["images"] == 2).all() and (summary["worst_image_flips"] == 0).all()
    assert np.isfinite(frame["seconds"]).all()
    # the sharp attack: a pixel and a group of 16 on the first image of each run, never below the Lipschitz bound
    assert len(groups) == 4 and sorted(groups["group_pixels"]) == [1, 1, 16, 16]
    assert (groups["p_after_upper"] >= groups["bound"]).all() and not groups["below_half"].any()
    assert (groups["p_before_lower"] <= groups["p_before"]).all()
    assert (groups["p_before"] <= groups["p_before_upper"]).all()
    assert (groups["delta_norm"] <= groups["eps"] * (1 + 1e-6)).all()
    assert len(summarize_groups(groups)) == 4 and (summarize_groups(groups)["groups_below_bound"] == 0).all()


# --- the sharp attack: lowest-margin groups against the Lipschitz bound --------------------------------------


class LinearSegmenter(torch.nn.Module):
    """Two classes: class 1 at pixel p where <w, x> + bias[p] > 0, one unit direction w for all pixels.

    Its smoothed probability of class 1 is analytic, Phi((<w, x> + bias[p]) / sigma), and moving x by eps
    along -w lowers it exactly to the bound Phi(Phi^-1(p) - eps / sigma): the attack's best case.
    """

    def __init__(self, w: torch.Tensor, bias: torch.Tensor, scale: float = 10.0) -> None:
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.register_buffer("bias", bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.w).flatten(1).sum(1)
        logit = self.scale * (z[:, None, None] + self.bias)
        return torch.stack([torch.zeros_like(logit), logit], 1)

    def smoothed(self, x: torch.Tensor, sigma: float) -> np.ndarray:
        """The exact smoothed probability of class 1, (H, W)."""
        return norm.cdf((float((x * self.w).sum()) + self.bias.double().numpy()) / sigma)


def linear_setup(sigma: float = 0.25, size: int = 16) -> tuple[LinearSegmenter, torch.Tensor]:
    """A linear segmenter and an image x (1, size, size) in [0.35, 0.65]: the upper half is class 1 with
    margins 1.5 to 4 sigma, the lower half class 0 with larger ones, so the lowest margins are class 1."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(1, size, size, generator=generator)
    x = (0.5 + 0.05 * torch.randn(1, size, size, generator=generator)).clamp(0.35, 0.65)
    segmenter = LinearSegmenter(w, torch.zeros(size, size))
    margins = torch.linspace(1.5, 4.0, size * size).reshape(size, size)
    margins[size // 2:] = -(margins[size // 2:] + 1)
    segmenter.bias.copy_(sigma * margins - float((x * segmenter.w).sum()))
    return segmenter, x


def test_lipschitz_bound_is_exact_for_a_linear_model_and_monotone():
    sigma, eps = 0.25, 0.1
    segmenter, x = linear_setup(sigma)
    moved = x - eps * segmenter.w  # the worst direction; stays in [0, 1]
    assert 0 <= float(moved.min()) and float(moved.max()) <= 1
    before, after = segmenter.smoothed(x, sigma), segmenter.smoothed(moved, sigma)
    expected = np.array([lipschitz_bound(float(p), eps, sigma) for p in before.reshape(-1)]).reshape(before.shape)
    np.testing.assert_allclose(after, expected, atol=1e-9)
    assert lipschitz_bound(0.9, 0.0, 1.0) == pytest.approx(0.9)
    assert lipschitz_bound(0.9, 0.2, 0.5) < lipschitz_bound(0.9, 0.1, 0.5) < 0.9 < lipschitz_bound(0.95, 0.1, 0.5)
    assert lipschitz_bound(1.0, 0.3, 0.25) == 1.0
    # at eps = R a pixel at tau can fall to 1/2, and one at 1/2 to 1 - tau
    tau = 0.75
    radius = sigma * norm.ppf(tau)
    assert lipschitz_bound(tau, radius, sigma) == pytest.approx(0.5)
    assert lipschitz_bound(0.5, radius, sigma) == pytest.approx(1 - tau)


def test_drop_fraction():
    assert drop_fraction(0.9, 0.8, 0.7) == pytest.approx(0.5)
    assert drop_fraction(0.9, 0.95, 0.7) == pytest.approx(-0.25)
    assert np.isnan(drop_fraction(1.0, 1.0, 1.0))


def test_estimate_mean_intervals():
    generator = np.random.default_rng(0)
    values = generator.uniform(0.8, 1.0, size=200)
    estimate = estimate_mean(values, 0.99)
    assert estimate.lower < estimate.mean < estimate.upper and estimate.mean == pytest.approx(values.mean())
    assert estimate.upper - estimate.lower == pytest.approx(2 * 2.6 * values.std(ddof=1) / np.sqrt(200), rel=0.02)
    assert estimate_mean(values, 0.5).upper - estimate_mean(values, 0.5).lower < estimate.upper - estimate.lower
    # coverage of the true mean 0.9 over repeated samples of 100 draws
    covered = [estimate_mean(generator.uniform(0.8, 1.0, size=100), 0.9) for _ in range(400)]
    coverage = np.mean([e.lower <= 0.9 <= e.upper for e in covered])
    assert 0.85 <= coverage <= 0.95
    # 0/1 values (a one-pixel group): the exact Clopper-Pearson interval
    binary = (generator.uniform(size=300) < 0.9).astype(float)
    exact = estimate_mean(binary, 0.99)
    successes = binary.sum()
    assert exact.lower == pytest.approx(beta.ppf(0.005, successes, 300 - successes + 1))
    assert exact.upper == pytest.approx(beta.ppf(0.995, successes + 1, 300 - successes))
    # no spread: Clopper-Pearson, never a zero-width interval
    ones = estimate_mean(np.ones(100), 0.99)
    assert ones.mean == 1.0 == ones.upper and ones.lower == pytest.approx(0.005 ** (1 / 100))
    zeros = estimate_mean(np.zeros(100), 0.99)
    assert zeros.lower == 0.0 and zeros.upper == pytest.approx(1 - 0.005 ** (1 / 100))


def test_lowest_margin_groups_take_the_largest_pvalues_of_certified_pixels():
    A = ABSTAIN
    labels = torch.tensor([[0, 1, A], [1, 0, 1]])
    pvalues = torch.tensor([[1e-9, 1e-5, 0.5], [1e-5, 1e-7, 1e-12]], dtype=torch.float64)
    groups = lowest_margin_groups(labels, pvalues, [2, 2, 2])
    assert [g.tolist() for g in groups] == [[1, 3], [4, 0]]  # ties keep raster order; the abstain is skipped
    assert [g.tolist() for g in lowest_margin_groups(labels, pvalues, [1, 1, 3])] == [[1], [3], [4, 0, 5]]
    assert lowest_margin_groups(labels, pvalues, [6]) == []
    assert lowest_margin_groups(torch.full((2, 2), A), torch.ones(2, 2), [1]) == []


def test_certificate_counts_are_recovered_from_the_pvalues():
    segmenter, x = linear_setup()
    smoothed = SmoothedSegmenter(segmenter, 2, 0.25, batch_size=64, device="cpu")
    selected, counts = smoothed.counts(x, 10, 100, generator=torch.Generator().manual_seed(1))
    certificate = smoothed.certify(x, 10, 100, generator=torch.Generator().manual_seed(1))
    pixels = torch.arange(x[0].numel())
    np.testing.assert_array_equal(certificate_counts(certificate, pixels), counts.reshape(-1).numpy())


def test_runner_up_is_the_most_frequent_other_class_ties_by_soft_probability():
    histogram = torch.tensor([[[8, 0, 5]], [[1, 9, 0]], [[1, 1, 5]]])  # (K=3, H=1, W=3)
    labels = torch.tensor([[0, 1, 0]])
    soft = torch.tensor([[[0.8, 0.05, 0.5]], [[0.15, 0.9, 0.2]], [[0.05, 0.05, 0.3]]])
    # pixel 0: classes 1 and 2 tie at 1 -> soft 0.15 > 0.05 -> 1; pixel 1: 2 (count 1 > 0);
    # pixel 2: the certified class 0 is excluded -> 2 (count 5 > 0)
    assert runner_up_classes(histogram, labels, soft).tolist() == [[1, 2, 2]]
    no_other = torch.tensor([[[10]], [[0]], [[0]]])
    assert runner_up_classes(no_other, torch.tensor([[0]]), torch.tensor([[[0.9]], [[0.02]], [[0.08]]])).item() == 2


def test_class_histogram_and_group_agreement():
    classes = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [1, 2]], [[2, 1], [1, 1]]])  # (m=3, 2, 2)
    assert class_histogram(classes, 3)[:, 0, 0].tolist() == [2, 0, 1]
    assert class_histogram(classes, 3).sum(0).eq(3).all()
    agreement = group_agreement(classes, torch.tensor([0, 3]), torch.tensor([0, 1]))
    np.testing.assert_allclose(agreement, [1.0, 0.5, 0.5])


def linear_smoothed(sigma: float = 0.25) -> tuple[SmoothedSegmenter, LinearSegmenter, torch.Tensor]:
    segmenter, x = linear_setup(sigma)
    return SmoothedSegmenter(segmenter, 2, sigma, batch_size=64, device="cpu"), segmenter, x


@pytest.mark.parametrize("eps_factor", [0.5, 0.999, 2.0])
def test_group_attack_reaches_but_never_passes_the_bound_on_an_analytic_model(eps_factor):
    """Exact probabilities: the sharp attack comes near the bound, never below it; a random direction barely moves."""
    sigma = 0.25
    smoothed, segmenter, x = linear_smoothed(sigma)
    eps = eps_factor * sigma * norm.ppf(0.75)
    certificate = smoothed.certify(x, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(1))
    (pixels,) = lowest_margin_groups(certificate.labels, certificate.pvalues, [16])
    certified = certificate.labels.reshape(-1)[pixels]
    assert (certified == 1).all(), "the lowest margins are class 1 by construction"
    result = attack_group(smoothed, x, pixels, certified, torch.zeros_like(certified), eps,
                          SharpConfig(steps=10, draws=8), torch.Generator().manual_seed(2))
    assert float((result.x_adv - x).norm()) <= eps * (1 + 1e-6)
    exact = lambda image: segmenter.smoothed(image, sigma).reshape(-1)[pixels.numpy()]  # noqa: E731
    before, after = exact(x), exact(result.x_adv)
    random = exact(random_perturbation(x, eps, torch.Generator().manual_seed(3)))
    per_pixel_bound = np.array([lipschitz_bound(float(p), eps, sigma) for p in before])
    assert (after >= per_pixel_bound - 1e-6).all()  # never below, pixel by pixel
    group_bound = lipschitz_bound(float(before.mean()), eps, sigma)
    assert after.mean() >= group_bound - 1e-6  # nor the group's mean (a smoothed [0, 1]-valued function too)
    sharp = drop_fraction(float(before.mean()), float(after.mean()), group_bound)
    assert sharp > 0.9  # the sharp attack finds the worst direction
    assert abs(drop_fraction(float(before.mean()), float(random.mean()), group_bound)) < 0.3 < sharp


def test_sharp_attack_rows_stay_above_the_bound_and_beat_a_random_direction():
    sigma = 0.25
    smoothed, segmenter, x = linear_smoothed(sigma)
    certificate = smoothed.certify(x, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(1))
    eps = 0.999 * certificate.radius
    config = SharpConfig(group_sizes=(16, 16), steps=10, draws=8, estimate_draws=1000)
    rows, maps = sharp_attack(smoothed, x, certificate, eps, config, seed=0, index=0)
    again, _ = sharp_attack(smoothed, x, certificate, eps, config, seed=0, index=0)
    assert rows[0]["p_after"] == again[0]["p_after"]  # seeded
    assert len(rows) == 2 and maps["group_pixels"].sum() == 32 and maps["group_adversarial"].shape == x.shape
    groups = lowest_margin_groups(certificate.labels, certificate.pvalues, [16, 16])
    for row, pixels in zip(rows, groups):
        exact_before = segmenter.smoothed(x, sigma).reshape(-1)[pixels.numpy()].mean()
        assert row["p_before_lower"] <= exact_before <= row["p_before_upper"]
        assert row["p_after_upper"] >= row["bound"] and not row["below_bound"] and not row["below_half"]
        assert not row["before_below_tau"] and row["p_before"] > 0.75
        assert row["drop_fraction"] > 0.7 and row["drop_fraction"] > row["random_drop_fraction"] + 0.5
        assert row["count_min"] <= row["count_max"] <= 100 and row["delta_norm"] <= eps * (1 + 1e-6)
        assert row["bound"] <= row["bound_point"] < row["p_before"]
    assert rows[0]["count_max"] <= rows[1]["count_min"]  # lowest margins first


def test_sharp_attack_sees_noise_smaller_than_the_declared_sigma(monkeypatch):
    """A planted bug the flip count cannot see: noise drawn at sigma / 2 (the DDPM's 2 sigma scale the wrong
    way round). The model then moves twice as fast as the declared sigma allows: below the bound."""
    real_draw_noise = smoothing.draw_noise

    def half_noise(*args, **kwargs):
        noise, generators = real_draw_noise(*args, **kwargs)
        return 0.5 * noise, generators

    monkeypatch.setattr(smoothing, "draw_noise", half_noise)
    monkeypatch.setattr(attack, "draw_noise", half_noise)
    smoothed, segmenter, x = linear_smoothed(0.5)  # margins 1.5..4 of sigma 0.5 = 3..8 of the true 0.25
    segmenter.bias.sub_(0.5 * 0.75)  # lowest margins down to about 1.5 of the noise actually drawn
    certificate = smoothed.certify(x, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(1))
    rows, _ = sharp_attack(smoothed, x, certificate, 0.999 * certificate.radius,
                           SharpConfig(group_sizes=(16,), steps=10, draws=8, estimate_draws=1000), seed=0, index=0)
    assert rows[0]["below_bound"] and rows[0]["drop_fraction"] > 1.2


class RecordingSegmenter(torch.nn.Module):
    """tiny_segmenter that records whether it runs under CPU autocast, and in which dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_segmenter()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return self.inner(x)


@pytest.mark.parametrize("precision, expected", [("fp32", False), ("bf16", True)])
def test_attacks_run_the_networks_in_the_runs_precision(precision, expected):
    segmenter = RecordingSegmenter()
    smoothed = SmoothedSegmenter(segmenter, 3, 0.25, denoiser=BlurDenoiser(), batch_size=32, device="cpu",
                                 precision=precision)
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    certificate = smoothed.certify(x, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(0))
    segmenter.seen.clear()
    attack_smoothed(smoothed, x, certificate.labels, 0.5, PGDConfig(steps=2, draws=4), torch.Generator().manual_seed(1))
    attack_base(segmenter, x, 0.5, PGDConfig(steps=2), num_classes=3, precision=precision)
    sharp_attack(smoothed, x, certificate, 0.5, SharpConfig(group_sizes=(4,), steps=2, draws=2, estimate_draws=4),
                 seed=0, index=0)
    assert len(segmenter.seen) > 5 and {enabled for enabled, _ in segmenter.seen} == {expected}
    if expected:
        assert {dtype for _, dtype in segmenter.seen} == {torch.bfloat16}


class HalfResolutionSegmenter(torch.nn.Module):
    """Logits at half the input's resolution: a base model that must be refused, never attacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(tiny_segmenter()(x), 2)


class CroppingDenoiser(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:, 1:]


def test_attacks_check_the_base_models_outputs():
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="logits of shape"):
        attack_base(HalfResolutionSegmenter(), x, 0.5, PGDConfig(steps=2), num_classes=3)
    with pytest.raises(ValueError, match="logits of shape"):
        base_prediction(HalfResolutionSegmenter(), x, num_classes=3)
    with pytest.raises(ValueError, match="channels"):
        smoothed_log_probabilities(tiny_segmenter(num_classes=4), None, x, 0.25, 2, torch.Generator(), num_classes=3)
    with pytest.raises(ValueError, match="denoiser returns"):
        smoothed_log_probabilities(tiny_segmenter(), CroppingDenoiser(), x, 0.25, 2, torch.Generator(), num_classes=3)
    smoothed = SmoothedSegmenter(HalfResolutionSegmenter(), 3, 0.25, batch_size=8, device="cpu")
    labels = torch.zeros(16, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits of shape"):
        attack_smoothed(smoothed, x, labels, 0.5, PGDConfig(steps=2, draws=2), torch.Generator())


def test_sharp_config_validation():
    with pytest.raises(ValueError, match="estimate_draws"):
        SharpConfig(estimate_draws=1)
    with pytest.raises(ValueError, match="confidence"):
        SharpConfig(confidence=1.0)
    with pytest.raises(ValueError, match="group_sizes"):
        SharpConfig(group_sizes=(1, 0))
    assert SharpConfig(group_sizes=[1, 2]).group_sizes == (1, 2)
    assert SharpConfig(steps=10).relative_step == pytest.approx(0.25)


def test_summarize_groups():
    groups = pd.DataFrame({
        "method_label": ["a", "a", "b"], "sigma": [0.25] * 3, "image_id": ["0", "0", "1"], "group": [0, 1, 0],
        "group_pixels": [16, 16, 1], "eps": [0.17] * 3, "count_min": [95, 96, 97], "count_max": [96, 97, 98],
        "p_before": [0.9, 0.95, 0.9], "p_before_lower": [0.85, 0.9, 0.85], "p_after": [0.85, 0.9, 0.6],
        "p_random": [0.9] * 3, "bound": [0.7, 0.8, 0.7], "bound_point": [0.75, 0.83, 0.75],
        "drop_fraction": [1 / 3, 5 / 12, 2.0], "random_drop_fraction": [0.0] * 3,
        "below_bound": [False, False, True], "below_half": [False] * 3, "before_below_tau": [False] * 3,
        "seconds": [1.0, 2.0, 3.0],
    })
    summary = summarize_groups(groups).set_index("method_label")
    assert summary.loc["b", "group_pixels"] == 1
    assert summary.loc["a", "groups"] == 2 and summary.loc["a", "images"] == 1
    assert summary.loc["a", "p_after"] == pytest.approx(0.875) and summary.loc["a", "count_min"] == 95
    assert summary.loc["a", "margin_to_bound_min"] == pytest.approx(0.1)
    assert summary.loc["b", "groups_below_bound"] == 1 and summary.loc["b", "drop_fraction_max"] == 2.0
    assert summarize_groups(pd.DataFrame()).empty
