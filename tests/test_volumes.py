"""Certified 3D segmentation: a volume x (C, D, H, W) with logits (B, K, D, H, W) goes through the same
sampling, counting and Holm step as an image (issue #38, step 1).

- the certificate of a tiny deterministic 3D segmenter equals an oracle written plainly here: the same
  noise drawn with the same seed (one generator call per draw, the whole volume at once), the model run
  draw by draw, per-voxel counts, ``scipy.stats.binomtest`` and a plain step-down Holm over all voxels;
- planted bugs (``monkeypatch``, as in tests/test_planted_bugs.py), each caught by the detectors listed in
  ``CAUGHT_BY``: Holm over each slice's voxels instead of the volume's; noise drawn for one slice and
  shared by every slice; one noise draw reused across a batch;
- a Monte-Carlo family-wise error on volumes (threshold base model, whose smoothed probability is
  Phi((x - t) / sigma) exactly) stays below alpha;
- shape errors name the volume's layout; a 2D segmenter applied slice by slice certifies.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm

from medcert_core import ABSTAIN
from medcert_core.certify import certify, certify_counts
from medcert_core.metrics import segmentation_scores
from medcert_core.smoothing import SmoothedSegmenter, certify_segmenters

smoothing_module = importlib.import_module("medcert_core.smoothing")

Verdict = tuple[bool, str]
SHAPE = (1, 6, 8, 8)  # (C, D, H, W)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one intra-op thread


# --------------------------------------------------------------------------------------------- models


class VoxelThreshold(torch.nn.Module):
    """Logits (B, 2, D, H, W): 0 and x_v - t_v for every voxel v, so class 1 where x_v > t_v; under
    N(0, sigma^2) noise p_1 = Phi((x_v - t_v) / sigma) exactly. Records its inputs if asked."""

    def __init__(self, thresholds: torch.Tensor, record: bool = False) -> None:
        super().__init__()
        self.register_buffer("thresholds", thresholds)
        self.record = record
        self.inputs: list[torch.Tensor] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.inputs.append(batch.detach().clone())
        margin = batch[:, :1] - self.thresholds
        return torch.cat([torch.zeros_like(margin), margin], dim=1)


def fixed_conv3d(shift: float = 0.0) -> torch.nn.Module:
    """A 3x3x3 Conv3d with fixed weights, 1 -> 3 classes: each voxel's class depends on its neighbours in
    the slices above and below, so counting per slice or mixing slices changes its counts."""
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    weights = torch.linspace(-1, 1, conv.weight.numel()).reshape(conv.weight.shape)
    with torch.no_grad():
        conv.weight.copy_((7 * weights).sin() * 0.3)
        conv.bias.copy_(torch.tensor([0.0, 0.1 + shift, -0.1]))
    return conv


class SliceBySlice(torch.nn.Module):
    """A 2D segmenter (B, C, H, W) -> (B, K, H, W) applied to each of the D slices of a (B, C, D, H, W)
    batch, stacked to logits (B, K, D, H, W): a valid volumetric base model."""

    def __init__(self, net2d: torch.nn.Module) -> None:
        super().__init__()
        self.net2d = net2d

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = batch.shape
        slices = batch.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        logits = self.net2d(slices)
        return logits.reshape(b, d, -1, h, w).permute(0, 2, 1, 3, 4)


def fixed_conv2d() -> torch.nn.Module:
    conv = torch.nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-0.5, 1.5, conv.weight.numel()).reshape(conv.weight.shape))
        conv.bias.copy_(torch.tensor([0.5, -0.5]))
    return conv


def graded_volume(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A volume x (1, 6, 8, 8) and voxel thresholds t such that p_1 = Phi((x - t) / sigma) runs from 0.03 to
    0.97 and through the band near 0.8 where, at n = 500, some counts pass Holm over one slice's 64 voxels
    but not over the volume's 384."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(SHAPE, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    p1 = torch.linspace(0.03, 0.97, math.prod(SHAPE[1:]), dtype=torch.float64)
    p1 = p1[torch.randperm(p1.numel(), generator=generator)].reshape(SHAPE[1:])
    p1[::2, ::2] = 0.8  # the band between the two Holm thresholds
    return x, x[0] - SIGMA_ORACLE * torch.as_tensor(norm.ppf(p1.numpy()))


# --------------------------------------------------------------------------------------------- oracle

SIGMA_ORACLE, TAU, ALPHA, N0, N = 0.25, 0.75, 0.01, 32, 500


def plain_holm(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Step-down Holm over every element: reject the i-th smallest p-value (0-based) while
    p <= alpha / (m - i), stop at the first that is not."""
    flat = pvalues.reshape(-1)
    reject = np.zeros(flat.size, dtype=bool)
    for position, index in enumerate(np.argsort(flat, kind="stable")):
        if flat[index] > alpha / (flat.size - position):
            break
        reject[index] = True
    return reject.reshape(pvalues.shape)


def oracle_certificate(model: torch.nn.Module, x: torch.Tensor, num_classes: int, seed: int, *, sigma: float,
                       n0: int, n: int, tau: float, alpha: float) -> dict[str, np.ndarray]:
    """The certificate computed plainly: draw i is x + sigma * randn(x.shape) (one call on one generator, in
    order), its class ids are the model's argmax on that one draw; the selected class is the mode of the first
    n0 (ties: the smallest id), its count that of the next n; binomtest p-values; Holm over all voxels."""
    generator = torch.Generator().manual_seed(seed)
    classes = []
    with torch.no_grad():
        for _ in range(n0 + n):
            noisy = x + sigma * torch.randn(tuple(x.shape), generator=generator, dtype=x.dtype)
            classes.append(model(noisy[None]).argmax(1)[0].numpy())
    classes = np.stack(classes)
    votes = np.stack([(classes[:n0] == k).sum(0) for k in range(num_classes)])
    selected = votes.argmax(0)
    counts = (classes[n0:] == selected).sum(0)
    pvalues = np.vectorize(lambda k: binomtest(int(k), n, tau, alternative="greater").pvalue)(counts)
    labels = np.where(plain_holm(pvalues, alpha), selected, ABSTAIN)
    return {"selected": selected, "counts": counts, "pvalues": pvalues, "labels": labels}


def smoothed_certificate(model: torch.nn.Module, x: torch.Tensor, num_classes: int, seed: int, *, sigma: float,
                         n0: int, n: int, tau: float, alpha: float, batch_size: int = 64):
    smoother = SmoothedSegmenter(model, num_classes, sigma, batch_size=batch_size, device="cpu")
    return smoother.certify(x, n0, n, tau=tau, alpha=alpha, generator=torch.Generator().manual_seed(seed))


def compare_to_oracle(model: torch.nn.Module, x: torch.Tensor, num_classes: int, seed: int, **options) -> Verdict:
    """(ok, detail): the SmoothedSegmenter's labels and p-values equal the oracle's."""
    oracle = oracle_certificate(model, x, num_classes, seed, **options)
    cert = smoothed_certificate(model, x, num_classes, seed, **options)
    labels, pvalues = cert.labels.numpy(), cert.pvalues.numpy()
    if labels.shape != oracle["labels"].shape:
        return False, f"labels of shape {labels.shape}, oracle {oracle['labels'].shape}"
    if not np.allclose(pvalues, oracle["pvalues"], rtol=1e-9, atol=1e-300):
        return False, f"p-values differ at {int((~np.isclose(pvalues, oracle['pvalues'], rtol=1e-9)).sum())} voxels"
    if not np.array_equal(labels, oracle["labels"]):
        return False, f"labels differ at {int((labels != oracle['labels']).sum())} voxels"
    certified = int((labels != ABSTAIN).sum())
    return True, f"{certified} of {labels.size} voxels certified, as the oracle"


# ------------------------------------------------------------------------------------------ detectors


def certificate_equals_oracle() -> Verdict:
    """The threshold model and a 3x3x3 Conv3d (3 classes) on a (1, 6, 8, 8) volume: labels and p-values equal
    the oracle's (same noise, binomtest, plain Holm over all 384 voxels)."""
    options = {"sigma": SIGMA_ORACLE, "n0": N0, "n": N, "tau": TAU, "alpha": ALPHA}
    x, thresholds = graded_volume()
    ok, detail = compare_to_oracle(VoxelThreshold(thresholds), x, 2, 1, **options)
    if not ok:
        return False, f"threshold model: {detail}"
    ok, detail_conv = compare_to_oracle(fixed_conv3d().double(), x, 3, 2, **options)
    return ok, f"threshold model: {detail}; conv3d: {detail_conv}"


def noise_independent_across_voxels_and_draws() -> Verdict:
    """The noise the model receives: slices uncorrelated with each other (per slice pair, the mean over 64 draws
    of r over 64 voxels is below 0.2 in size: 12 standard deviations; shared noise gives 1), draws uncorrelated
    with each other (|r| < 0.25 over 384 voxels, 4.9 standard deviations), std sigma (to 5 %)."""
    x = torch.full(SHAPE, 0.5, dtype=torch.float64)
    model = VoxelThreshold(torch.full(SHAPE[1:], 0.5, dtype=torch.float64), record=True)
    smoothed_certificate(model, x, 2, 3, sigma=0.25, n0=8, n=56, tau=TAU, alpha=ALPHA, batch_size=16)
    noise = (torch.cat(model.inputs) - x)[:, 0]  # (draws, D, H, W)
    slices = noise.reshape(noise.shape[0], SHAPE[1], -1)
    between_slices = torch.stack([torch.corrcoef(draw) for draw in slices]).mean(0) - torch.eye(SHAPE[1])
    if float(between_slices.abs().max()) >= 0.2:
        return False, f"slices correlated: mean r up to {float(between_slices.abs().max()):.3f}"
    across = torch.corrcoef(noise.reshape(noise.shape[0], -1)) - torch.eye(noise.shape[0], dtype=noise.dtype)
    if float(across.abs().max()) >= 0.25:  # 384 voxels: 4.9 standard deviations
        return False, f"draws correlated: |r| up to {float(across.abs().max()):.3f}"
    std = float(noise.std())
    return abs(std / 0.25 - 1) < 0.05, f"noise std {std:.4f}"


def family_wise_error_on_volumes() -> Verdict:
    """Threshold model on (1, 8, 4, 5) volumes, most voxels just below tau (either class), the rest clearly
    certifiable: the rate of volumes with a certified voxel of the wrong class or radius > |x_v - t_v| (the
    exact robust radius) is at most alpha + 3 SE."""
    rng = np.random.default_rng(16)
    sigma, tau, alpha, n0, n, volumes = 0.25, 0.75, 0.1, 16, 128, 200
    shape = (8, 4, 5)
    failures = 0
    for index in range(volumes):
        u = rng.random(shape)
        edge = np.where(rng.random(shape) < 0.5, tau - 1e-6, 1 - (tau - 1e-6))
        q = np.where(u < 0.7, edge, rng.uniform(tau + 1e-3, 0.9999, shape))  # p_1 per voxel
        x = rng.uniform(0.2, 0.8, shape)
        thresholds = x - sigma * norm.ppf(q)
        cert = smoothed_certificate(VoxelThreshold(torch.as_tensor(thresholds)), torch.as_tensor(x)[None], 2,
                                    50_000 + index, sigma=sigma, n0=n0, n=n, tau=tau, alpha=alpha)
        labels = cert.labels.numpy()
        certified = labels != ABSTAIN
        wrong = certified & ((labels != (x > thresholds)) | (cert.radius > np.abs(x - thresholds)))
        failures += bool(wrong.any())
    rate = failures / volumes
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / volumes)
    return rate <= bound, f"FWER {rate:.4f} (bound {bound:.4f})"


DETECTORS: dict[str, Callable[[], Verdict]] = {
    detector.__name__: detector
    for detector in (certificate_equals_oracle, noise_independent_across_voxels_and_draws,
                     family_wise_error_on_volumes)
}


# -------------------------------------------------------------------------------------------- mutants


def holm_per_slice(monkeypatch) -> None:
    """A 2D path applied slice by slice: each slice certified as its own family (Holm over 64 voxels)."""
    real = smoothing_module.certify_counts

    def certify_counts_per_slice(selected, counts, n, **options):
        slices = [real(selected[d], counts[d], n, **options) for d in range(selected.shape[0])]
        return type(slices[0])(**{**vars(slices[0]), "labels": torch.stack([s.labels for s in slices]),
                                  "pvalues": torch.stack([s.pvalues for s in slices])})

    monkeypatch.setattr(smoothing_module, "certify_counts", certify_counts_per_slice)


def noise_shared_across_slices(monkeypatch) -> None:
    """Noise drawn for one slice (C, 1, H, W) and repeated over D: every slice sees the same noise."""
    real = smoothing_module.draw_noise

    def draw_noise(shape, count, generator, device, stochastic_denoiser=False, dtype=torch.float32):
        noise, generators = real((shape[0], 1, *shape[2:]), count, generator, device, stochastic_denoiser, dtype)
        return noise.expand(count, *shape).clone(), generators

    monkeypatch.setattr(smoothing_module, "draw_noise", draw_noise)


def noise_reused_across_batch(monkeypatch) -> None:
    """One noise draw for every row of a batch (a published peer's bug), on volumes."""
    real = smoothing_module.draw_noise

    def draw_noise(shape, count, generator, device, stochastic_denoiser=False, dtype=torch.float32):
        noise, generators = real(shape, 1, generator, device, stochastic_denoiser, dtype)
        return noise.expand(count, *shape).clone(), generators

    monkeypatch.setattr(smoothing_module, "draw_noise", draw_noise)


MUTANTS: dict[str, Callable] = {mutant.__name__: mutant
                                for mutant in (holm_per_slice, noise_shared_across_slices, noise_reused_across_batch)}

CAUGHT_BY: dict[str, tuple[str, ...]] = {
    "holm_per_slice": ("certificate_equals_oracle", "family_wise_error_on_volumes"),
    "noise_shared_across_slices": ("certificate_equals_oracle", "noise_independent_across_voxels_and_draws"),
    "noise_reused_across_batch": ("certificate_equals_oracle", "noise_independent_across_voxels_and_draws",
                                  "family_wise_error_on_volumes"),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_passes_on_real_code(name):
    ok, detail = DETECTORS[name]()
    print(f"{name}: {detail}")
    assert ok, detail


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(mutant, monkeypatch):
    MUTANTS[mutant](monkeypatch)
    for name in CAUGHT_BY[mutant]:
        ok, detail = DETECTORS[name]()
        print(f"{mutant} -> {name}: {detail}")
        assert not ok, f"{name} did not catch {mutant}: {detail}"


# ------------------------------------------------------------------------------- the volume path itself


def test_the_oracle_volume_certifies_some_voxels_and_abstains_on_others():
    """The oracle test is not vacuous: the graded volume has certified voxels of both classes, abstentions, and
    voxels whose p-value passes Holm over one slice (alpha / 64) but not over the volume (alpha / 384)."""
    x, thresholds = graded_volume()
    oracle = oracle_certificate(VoxelThreshold(thresholds), x, 2, 1, sigma=SIGMA_ORACLE, n0=N0, n=N, tau=TAU,
                                alpha=ALPHA)
    assert set(np.unique(oracle["labels"]).tolist()) == {ABSTAIN, 0, 1}
    assert oracle["labels"].shape == SHAPE[1:]
    between = (oracle["pvalues"] > ALPHA / 384) & (oracle["pvalues"] <= ALPHA / 64)
    assert between.sum() >= 3, "no voxel tells Holm over a slice from Holm over the volume"


def test_a_2d_segmenter_applied_slice_by_slice_certifies_as_the_oracle():
    x, _ = graded_volume(5)
    model = SliceBySlice(fixed_conv2d()).double()
    ok, detail = compare_to_oracle(model, x, 2, 7, sigma=0.25, n0=16, n=200, tau=TAU, alpha=ALPHA)
    assert ok, detail
    cert = smoothed_certificate(model, x, 2, 7, sigma=0.25, n0=16, n=200, tau=TAU, alpha=ALPHA)
    assert 0 < cert.abstain_fraction < 1


def test_a_volume_certificate_does_not_depend_on_the_batch_size():
    x, thresholds = graded_volume()
    model = VoxelThreshold(thresholds)
    certificates = [smoothed_certificate(model, x, 2, 9, sigma=0.25, n0=10, n=100, tau=TAU, alpha=ALPHA,
                                         batch_size=batch) for batch in (1, 7, 110)]
    for cert in certificates[1:]:
        assert torch.equal(cert.labels, certificates[0].labels)
        assert torch.equal(cert.pvalues, certificates[0].pvalues)


def test_counts_and_samples_paths_agree_on_a_volume():
    """certify on (n0 + n, D, H, W) class ids equals certify_counts on the counts recounted by hand."""
    rng = np.random.default_rng(4)
    samples = (rng.random((10 + 90, 3, 4, 5)) < rng.uniform(0.5, 1.0, (3, 4, 5))).astype(np.int64)
    cert = certify(samples, 10, sigma=0.5, tau=0.6, alpha=0.05, num_classes=2)
    selected = (2 * samples[:10].sum(0) > 10).astype(np.int64)
    counts = (samples[10:] == selected).sum(0)
    by_counts = certify_counts(selected, counts, 90, sigma=0.5, tau=0.6, alpha=0.05, n0=10)
    assert cert.labels.shape == (3, 4, 5)
    assert np.array_equal(cert.labels, by_counts.labels)
    assert cert.abstain_fraction == pytest.approx(float((cert.labels == ABSTAIN).mean()))


def test_predict_and_shared_draws_on_a_volume():
    x, thresholds = graded_volume()
    model = VoxelThreshold(thresholds)
    smoother = SmoothedSegmenter(model, 2, 0.25, batch_size=32, device="cpu")
    prediction = smoother.predict(x, 200, alpha=ALPHA, generator=torch.Generator().manual_seed(3))
    assert prediction.shape == SHAPE[1:]
    far = (x[0] - thresholds).abs() > 0.35  # p_1 beyond Phi(1.4) = 0.92: the top class passes with certainty
    assert far.sum() > 20
    assert torch.equal(prediction[far], (x[0] > thresholds)[far].long())
    shared = certify_segmenters({"a": fixed_conv3d(0.2).double(), "b": fixed_conv3d().double()}, x, 8, 80,
                                num_classes=3, sigma=0.25, tau=TAU, alpha=ALPHA, batch_size=32, device="cpu",
                                generator=torch.Generator().manual_seed(6))
    alone = SmoothedSegmenter(fixed_conv3d().double(), 3, 0.25, batch_size=32, device="cpu").certify(
        x, 8, 80, tau=TAU, alpha=ALPHA, generator=torch.Generator().manual_seed(6))
    assert torch.equal(shared["b"].labels, alone.labels)


def test_channels_last_on_a_3d_model_gives_the_same_certificate():
    x, _ = graded_volume()
    certificates = []
    for channels_last in (False, True):
        smoother = SmoothedSegmenter(fixed_conv3d().double(), 3, 0.25, batch_size=16, device="cpu",
                                     channels_last=channels_last)
        certificates.append(smoother.certify(x, 8, 60, tau=TAU, alpha=ALPHA,
                                             generator=torch.Generator().manual_seed(2)))
    assert torch.equal(certificates[0].labels, certificates[1].labels)


class CollapsesDepth(torch.nn.Module):
    """A 2D head on a volume: logits (B, 2, H, W), the depth averaged away."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        mean = batch[:, :1].mean(2)
        return torch.cat([mean, 1 - mean], dim=1)


class SwapsHeightAndWidth(torch.nn.Module):
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch[:, :1], 1 - batch[:, :1]], dim=1).transpose(-1, -2)


@pytest.mark.parametrize(("segmenter", "shape", "message"), [
    (CollapsesDepth(), (1, 6, 8, 8), "the segmenter returns shape (16, 2, 8, 8) for an input batch of shape "
                                     "(16, 1, 6, 8, 8); expected logits (B, K, D, H, W) = (16, 2 (or 1), 6, 8, 8)"),
    (SwapsHeightAndWidth(), (1, 3, 4, 6),
     "height and width swapped: return (B, K, D, H, W), not (B, K, D, W, H)"),
])
def test_a_segmenter_output_of_another_shape_names_the_volume_layout(segmenter, shape, message):
    smoother = SmoothedSegmenter(segmenter, 2, 0.1, batch_size=16, device="cpu")
    with pytest.raises(ValueError) as info:
        smoother.certify(torch.full(shape, 0.5), 1, 20, generator=torch.Generator().manual_seed(0))
    assert message in str(info.value)


def test_a_segmenter_that_returns_no_tensor_names_the_volume_layout():
    class ReturnsDict(torch.nn.Module):
        def forward(self, batch):
            return {"out": batch}

    with pytest.raises(TypeError, match=r"must return a logits tensor \(B, K, D, H, W\), got dict"):
        SmoothedSegmenter(ReturnsDict(), 2, 0.1, device="cpu").certify(torch.full((1, 2, 4, 4), 0.5), 1, 10)


def test_metrics_on_a_volume_count_only_the_real_voxels():
    """Hand-checked: a (2, 2, 3) volume whose last column is padding (labels there are wrong on purpose)."""
    target = np.array([[[1, 1, 0], [0, 0, 0]], [[1, 0, 0], [2, 2, 0]]])
    labels = np.array([[[1, ABSTAIN, 1], [0, 0, 1]], [[1, 0, 2], [2, 0, 2]]])
    valid = np.ones(target.shape, dtype=bool)
    valid[..., 2] = False
    scores = segmentation_scores(labels, target, 3, valid)
    # real voxels: class 0: target 3, predicted 4, TP 3 -> Dice 6 / 7; class 1: target 3 (one abstained),
    # predicted 2, TP 2 -> Dice 4 / 5; class 2: target 2, predicted 1, TP 1 -> Dice 2 / 3; 1 of 8 abstained
    assert scores["dice"] == pytest.approx([6 / 7, 4 / 5, 2 / 3])
    assert scores["abstain"] == pytest.approx(1 / 8)
    everything = segmentation_scores(labels, target, 3)
    assert everything["dice"][1] == pytest.approx(4 / 7)  # the padding's wrong labels count without valid
    with pytest.raises(ValueError, match="valid must be a bool mask"):
        segmentation_scores(labels, target, 3, valid[0])


def test_a_study_run_scores_a_padded_volume_on_its_own_voxels_only():
    """record_image (every certification run's rows) scores a volume dataset's items on ``real_voxels``:
    wrong labels on the padding change nothing."""
    from medcert_core.study.runs.run import CertificationRun, ShardResult, plain, record_image, scored_pixels
    from medcert_core.study.settings import DataSpec, TrainingSpec

    target = torch.zeros(4, 5, 6, dtype=torch.int64)
    target[1:3, 1:3, 1:3] = 1
    real = torch.zeros(4, 5, 6, dtype=torch.bool)
    real[:3, :4, :5] = True

    class Padded:
        ids = ["case"]

        def __getitem__(self, index):
            return torch.zeros(1, 4, 5, 6), target

        def real_voxels(self, index):
            return real

    labels = target.clone()
    labels[~real] = 1  # every padding voxel labelled as the class
    run = CertificationRun(DataSpec("hippocampus", None, (4, 5, 6)), TrainingSpec(), "unet", plain(), 0.0)
    result = ShardResult({}, {}, ["background", "organ"])
    record_image(result, run, 0, Padded(), labels, None, 0.1)
    organ = next(row for row in result.rows[0] if row["class_name"] == "organ")
    assert organ["dice"] == 1.0
    assert scored_pixels([None], 0) is None  # an image dataset: every pixel
