"""Randomized smoothing of a segmenter: sampling, streamed counting, certification.

``SmoothedSegmenter`` draws independent Gaussian noise for every sample (one generator call per
draw, so the draws do not depend on the batch size), passes each noisy copy through the optional
denoiser and the segmenter under ``torch.inference_mode``, and accumulates on the device the class
histogram of the n0 selection draws and the agreement counts of the n estimation draws. The full
(n0 + n, H, W) sample tensor is never kept. Everything after the noise, ``segmenter(denoiser(.))``,
is one deterministic function, so the certificate holds for any plugged-in models.

Both modules are put in eval mode at every call: a BatchNorm in train mode would normalise each
batch by its own statistics and make the draws of one batch depend on each other, which breaks
the binomial test. A denoiser that samples (multi-step DDPM, ``denoiser.stochastic``) gets one
generator per draw, seeded from the run's generator right after that draw's noise, so a seeded
certificate is identical at any batch size.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator

import torch
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.certify import (
    Certificate,
    Correction,
    check_alpha,
    check_correction,
    check_draws,
    check_sigma,
    check_tau,
    certify_counts,
    predict_counts,
)

SEED_RANGE = 2**62  # per-draw seeds for a stochastic denoiser are drawn in [0, SEED_RANGE)


def image_seed(seed: int, *keys: object) -> int:
    """A seed in [0, SEED_RANGE) from a run seed and keys (image id, stream, ...): independent streams
    per image, so numbers do not depend on image order, batch size or sharding."""
    digest = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_RANGE


def draw_noise(shape: tuple[int, ...], count: int, generator: torch.Generator, device: torch.device,
               stochastic_denoiser: bool = False,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Generator] | None]:
    """``count`` independent N(0, I) draws of ``shape`` on ``device``: (count, *shape), one generator call per
    draw; with ``stochastic_denoiser``, also one generator per draw (seeded from ``generator`` right after
    that draw's noise) for the denoiser's own noise. The sequence of calls is the same at any batch size."""
    noise = torch.empty((count, *shape), device=generator.device, dtype=dtype)
    generators = [] if stochastic_denoiser else None
    for draw in noise:
        torch.randn(shape, generator=generator, out=draw)
        if generators is not None:
            seed = int(torch.randint(SEED_RANGE, (1,), generator=generator, device=generator.device))
            generators.append(torch.Generator(device=device).manual_seed(seed))
    return noise.to(device), generators


def is_stochastic(denoiser: torch.nn.Module | None) -> bool:
    """Whether a denoiser draws noise of its own (multi-step DDPM): it then gets one generator per draw."""
    return bool(getattr(denoiser, "stochastic", False))


def denoise(denoiser: torch.nn.Module | None, batch: torch.Tensor,
            generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """D(batch) for a (B, C, H, W) batch (the batch itself without a denoiser); a stochastic denoiser
    gets its per-draw generators."""
    if denoiser is None:
        return batch
    return denoiser(batch, generators=generators) if is_stochastic(denoiser) else denoiser(batch)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' or None -> CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SmoothedSegmenter:
    """A segmenter smoothed with N(0, sigma^2 I) noise on its [0, 1]-scaled input.

    segmenter: module mapping (B, C, H, W) to logits (B, K, H, W) with K = num_classes, or to
        (B, 1, H, W) for a binary segmenter (class 1 where sigmoid(logit) > 0.5) with num_classes 2.
    denoiser: optional module mapping a noisy (B, C, H, W) batch to its clean estimate.
    """

    def __init__(
        self,
        segmenter: torch.nn.Module,
        num_classes: int,
        sigma: float,
        denoiser: torch.nn.Module | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = "auto",
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (use 2 for a one-logit binary segmenter), got {num_classes}")
        check_sigma(sigma)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        denoiser_sigma = getattr(denoiser, "sigma", None)
        if denoiser_sigma is not None and abs(float(denoiser_sigma) - float(sigma)) > 1e-9:
            raise ValueError(
                f"the denoiser was built for sigma = {denoiser_sigma:g} but the smoother adds sigma = {sigma:g}; "
                f"build the denoiser for sigma = {sigma:g} (e.g. load_denoiser(spec, sigma={sigma:g}))"
            )
        self.device = resolve_device(device)
        self.segmenter = segmenter.to(self.device)
        self.denoiser = denoiser.to(self.device) if denoiser is not None else None
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self._warned_train_mode = False
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.eval_modules(warn=False)

    def eval_modules(self, warn: bool = True) -> None:
        """Put the segmenter and denoiser in eval mode; warn (once) if a submodule was training."""
        modules = [self.segmenter] + ([self.denoiser] if self.denoiser is not None else [])
        training = [type(module).__name__ for root in modules for module in root.modules() if module.training]
        for module in modules:
            module.eval()
        if training and warn and not self._warned_train_mode:
            self._warned_train_mode = True
            warnings.warn(
                f"SmoothedSegmenter put {len(training)} module(s) back in eval mode (e.g. {training[0]}); "
                "in train mode, BatchNorm couples the draws of a batch and the certificate would not hold",
                stacklevel=4,
            )

    @property
    def stochastic_denoiser(self) -> bool:
        """Whether the denoiser draws noise of its own (then it gets one generator per draw)."""
        return is_stochastic(self.denoiser)

    def base_classes(self, batch: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Class ids (B, H, W) int64 of the base model f(D(batch)) for a (B, C, H, W) batch.

        generators: one per draw, for a stochastic denoiser.
        """
        logits = self.segmenter(denoise(self.denoiser, batch, generators))
        self._all_finite &= torch.isfinite(logits).all()  # on the device: checked once per image, no sync here
        channels = logits.shape[1]
        if channels == 1 and self.num_classes == 2:
            return (logits[:, 0] > 0).long()
        if channels != self.num_classes:
            raise ValueError(
                f"the segmenter returns {channels} channels but num_classes = {self.num_classes}; "
                "expected num_classes logits, or 1 logit for a binary segmenter with num_classes = 2"
            )
        return logits.argmax(1)

    def noisy_class_batches(
        self, x: torch.Tensor, num: int, generator: torch.Generator, progress: bool = False, desc: str = ""
    ) -> Iterator[torch.Tensor]:
        """Yield class ids (b, H, W) of the base model on ``num`` independent noisy copies of x."""
        with torch.inference_mode():
            for start in tqdm(range(0, num, self.batch_size), desc=desc, disable=not progress, leave=False):
                size = min(self.batch_size, num - start)
                noise, generators = draw_noise(tuple(x.shape), size, generator, self.device, self.stochastic_denoiser,
                                               x.dtype)
                yield self.base_classes(x.unsqueeze(0) + self.sigma * noise, generators)

    def class_histogram(
        self, x: torch.Tensor, num: int, generator: torch.Generator, progress: bool = False, desc: str = "selection"
    ) -> torch.Tensor:
        """Per-pixel class counts (K, H, W) int64 over ``num`` noisy draws."""
        height, width = x.shape[-2:]
        histogram = torch.zeros((self.num_classes, height * width), dtype=torch.int64, device=self.device)
        for classes in self.noisy_class_batches(x, num, generator, progress, desc):
            flat = classes.reshape(classes.shape[0], -1)
            histogram.scatter_add_(0, flat, torch.ones_like(flat))
        return histogram.reshape(self.num_classes, height, width)

    def agreement_counts(
        self, x: torch.Tensor, selected: torch.Tensor, num: int, generator: torch.Generator, progress: bool = False
    ) -> torch.Tensor:
        """How many of ``num`` noisy draws give the selected class, per pixel: (H, W) int64."""
        counts = torch.zeros(selected.shape, dtype=torch.int64, device=self.device)
        for classes in self.noisy_class_batches(x, num, generator, progress, "estimation"):
            counts += (classes == selected).sum(0)
        return counts

    def _check_finite(self) -> None:
        """A NaN or inf logit would be counted as some class: refuse the certificate instead."""
        if not bool(self._all_finite):
            raise FloatingPointError(
                "the base model f(D(x + delta)) produced NaN or infinite logits on some draws; a certificate "
                "would count them as a class. Check the models (fp16 diffusion models are known to overflow)"
            )

    def _prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Generator]:
        """Check x, put the modules in eval mode, let the denoiser check the input it will see."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"x must be a float tensor of shape (C, H, W) in [0, 1], got {shape}")
        self.eval_modules()
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        check_input = getattr(self.denoiser, "check_input", None)
        if check_input is not None:
            check_input(tuple(x.shape))  # fails here, before any draw, not mid-certification
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.seed()
        return x.to(self.device), generator

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        *,
        tau: float = 0.75,
        alpha: float = 0.001,
        correction: Correction = "holm",
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Certificate:
        """Certify every pixel of one image x (C, H, W) in [0, 1] from n0 selection and n estimation draws.

        Pass a seeded ``torch.Generator`` (ideally on ``self.device``) for a reproducible run;
        without one, a fresh random seed is used.
        """
        check_draws("n0", n0)
        check_draws("n", n)
        check_tau(tau)
        check_alpha(alpha)
        check_correction(correction)
        x, generator = self._prepare(x, generator)
        selected = self.class_histogram(x, n0, generator, progress).argmax(0)
        counts = self.agreement_counts(x, selected, n, generator, progress)
        self._check_finite()
        return certify_counts(
            selected, counts, n, sigma=self.sigma, tau=tau, alpha=alpha, correction=correction, n0=n0,
            num_classes=self.num_classes,
        )

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        *,
        alpha: float = 0.001,
        correction: Correction = "holm",
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Smoothed prediction (H, W) int64 of x (C, H, W): top class per pixel or ABSTAIN.

        A pixel keeps its most frequent class of n draws when a two-sided binomial test of its
        count against the runner-up's is significant after ``correction`` over all pixels.
        """
        check_draws("n", n)
        check_alpha(alpha)
        check_correction(correction)
        x, generator = self._prepare(x, generator)
        top = self.class_histogram(x, n, generator, progress, "prediction").topk(2, dim=0)
        self._check_finite()
        return predict_counts(top.indices[0], top.values[0], top.values[1], n, alpha=alpha, correction=correction)
