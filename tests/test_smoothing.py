"""Sampling and streamed counting of SmoothedSegmenter, and the family-wise error it promises."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

from medcert_core import ABSTAIN, certify
from medcert_core.smoothing import SmoothedSegmenter


class ThresholdSegmenter(torch.nn.Module):
    """Class 1 where the input is below ``threshold``, else 0, as two logits (B, 2, H, W)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        below = (x[:, 0] < self.threshold).float()
        return torch.stack([1 - below, below], dim=1)


class RecordingSegmenter(torch.nn.Module):
    """Records every input batch; predicts the sign of the first channel as one binary logit."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x[:, :1] - 0.5


class ShiftDenoiser(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 10.0


def test_family_wise_error_stays_below_alpha():
    """Every pixel's selected class has probability exactly tau, so any certified pixel is an error.

    With the input 0 and f(x + d)[p] = 1 iff d[p] < sigma * Phi^-1(tau), P[f = 1] = tau on every
    pixel. Over 1000 trials the fraction with any certified pixel must stay below alpha + 3 SE.
    (With correction="none" this fraction is about 0.9 here: the test fails, as it should.)
    """
    sigma, tau, alpha, trials = 0.5, 0.75, 0.05, 1000
    segmenter = ThresholdSegmenter(sigma * norm.ppf(tau))
    smoothed = SmoothedSegmenter(segmenter, num_classes=2, sigma=sigma, batch_size=110, device="cpu")
    image = torch.zeros(1, 8, 8)
    generator = torch.Generator().manual_seed(2024)
    failures = sum(
        bool((smoothed.certify(image, 10, 100, tau=tau, alpha=alpha, generator=generator).labels != ABSTAIN).any())
        for _ in range(trials)
    )
    margin = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert failures / trials <= alpha + margin, f"family-wise error {failures / trials:.3f} > {alpha} + {margin:.3f}"


@pytest.mark.filterwarnings("ignore:n = 9 draws cannot certify")
def test_draws_are_independent_within_and_across_batches():
    recorder = RecordingSegmenter()
    smoothed = SmoothedSegmenter(recorder, num_classes=2, sigma=0.3, batch_size=4, device="cpu")
    image = torch.full((3, 6, 5), 0.5)
    smoothed.certify(image, 2, 9, alpha=0.1, generator=torch.Generator().manual_seed(0))
    noise = (torch.cat(recorder.inputs) - image).reshape(11, -1)
    assert [len(batch) for batch in recorder.inputs] == [4, 4, 3], "selection and estimation: one stream of batches"
    distances = torch.cdist(noise, noise) + torch.eye(11) * 1e9
    assert distances.min() > 1.0, "two draws share their noise"
    correlation = torch.corrcoef(noise)
    off_diagonal = correlation[~torch.eye(11, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.5
    assert noise.std().item() == pytest.approx(0.3, rel=0.1)


def test_same_seed_same_certificate_whatever_the_batch_size():
    segmenter = ThresholdSegmenter(0.1)
    image = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(1)) * 0.2
    certificates = [
        SmoothedSegmenter(segmenter, 2, sigma=0.25, batch_size=size, device="cpu").certify(
            image, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(5)
        )
        for size in (7, 32, 110)
    ]
    for other in certificates[1:]:
        assert torch.equal(other.labels, certificates[0].labels)
        assert torch.equal(other.pvalues, certificates[0].pvalues)
    different = SmoothedSegmenter(segmenter, 2, sigma=0.25, device="cpu").certify(
        image, 10, 100, alpha=0.01, generator=torch.Generator().manual_seed(6)
    )
    assert not torch.equal(different.pvalues, certificates[0].pvalues)


def test_streamed_counts_equal_the_full_sample_tensor():
    segmenter = ThresholdSegmenter(0.55)
    image = torch.linspace(0.0, 1.0, 90).reshape(1, 10, 9)
    smoothed = SmoothedSegmenter(segmenter, 2, sigma=0.25, batch_size=8, device="cpu")
    streamed = smoothed.certify(image, 10, 60, alpha=0.05, generator=torch.Generator().manual_seed(9))
    full = torch.cat([classes for _, classes in smoothed.draw_batches(image, 70, torch.Generator().manual_seed(9))])
    assert full.shape == (70, 10, 9)
    reference = certify(full, 10, sigma=0.25, alpha=0.05)
    assert torch.equal(streamed.labels, reference.labels)
    assert torch.equal(streamed.pvalues, reference.pvalues)
    assert ((streamed.labels != ABSTAIN).float().mean() > 0.2) and ((streamed.labels == ABSTAIN).any())


def test_binary_one_logit_segmenter_and_denoiser_are_applied():
    recorder = RecordingSegmenter()
    smoothed = SmoothedSegmenter(recorder, 2, sigma=0.1, denoiser=ShiftDenoiser(), device="cpu")
    image = torch.zeros(2, 4, 4)
    cert = smoothed.certify(image, 5, 50, alpha=0.01, generator=torch.Generator().manual_seed(0))
    assert all(batch.min() > 9.0 for batch in recorder.inputs), "the segmenter must see the denoised batch"
    assert torch.equal(cert.labels, torch.ones(4, 4, dtype=torch.int64))


def test_multiclass_certificate_on_a_clear_image():
    class Quadrants(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot((3 * x[:, 0]).round().clamp(0, 3).long(), 4).permute(0, 3, 1, 2).float()

    classes = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    image = (classes / 3.0)[None]
    smoothed = SmoothedSegmenter(Quadrants(), 4, sigma=0.02, device="cpu")
    cert = smoothed.certify(image, 10, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cert.labels, classes)
    labels = smoothed.predict(image, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, classes)


def test_predict_abstains_on_a_coin_flip():
    segmenter = ThresholdSegmenter(0.0)
    smoothed = SmoothedSegmenter(segmenter, 2, sigma=1.0, device="cpu")
    labels = smoothed.predict(torch.zeros(1, 6, 6), 100, alpha=0.01, generator=torch.Generator().manual_seed(3))
    assert (labels == ABSTAIN).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="returns 3 channels but num_classes = 2"):
        SmoothedSegmenter(lambda_module(3), 2, sigma=0.1, device="cpu").certify(
            torch.zeros(1, 4, 4), 1, 10, generator=torch.Generator().manual_seed(0)
        )
    for wrong_rank in (torch.zeros(4, 4), torch.zeros(1, 1, 1, 4, 4)):  # (C, D, H, W) is a volume, not an error
        with pytest.raises(ValueError, match=r"\(C, H, W\) \(an image\) or \(C, D, H, W\) \(a volume\)"):
            SmoothedSegmenter(ThresholdSegmenter(0), 2, sigma=0.1, device="cpu").certify(wrong_rank, 1, 10)
    with pytest.raises(ValueError, match="sigma"):
        SmoothedSegmenter(ThresholdSegmenter(0), 2, sigma=0.0)


def lambda_module(channels: int) -> torch.nn.Module:
    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], channels, *x.shape[-2:])

    return Constant()


def test_a_batchnorm_model_left_in_train_mode_gives_the_eval_certificate_and_one_warning():
    """In train mode BatchNorm normalises each batch by its own statistics: the draws of a batch would
    depend on each other. The smoother switches to eval mode at every call, so nothing changes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 2, 1))
    images = torch.rand(16, 1, 12, 12)
    targets = (images[:, 0] > 0.5).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):  # trained: BatchNorm's running statistics differ from any batch's own
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    image = images[0]
    settings = dict(n0=10, n=100, alpha=0.01)
    smoothed = SmoothedSegmenter(model.eval(), 2, sigma=0.25, batch_size=110, device="cpu")
    reference = smoothed.certify(image, generator=torch.Generator().manual_seed(1), **settings)
    probe = copy.deepcopy(model)  # a train-mode call updates BatchNorm's running statistics
    with torch.inference_mode():  # the model is sensitive to its mode: train mode would change the draws
        noisy = image[None] + 0.25 * torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(probe.train()(noisy).argmax(1), model.eval()(noisy).argmax(1))
    model.train()
    with pytest.warns(UserWarning, match="eval mode") as caught:
        again = smoothed.certify(image, generator=torch.Generator().manual_seed(1), **settings)
    assert len(caught) == 1
    assert torch.equal(again.labels, reference.labels) and torch.equal(again.pvalues, reference.pvalues)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again
        third = smoothed.certify(image, generator=torch.Generator().manual_seed(1), **settings)
    assert torch.equal(third.pvalues, reference.pvalues)
    assert not model.training


@pytest.mark.parametrize("tau", [0.3, 0.4999, 1.0])
def test_tau_outside_its_range_fails_before_any_draw(tau):
    recorder = RecordingSegmenter()
    smoothed = SmoothedSegmenter(recorder, 2, sigma=0.25, device="cpu")
    with pytest.raises(ValueError, match=r"0.5 <= tau < 1"):
        smoothed.certify(torch.zeros(1, 4, 4), 1, 10, tau=tau)
    assert recorder.inputs == []


def test_non_finite_logits_are_an_error_never_a_class():
    class SometimesNaN(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.stack([x[:, 0], -x[:, 0]], dim=1)
            return torch.where(x[:, :1] > 1.0, torch.nan, logits)  # overflow on a few draws

    smoothed = SmoothedSegmenter(SometimesNaN(), 2, sigma=0.5, device="cpu")
    with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
        smoothed.certify(torch.full((1, 4, 4), 0.5), 5, 50, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="NaN or infinite logits"):
        smoothed.predict(torch.full((1, 4, 4), 0.5), 50, generator=torch.Generator().manual_seed(0))
    smoothed.sigma = 0.05  # x + delta then never exceeds 1 on x = 0
    fine = smoothed.certify(torch.full((1, 4, 4), 0.0), 5, 50, generator=torch.Generator().manual_seed(0))
    assert fine.labels.shape == (4, 4), "the flag is reset for every image"


class Stride2Head(torch.nn.Module):
    """A head at half the input's resolution (a DeepLab without its final upsample)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x[:, :1], 2)
        return torch.cat([pooled, 1 - pooled], dim=1)


class TransposedHead(torch.nn.Module):
    """Logits (B, K, W, H) instead of (B, K, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], 1 - x[:, :1]], dim=1).transpose(-1, -2)


class ShrinkingDenoiser(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 2)


@pytest.mark.parametrize(("segmenter", "shape", "message"), [
    (Stride2Head(), (1, 8, 8), r"shape \(16, 2, 4, 4\).*expected.*\(16, 2 \(or 1\), 8, 8\).*upsample"),
    (TransposedHead(), (1, 4, 6), r"\(16, 2, 6, 4\).*swapped"),
    (lambda_module(3), (1, 8, 8), "returns 3 channels.*num_classes = 2"),
])
def test_a_segmenter_output_of_another_shape_is_refused_before_anything_is_counted(segmenter, shape, message):
    smoothed = SmoothedSegmenter(segmenter, 2, sigma=0.1, batch_size=16, device="cpu")
    x = torch.full(shape, 0.5)
    for call in (lambda: smoothed.certify(x, 1, 20, generator=torch.Generator().manual_seed(0)),
                 lambda: smoothed.predict(x, 20, generator=torch.Generator().manual_seed(0))):
        with pytest.raises(ValueError, match=message):
            call()


def test_a_denoiser_that_changes_the_size_is_refused():
    smoothed = SmoothedSegmenter(ThresholdSegmenter(0.5), 2, sigma=0.1, denoiser=ShrinkingDenoiser(), device="cpu")
    with pytest.raises(ValueError, match=r"denoiser returns \(16, 1, 4, 4\) for a noisy batch of shape \(16, 1, 8, 8\)"):
        smoothed.certify(torch.full((1, 8, 8), 0.5), 1, 20, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_an_input_outside_the_unit_range_is_refused(value):
    x = torch.full((1, 4, 4), 0.5)
    x[0, 1, 2] = value
    smoothed = SmoothedSegmenter(ThresholdSegmenter(0.5), 2, sigma=0.1, device="cpu")
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        smoothed.certify(x, 1, 10, generator=torch.Generator().manual_seed(0))
