"""L2 PGD on the smoothed model and on the base model, and the certificate-attack experiment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

from medcert_core import ABSTAIN
from medcert_core.attack import (
    PGDConfig,
    attack_base,
    attack_smoothed,
    compare_certificates,
    pgd_l2,
    project_l2_box,
    smoothed_log_probabilities,
)
from medcert_core.smoothing import SmoothedSegmenter, image_seed
from medcert_core.study.soundness import attack_certificates, attack_payload, summarize_attack


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
    from medcert_core.study.assets import DataSpec
    from medcert_core.study.profiles import training_spec
    from medcert_core.study.runs import CertificationRun, ours, segcertify

    data = DataSpec("phantom", None, 32, 0)
    runs = [CertificationRun(data=data, training=training_spec("smoke"), arch="unet", method=method, sigma=0.5,
                             n0=10, n=60, alpha=0.001) for method in (segcertify(), ours("ddpm:auto"))]
    frame = attack_certificates(runs, tmp_path / "cache", images=2, pgd=PGDConfig(steps=8, draws=4), device="cpu",
                                progress=False)
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
