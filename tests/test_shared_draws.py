"""certify_segmenters: several segmenters behind one denoiser from one set of draws, each certificate
identical to that segmenter certified alone with the same seed, with the denoiser run once per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcert_core.smoothing import SmoothedSegmenter, certify_segmenters, segmenters_counts

SIZE, CLASSES, SIGMA = 12, 3, 0.5


def tied_segmenter(seed: int) -> torch.nn.Module:
    """A random 1x1 + 3x3 conv segmenter whose classes tie on average under the noise: its counts
    depend on every draw (a segmenter that certifies one class everywhere would hide a wrong stream)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, CLASSES, 1))
    with torch.no_grad():
        noisy = 0.5 + SIGMA * torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        model[2].bias -= model(noisy).mean((0, 2, 3))
    return model.eval()


class CountingDenoiser(torch.nn.Module):
    """A fixed smoothing filter that counts its calls and the draws it saw; ``stochastic`` adds noise of
    its own from the per-draw generators, as a multi-step DDPM does."""

    def __init__(self, stochastic: bool = False):
        super().__init__()
        self.stochastic = stochastic
        self.calls = self.draws = 0
        self.register_buffer("kernel", torch.full((1, 1, 3, 3), 1 / 9))

    def forward(self, batch, generators=None):
        self.calls += 1
        self.draws += batch.shape[0]
        smooth = torch.nn.functional.conv2d(batch, self.kernel, padding=1)
        if generators is not None:
            extra = torch.stack([torch.randn(batch.shape[1:], generator=g) for g in generators])
            smooth = smooth + 0.05 * extra
        return smooth


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize(("batch_size", "channels_last"), [(7, False), (32, False), (32, True)])
def test_each_certificate_is_the_one_its_segmenter_gets_alone(stochastic, batch_size, channels_last):
    segmenters = {name: tied_segmenter(seed) for seed, name in enumerate(("unet", "resunetpp", "deeplabv2"))}
    image = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    n0, n = 10, 90
    shared_denoiser = CountingDenoiser(stochastic)
    together = certify_segmenters(segmenters, image, n0, n, num_classes=CLASSES, sigma=SIGMA,
                                  denoiser=shared_denoiser, alpha=0.05, generator=torch.Generator().manual_seed(4),
                                  batch_size=batch_size, device="cpu", channels_last=channels_last)
    assert list(together) == list(segmenters)
    batches = -(-(n0 + n) // batch_size)
    assert (shared_denoiser.calls, shared_denoiser.draws) == (batches, n0 + n), "one denoiser pass per batch"
    for name, segmenter in segmenters.items():
        alone_denoiser = CountingDenoiser(stochastic)
        alone = SmoothedSegmenter(segmenter, CLASSES, SIGMA, denoiser=alone_denoiser, batch_size=batch_size,
                                  device="cpu", channels_last=channels_last).certify(image, n0, n, alpha=0.05,
                                                        generator=torch.Generator().manual_seed(4))
        np.testing.assert_array_equal(together[name].labels.numpy(), alone.labels.numpy())
        np.testing.assert_array_equal(together[name].pvalues.numpy(), alone.pvalues.numpy())
        assert alone_denoiser.draws == n0 + n
        assert 0.05 < (alone.pvalues < 0.5).float().mean() < 0.95, "p-values that depend on the draws"
    labels = [certificate.labels for certificate in together.values()]
    assert not torch.equal(labels[0], labels[1]), "different segmenters, different certificates"

    counts = segmenters_counts(segmenters, image, n0, n, num_classes=CLASSES, sigma=SIGMA,
                               denoiser=CountingDenoiser(stochastic), generator=torch.Generator().manual_seed(4),
                               batch_size=batch_size, device="cpu")
    for name, segmenter in segmenters.items():
        selected, count = SmoothedSegmenter(segmenter, CLASSES, SIGMA, denoiser=CountingDenoiser(stochastic),
                                            batch_size=batch_size, device="cpu").counts(
            image, n0, n, generator=torch.Generator().manual_seed(4))
        assert torch.equal(counts[name][0], selected) and torch.equal(counts[name][1], count)


def test_a_planted_stream_bug_is_caught(monkeypatch):
    """A shared loop whose stream drifts from the one a segmenter alone draws (one draw skipped per batch)
    fails the comparison above."""
    from medcert_core import smoothing

    segmenters = {"a": tied_segmenter(0), "b": tied_segmenter(1)}
    image = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))

    def shared():
        return certify_segmenters(segmenters, image, 10, 90, num_classes=CLASSES, sigma=SIGMA,
                                  denoiser=CountingDenoiser(), alpha=0.05, generator=torch.Generator().manual_seed(4),
                                  device="cpu")["b"]

    alone = SmoothedSegmenter(segmenters["b"], CLASSES, SIGMA, denoiser=CountingDenoiser(), device="cpu").certify(
        image, 10, 90, alpha=0.05, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(shared().pvalues.numpy(), alone.pvalues.numpy())
    original = smoothing.draw_noise

    def drifting(shape, count, generator, *args, **kwargs):
        torch.randn(shape, generator=generator)  # the planted bug: one draw consumed and dropped
        return original(shape, count, generator, *args, **kwargs)

    monkeypatch.setattr(smoothing, "draw_noise", drifting)
    assert not np.array_equal(shared().pvalues.numpy(), alone.pvalues.numpy())


def test_bad_segmenters_are_refused_before_any_draw():
    image = torch.rand(1, SIZE, SIZE)
    with pytest.raises(ValueError, match="at least one segmenter"):
        certify_segmenters({}, image, 10, 90, num_classes=CLASSES, sigma=SIGMA, device="cpu")
    two_classes = torch.nn.Conv2d(1, 2, 1)
    denoiser = CountingDenoiser()
    with pytest.raises(ValueError, match="returns 2 channels but num_classes = 3"):
        certify_segmenters({"ok": tied_segmenter(0), "wrong": two_classes}, image, 10, 90, num_classes=CLASSES,
                           sigma=SIGMA, denoiser=denoiser, device="cpu")
    assert denoiser.calls == 1, "it fails on the first batch, not after all draws"


class Scribbler(torch.nn.Module):
    """A segmenter that zeroes the batch it is given after segmenting it (it edits its input in place)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        logits = self.inner(batch)
        batch.zero_()
        return logits


def test_a_segmenter_that_edits_its_input_does_not_change_what_the_next_one_sees():
    image = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    scribbler, second = Scribbler(tied_segmenter(0)), tied_segmenter(1)
    together = segmenters_counts({"scribbler": scribbler, "second": second}, image, 10, 90, num_classes=CLASSES,
                                 sigma=SIGMA, denoiser=CountingDenoiser(), generator=torch.Generator().manual_seed(4),
                                 batch_size=32, device="cpu")
    alone = SmoothedSegmenter(second, CLASSES, SIGMA, denoiser=CountingDenoiser(), batch_size=32,
                              device="cpu").counts(image, 10, 90, generator=torch.Generator().manual_seed(4))
    assert torch.equal(together["second"][0], alone[0]) and torch.equal(together["second"][1], alone[1])
    assert int(alone[1].min()) < 60 < int(alone[1].max()), "counts that depend on the draws"
