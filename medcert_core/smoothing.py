"""Randomized smoothing of a segmenter: sampling, streamed counting, certification.

``SmoothedSegmenter`` draws independent Gaussian noise for every sample (one generator call per
draw, so the draws do not depend on the batch size), passes each noisy copy through the optional
denoiser and the segmenter under ``torch.inference_mode``, and accumulates on the device the class
histograms of the n0 selection draws and of the n estimation draws (the agreement count of a pixel
is the estimation histogram at its selected class). The full (n0 + n, H, W) sample tensor is never
kept, and nothing is read back to the host until an image's draws are all counted. Spatial dimensions
are generic: a volume (C, D, H, W) with logits (B, K, D, H, W) goes through the same sampling,
counting and Holm step as an image (C, H, W) with logits (B, K, H, W), noise i.i.d. over every voxel. Everything
after the noise, ``segmenter(denoiser(.))``, is one deterministic function, so the certificate
holds for any plugged-in models.

How that function is computed is a choice of speed, never of soundness (see DESIGN.md): autocast
``precision`` (fp32 | bf16 | fp16 | auto, lowering only the networks' matmul/conv-class operations;
``auto``: bf16 where the device runs it natively, see :mod:`medcert_core.devices`),
``channels_last``, ``torch.compile`` and the batch size ("auto": the largest that fits the free
GPU memory; an out-of-memory error halves it and redoes that batch with the same noise). The
noise, x + delta, the counts and the statistics stay in fp32 / int64 / fp64 outside autocast; a
NaN or infinite logit is an error, never a class.

Both modules are put in eval mode at every call: a BatchNorm in train mode would normalise each
batch by its own statistics and make the draws of one batch depend on each other, which breaks
the binomial test. A denoiser that samples (multi-step DDPM, ``denoiser.stochastic``) gets one
generator per draw, seeded from the run's generator right after that draw's noise, so a seeded
certificate is identical at any batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from medcert_core.devices import autocast, check_precision, resolve_device, resolve_precision
from medcert_core.sequential import SequentialCertificate, certify_sequentially, check_looks, default_looks

SEED_RANGE = 2**62  # per-draw seeds for a stochastic denoiser are drawn in [0, SEED_RANGE)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DRAW_BATCH = 32  # noisy draws per forward pass: the batch size of a run (Execution), the scripts' default
CPU_AUTO_BATCH = DRAW_BATCH  # batch size "auto" on a CPU: memory is rarely the limit there
SMOOTHER_BATCH = 16  # SmoothedSegmenter's own default (not DRAW_BATCH: test_smoothing pins a 16-draw first batch)
AUTO_MEMORY_SHARE = 0.8  # batch size "auto" on a GPU plans for this share of the free memory
INPUT_DIMS = (3, 4)  # x: an image (C, H, W) or a volume (C, D, H, W); every step after this check is generic


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
    """D(batch) for a (B, C, *spatial) batch (the batch itself without a denoiser); a stochastic denoiser
    gets its per-draw generators."""
    if denoiser is None:
        return batch
    clean = denoiser(batch, generators=generators) if is_stochastic(denoiser) else denoiser(batch)
    check_denoiser_output(clean, tuple(batch.shape))
    return clean


def check_batch_size(batch_size: int | str) -> None:
    """batch_size: an int >= 1 or "auto"."""
    if batch_size == "auto":
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be an int >= 1 or "auto", got {batch_size!r}')


def compile_mode(compile: bool | str) -> str | None:
    """The ``torch.compile`` mode of a ``compile`` option (None: eager); True means "default"."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {list(COMPILE_MODES)}, got {compile!r}")
    return str(compile)


@dataclass(frozen=True)
class Execution:
    """How the base model f(D(.)) is run, beyond its precision: the batch size ("auto" or an int),
    channels_last and torch.compile. They change only the order of floating-point sums (never the
    noise): recorded in a run's metadata, not in its hash. The precision changes the base model
    itself and is part of a run's parameters."""

    batch_size: int | str = DRAW_BATCH
    channels_last: bool = False
    compile: bool | str = False

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        compile_mode(self.compile)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of SmoothedSegmenter."""
        return dataclasses.asdict(self)


def replay(generators: list[torch.Generator] | None) -> list[torch.Generator] | None:
    """Fresh copies of per-draw generators, at their seeds: a redone batch draws the same noise."""
    if generators is None:
        return None
    return [torch.Generator(device=g.device).manual_seed(g.initial_seed()) for g in generators]


def spatial_names(count: int) -> tuple[str, ...]:
    """Names of ``count`` spatial dimensions for messages: 2 -> (H, W), 3 -> (D, H, W)."""
    return ("D", "H", "W")[3 - count:] if count <= 3 else (*(f"S{axis}" for axis in range(count - 2)), "H", "W")


def layout(*leading: str, spatial: int) -> str:
    """A tensor layout for messages: layout("B", "K", spatial=3) -> "(B, K, D, H, W)"."""
    return f"({', '.join((*leading, *spatial_names(spatial)))})"


def channels_last_format(dims: int) -> torch.memory_format:
    """The channels-last memory format of a tensor with ``dims`` dimensions: 4 (B, C, H, W) or 5 (B, C, D, H, W)."""
    return torch.channels_last_3d if dims == 5 else torch.channels_last


def to_channels_last(module: torch.nn.Module) -> None:
    """Put a module's 4-D and 5-D parameters and buffers (2D and 3D convolutions) in channels-last format, in place."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.dim() in (4, 5):
            tensor.data = tensor.data.contiguous(memory_format=channels_last_format(tensor.dim()))


def _wanted_logits(batch: int, spatial: tuple[int, ...], num_classes: int | None) -> str:
    """The logits shape a batch asks for, for messages: "(B, K, H, W) = (16, 2 (or 1), 64, 64)"."""
    expected_k = "K" if num_classes is None else (f"{num_classes}" if num_classes != 2 else "2 (or 1)")
    return f"{layout('B', 'K', spatial=len(spatial))} = ({', '.join(map(str, (batch, expected_k, *spatial)))})"


def check_segmenter_output(logits: Any, batch_shape: tuple[int, ...], num_classes: int | None) -> None:
    """Refuse a segmenter output that is not logits (B, K, *spatial) for an input batch (B, C, *spatial), e.g.
    (B, K, H, W) for images and (B, K, D, H, W) for volumes: K the declared number of classes (or 1 for a
    binary segmenter with num_classes 2), the spatial size the input's. A head at another resolution would
    otherwise be counted against the wrong pixels."""
    batch, spatial = batch_shape[0], tuple(batch_shape[2:])
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the segmenter must return a logits tensor {layout('B', 'K', spatial=len(spatial))}, got "
                        f"{type(logits).__name__}; wrap a model that returns a dict or tuple so that it returns the logits")
    shape = tuple(logits.shape)
    if logits.dim() != len(batch_shape) or shape[0] != batch:
        raise ValueError(f"the segmenter returns shape {shape} for an input batch of shape {tuple(batch_shape)}; "
                         f"expected logits {_wanted_logits(batch, spatial, num_classes)}")
    if shape[2:] != spatial:
        expected = layout("B", "K", spatial=len(spatial))
        swapped = (*spatial[:-2], spatial[-1], spatial[-2])
        transposed = layout("B", "K", *spatial_names(len(spatial))[:-2], "W", "H", spatial=0)
        hint = (f"height and width swapped: return {expected}, not {transposed}" if shape[2:] == swapped
                else "upsample the logits to the input's size inside the model (e.g. F.interpolate at the end "
                     "of forward)")
        raise ValueError(f"the segmenter returns logits of shape {shape} for an input batch of shape "
                         f"{tuple(batch_shape)}: expected {_wanted_logits(batch, spatial, num_classes)}; {hint}. "
                         "Certifying them would report the output cells as the wrong pixels")
    channels = shape[1]
    if num_classes is not None and channels != num_classes and not (channels == 1 and num_classes == 2):
        raise ValueError(
            f"the segmenter returns {channels} channels but num_classes = {num_classes} (logits of shape {shape}); "
            "expected num_classes logits, or 1 logit for a binary segmenter with num_classes = 2"
        )


def check_denoiser_output(clean: Any, noisy_shape: tuple[int, ...]) -> None:
    """Refuse a denoiser output whose shape is not its input's (B, C, *spatial)."""
    if not isinstance(clean, torch.Tensor) or tuple(clean.shape) != tuple(noisy_shape):
        shape = tuple(clean.shape) if isinstance(clean, torch.Tensor) else type(clean).__name__
        raise ValueError(f"the denoiser returns {shape} for a noisy batch of shape {tuple(noisy_shape)}; a denoiser "
                         "must return its input's shape (resize back to the input's size inside it)")


def classes_from_logits(logits: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Class ids (B, *spatial) int64 from logits (B, K, *spatial), e.g. (B, K, H, W) or (B, K, D, H, W), or from
    one binary logit (B, 1, *spatial); with ``num_classes``, K must equal it (or be 1 for num_classes 2)."""
    channels = logits.shape[1]
    if channels == 1 and num_classes in (None, 2):
        return (logits[:, 0] > 0).long()
    if num_classes is not None and channels != num_classes:
        raise ValueError(
            f"the segmenter returns {channels} channels but num_classes = {num_classes}; "
            "expected num_classes logits, or 1 logit for a binary segmenter with num_classes = 2"
        )
    return logits.argmax(1)


def selected_and_count(selection: torch.Tensor, estimation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, *spatial) selection and estimation histograms -> the selected class (mode of the selection draws)
    and how many estimation draws give it, both (*spatial) int64 ((H, W) for an image, (D, H, W) for a volume)."""
    selected = selection.argmax(0)
    return selected, agreement(estimation, selected)


def agreement(histogram: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """(K, *spatial) class counts -> (*spatial) how many of those draws gave ``selected`` (*spatial)."""
    return histogram.gather(0, selected.unsqueeze(0))[0]


def add_to_histograms(histograms: list[torch.Tensor], starts: list[int], ends: list[int], first: int,
                      classes: torch.Tensor) -> None:
    """Add a batch of class ids (b, *spatial), draws first .. first + b - 1, to the (K, number of pixels or
    voxels) histograms of the streams [start, end) it overlaps."""
    flat = classes.reshape(classes.shape[0], -1)
    last = first + flat.shape[0]
    for histogram, start, end in zip(histograms, starts, ends):
        lo, hi = max(start, first) - first, min(end, last) - first
        if lo < hi:
            histogram.scatter_add_(0, flat[lo:hi], torch.ones_like(flat[lo:hi]))


class SmoothedSegmenter:
    """A segmenter smoothed with N(0, sigma^2 I) noise on its [0, 1]-scaled input.

    segmenter: module mapping (B, C, H, W) to logits (B, K, H, W) with K = num_classes, or to
        (B, 1, H, W) for a binary segmenter (class 1 where sigmoid(logit) > 0.5) with num_classes 2;
        for volumes (B, C, D, H, W) to (B, K, D, H, W) (a 2D model applied slice by slice is one).
    denoiser: optional module mapping a noisy (B, C, *spatial) batch to its clean estimate.
    batch_size: noisy draws per forward pass (default SMOOTHER_BATCH), or "auto" (on a GPU the largest
        that fits the free memory, on a CPU CPU_AUTO_BATCH); on a GPU out-of-memory error the batch is
        halved and redone with the same noise, so no draw is lost and a seeded certificate does not change.
    precision: "fp32" | "bf16" | "fp16": autocast of the networks only (prefer bf16: fp16
        diffusion models are known to overflow, which ends the certification with an error).
    channels_last: run the networks (modules and inputs) in channels_last memory format.
    compile: ``torch.compile`` f(D(.)) once, reused for every image (True or a mode such as
        "max-autotune"); the last, smaller batch of an image is padded to the batch size, and the
        padding's outputs discarded, so it never triggers a recompilation.
    The modules are moved to ``device`` (and to channels_last) in place.
    """

    def __init__(
        self,
        segmenter: torch.nn.Module,
        num_classes: int,
        sigma: float,
        denoiser: torch.nn.Module | None = None,
        batch_size: int | str = SMOOTHER_BATCH,
        device: str | torch.device | None = "auto",
        *,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (use 2 for a one-logit binary segmenter), got {num_classes}")
        check_sigma(sigma)
        check_batch_size(batch_size)
        check_precision(precision)
        mode = compile_mode(compile)
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
        self.batch_size = batch_size
        self.precision = resolve_precision(precision, self.device)  # auto -> what this device runs natively
        self.channels_last = bool(channels_last)
        self.compile = mode
        if self.channels_last:
            for module in self._modules():
                to_channels_last(module)
        self._forward: Callable[..., torch.Tensor] = (
            self._logits if mode is None else torch.compile(self._logits, mode=mode)
        )
        self._working_batch: int | None = None if batch_size == "auto" else int(batch_size)
        self._warned_train_mode = False
        self._warned_out_of_memory = False
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.eval_modules(warn=False)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.segmenter] + ([self.denoiser] if self.denoiser is not None else [])

    def eval_modules(self, warn: bool = True) -> None:
        """Put the segmenter and denoiser in eval mode; warn (once) if a submodule was training."""
        training = [type(module).__name__ for root in self._modules() for module in root.modules() if module.training]
        for module in self._modules():
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

    def _logits(self, batch: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """fp32 logits of f(D(batch)), the networks under autocast at ``precision`` (compiled when asked)."""
        with autocast(self.device, self.precision):
            logits = self.segmenter(denoise(self.denoiser, batch, generators))
        check_segmenter_output(logits, tuple(batch.shape), self.num_classes)
        return logits.float()

    def base_classes(self, batch: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Class ids (B, *spatial) int64 of the base model f(D(batch)) for a (B, C, *spatial) batch.

        generators: one per draw, for a stochastic denoiser.
        """
        if self.channels_last:
            batch = batch.contiguous(memory_format=channels_last_format(batch.dim()))
        logits = self._forward(batch, generators)
        self._all_finite &= torch.isfinite(logits).all()  # on the device: checked once per image, no sync here
        return classes_from_logits(logits, self.num_classes)

    def _padded_classes(self, noisy: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        """base_classes of a batch; under compile a smaller batch is padded to the working batch size
        (copies of its last draw, outputs discarded) so the compiled graph keeps one shape."""
        size = noisy.shape[0]
        padding = self._working_batch - size if self.compile is not None else 0
        if padding > 0:
            noisy = torch.cat([noisy, noisy[-1:].expand(padding, *noisy.shape[1:])])
            if generators is not None:
                generators = generators + replay(generators[-1:] * padding)
        return self.base_classes(noisy, generators)[:size]

    def _classes_of_draws(self, noisy: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        """Class ids (B, *spatial) of noisy draws (B, C, *spatial), in batches of the working size; an
        out-of-memory error halves it and redoes the failed batch with the same noise."""
        done, chunks, retried = 0, [], False
        while done < noisy.shape[0]:
            size = min(self._working_batch, noisy.shape[0] - done)
            part = None if generators is None else generators[done:done + size]
            if retried and part is not None:
                part = replay(part)  # a failed try consumed some of them: start them again from their seeds
            try:
                chunks.append(self._padded_classes(noisy[done:done + size], part))
            except torch.OutOfMemoryError:
                if self._working_batch == 1:
                    raise
                self._halve_batch()
                retried = True
                continue
            done += size
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _halve_batch(self) -> None:
        self._working_batch = max(1, self._working_batch // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self._warned_out_of_memory:
            self._warned_out_of_memory = True
            warnings.warn(f"out of memory: batch size lowered to {self._working_batch}; the failed batch was "
                          "redone with the same noise", stacklevel=5)

    def _auto_batch(self, x: torch.Tensor, total: int) -> int:
        """Batch size "auto": on a GPU, the draws that fit AUTO_MEMORY_SHARE of the free memory, by the
        peak memory of one probe draw (an overestimate per draw); on a CPU, CPU_AUTO_BATCH."""
        if self.device.type != "cuda":
            return min(CPU_AUTO_BATCH, total)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        generators = [torch.Generator(device=self.device).manual_seed(0)] if self.stochastic_denoiser else None
        with torch.inference_mode():
            self._logits(x.unsqueeze(0), generators)  # eager: a compiled probe would compile for batch 1
        per_draw = max(1, torch.cuda.max_memory_allocated(self.device) - before)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(total, int(AUTO_MEMORY_SHARE * free / per_draw)))

    def draw_batches(self, x: torch.Tensor, total: int, generator: torch.Generator, progress: bool = False,
                     desc: str = "") -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index of its first draw, class ids (b, *spatial)) for ``total`` independent noisy copies of x
        (C, *spatial) on the device: the one sampling path of certificates, predictions and attacks, for
        images (C, H, W) and volumes (C, D, H, W) alike."""
        if self._working_batch is None:
            self._working_batch = self._auto_batch(x, total)
        done = 0
        with torch.inference_mode(), tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
            while done < total:
                size = min(self._working_batch, total - done)
                noise, generators = draw_noise(tuple(x.shape), size, generator, self.device, self.stochastic_denoiser,
                                               x.dtype)
                yield done, self._classes_of_draws(x.unsqueeze(0) + self.sigma * noise, generators)
                done += size
                bar.update(size)

    def class_histograms(self, x: torch.Tensor, draws: list[int], generator: torch.Generator, progress: bool = False,
                         desc: str = "sampling") -> list[torch.Tensor]:
        """Per-pixel (per-voxel) class counts (K, *spatial) int64 of consecutive streams of draws, e.g. [n0, n]
        -> [selection histogram, estimation histogram]; one stream of batches across them."""
        spatial = tuple(x.shape[1:])
        histograms = [torch.zeros((self.num_classes, math.prod(spatial)), dtype=torch.int64, device=self.device)
                      for _ in draws]
        ends = torch.tensor(draws).cumsum(0).tolist()
        starts = [end - count for end, count in zip(ends, draws)]
        for first, classes in self.draw_batches(x, ends[-1], generator, progress, desc):
            add_to_histograms(histograms, starts, ends, first, classes)
        return [histogram.reshape(self.num_classes, *spatial) for histogram in histograms]

    def segment_denoised(self, denoised: torch.Tensor, batch_shape: tuple[int, ...]) -> torch.Tensor:
        """Class ids (B, *spatial) of the segmenter alone on an already denoised batch (the second half of
        :meth:`base_classes`, for :func:`certify_segmenters`)."""
        with autocast(self.device, self.precision):  # denoised as the denoiser returned it, as in base_classes
            logits = self.segmenter(denoised)
        check_segmenter_output(logits, batch_shape, self.num_classes)
        logits = logits.float()
        self._all_finite &= torch.isfinite(logits).all()
        return classes_from_logits(logits, self.num_classes)

    def _check_finite(self) -> None:
        """A NaN or inf logit would be counted as some class: refuse the certificate instead."""
        if not bool(self._all_finite):
            raise FloatingPointError(
                "the base model f(D(x + delta)) produced NaN or infinite logits on some draws; a certificate "
                "would count them as a class. Check the models, or use precision 'bf16' or 'fp32' "
                "(fp16 diffusion models are known to overflow)"
            )

    def _prepare(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Generator]:
        """Check x, put the modules in eval mode, let the denoiser check the input it will see."""
        if not isinstance(x, torch.Tensor) or x.dim() not in INPUT_DIMS or not x.dtype.is_floating_point:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"x must be a float tensor of shape (C, H, W) (an image) or (C, D, H, W) (a volume) "
                             f"in [0, 1], got {shape}")
        low, high = float(x.min()), float(x.max())
        if not (0.0 <= low and high <= 1.0):  # also refuses NaN
            raise ValueError(f"x must lie in [0, 1] (sigma and the radius are in that scale), got values in "
                             f"[{low:g}, {high:g}]; scale the image to [0, 1] and put any mean/std normalisation "
                             "inside the segmenter, after the noise")
        self.eval_modules()
        self._all_finite = torch.ones((), dtype=torch.bool, device=self.device)
        check_input = getattr(self.denoiser, "check_input", None)
        if check_input is not None:
            check_input(tuple(x.shape))  # fails here, before any draw, not mid-certification
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.seed()
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # noise and x + delta >= fp32
        return x.to(self.device, dtype), generator

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
        """Certify every pixel of one image x (C, H, W), or every voxel of one volume x (C, D, H, W), in [0, 1]
        from n0 selection and n estimation draws (Holm over all of its pixels or voxels).

        Pass a seeded ``torch.Generator`` (ideally on ``self.device``) for a reproducible run;
        without one, a fresh random seed is used.
        """
        check_tau(tau)
        check_alpha(alpha)
        check_correction(correction)
        selected, counts = self.counts(x, n0, n, generator=generator, progress=progress)
        return certify_counts(
            selected, counts, n, sigma=self.sigma, tau=tau, alpha=alpha, correction=correction, n0=n0,
            num_classes=self.num_classes,
        )

    def counts(self, x: torch.Tensor, n0: int, n: int, *, generator: torch.Generator | None = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling half of ``certify``: the selected class (mode of n0 draws) and how many of n
        further draws give it, both (*spatial) int64 on the device. ``certify_counts`` (or
        ``certify_counts_over_taus``) turns them into certificates."""
        check_draws("n0", n0)
        check_draws("n", n)
        x, generator = self._prepare(x, generator)
        selected, counts = selected_and_count(*self.class_histograms(x, [n0, n], generator, progress))
        self._check_finite()
        return selected, counts

    def certify_sequential(self, x: torch.Tensor, n0: int, n_max: int, *, tau: float = 0.75, alpha: float = 0.001,
                           looks: Sequence[int] | None = None, stop_undecided: float = 0.0,
                           generator: torch.Generator | None = None, progress: bool = False) -> SequentialCertificate:
        """Certify x (C, *spatial) drawing estimation draws only until every pixel is decided (or n_max):
        anytime-valid p-values and Holm at the stopping time (:mod:`medcert_core.sequential`).

        looks: the draw counts at which to test (default ``default_looks(n_max)``); stop_undecided:
        stop once at most this fraction of pixels is neither certified nor provably uncertifiable.
        The n0 selection draws come first, then the estimation draws, from the one generator.
        """
        check_draws("n0", n0)
        check_draws("n_max", n_max)
        looks = check_looks(default_looks(n_max) if looks is None else looks, n_max)
        x, generator = self._prepare(x, generator)
        selected = self._selected(x, n0, generator, progress)
        result = certify_sequentially(selected.cpu().numpy(), self._agreement_stream(x, selected, looks, generator,
                                                                                     progress),
                                      looks, n_max=n_max, sigma=self.sigma, tau=tau, alpha=alpha, n0=n0,
                                      stop_undecided=stop_undecided)
        self._check_finite()
        certificate = dataclasses.replace(result.certificate,  # on the device, as certify's
                                          labels=torch.as_tensor(result.certificate.labels, device=self.device),
                                          pvalues=torch.as_tensor(result.certificate.pvalues, device=self.device))
        return dataclasses.replace(result, certificate=certificate)

    def agreement_path(self, x: torch.Tensor, n0: int, checkpoints: Sequence[int], *,
                       generator: torch.Generator | None = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The draws of :meth:`certify_sequential` taken to the last checkpoint, for studying stopping rules
        offline: the selected class (*spatial) and, per checkpoint t, how many of the first t estimation
        draws gave it, (len(checkpoints), *spatial) int64. ``sequential.replay_sequential`` and
        ``certify_counts`` turn them into the sequential and fixed-n certificates of any n_max <= the last
        checkpoint whose looks are among the checkpoints, each what a direct run with this seed gives."""
        check_draws("n0", n0)
        checkpoints = check_looks(checkpoints, int(checkpoints[-1]) if len(checkpoints) else 0)
        x, generator = self._prepare(x, generator)
        selected = self._selected(x, n0, generator, progress)
        increments = list(self._agreement_stream(x, selected, checkpoints, generator, progress))
        self._check_finite()
        return selected.cpu().numpy(), np.cumsum(np.stack(increments), axis=0)

    def _selected(self, x: torch.Tensor, n0: int, generator: torch.Generator, progress: bool) -> torch.Tensor:
        """The class (*spatial) most of n0 draws give: the selection of a sequential certificate."""
        (selection,) = self.class_histograms(x, [n0], generator, progress, "selection")
        return selection.argmax(0)

    def _agreement_stream(self, x: torch.Tensor, selected: torch.Tensor, looks: Sequence[int],
                          generator: torch.Generator, progress: bool) -> Iterator[np.ndarray]:
        """Per look, the (*spatial) number of the draws since the previous look that gave ``selected``:
        drawn lazily, so a consumer that stops early draws no more."""
        previous = 0
        for look in looks:
            (histogram,) = self.class_histograms(x, [look - previous], generator, progress, f"draws to {look}")
            previous = look
            yield agreement(histogram, selected).cpu().numpy()

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
        """Smoothed prediction (*spatial) int64 of x (C, *spatial): top class per pixel (voxel) or ABSTAIN.

        A pixel keeps its most frequent class of n draws when a two-sided binomial test of its
        count against the runner-up's is significant after ``correction`` over all pixels.
        """
        check_draws("n", n)
        check_alpha(alpha)
        check_correction(correction)
        x, generator = self._prepare(x, generator)
        (histogram,) = self.class_histograms(x, [n], generator, progress, "prediction")
        top = histogram.topk(2, dim=0)
        self._check_finite()
        return predict_counts(top.indices[0], top.values[0], top.values[1], n, alpha=alpha, correction=correction)


def segmenters_counts(segmenters: Mapping[str, torch.nn.Module], x: torch.Tensor, n0: int, n: int, *,
                      num_classes: int, sigma: float, denoiser: torch.nn.Module | None = None,
                      generator: torch.Generator | None = None, batch_size: int | str = SMOOTHER_BATCH,
                      device: str | torch.device | None = "auto", precision: str = "fp32",
                      channels_last: bool = False, progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The sampling half of :func:`certify_segmenters`: name -> (selected class, count), each (*spatial) int64,
    exactly what ``SmoothedSegmenter(segmenter, ..., denoiser).counts`` gives that segmenter alone with the
    same generator and batch size. Each batch of draws is made and denoised once, then segmented by
    every segmenter; only one batch of draws is held at a time (no torch.compile or out-of-memory retry
    on this path)."""
    if not segmenters:
        raise ValueError("segmenters must name at least one segmenter (a mapping name -> module)")
    check_draws("n0", n0)
    check_draws("n", n)
    smoothers = {name: SmoothedSegmenter(module, num_classes, sigma, denoiser=denoiser, batch_size=batch_size,
                                         device=device, precision=precision, channels_last=channels_last)
                 for name, module in segmenters.items()}
    lead, *others = smoothers.values()
    x, generator = lead._prepare(x, generator)
    for smoother in others:
        smoother._prepare(x, generator)  # eval mode, finiteness flag; the generator is not consumed
    if lead._working_batch is None:
        lead._working_batch = lead._auto_batch(x, n0 + n)
    spatial = tuple(x.shape[1:])
    histograms = {name: [torch.zeros((num_classes, math.prod(spatial)), dtype=torch.int64, device=lead.device)
                         for _ in range(2)] for name in smoothers}
    done, total = 0, n0 + n
    with torch.inference_mode(), tqdm(total=total, desc="sampling", disable=not progress, leave=False) as bar:
        while done < total:
            size = min(lead._working_batch, total - done)
            noise, generators = draw_noise(tuple(x.shape), size, generator, lead.device, lead.stochastic_denoiser,
                                           x.dtype)
            noisy = x.unsqueeze(0) + lead.sigma * noise
            if channels_last:
                noisy = noisy.contiguous(memory_format=channels_last_format(noisy.dim()))
            with autocast(lead.device, precision):
                denoised = denoise(lead.denoiser, noisy, generators)
            for index, (name, smoother) in enumerate(smoothers.items()):
                # a segmenter may edit its input in place: each but the last segments its own copy
                mine = denoised if index == len(smoothers) - 1 else denoised.clone()
                classes = smoother.segment_denoised(mine, tuple(noisy.shape))
                add_to_histograms(histograms[name], [0, n0], [n0, total], done, classes)
            done += size
            bar.update(size)
    results = {}
    for name, smoother in smoothers.items():
        smoother._check_finite()
        results[name] = selected_and_count(*(histogram.reshape(num_classes, *spatial)
                                             for histogram in histograms[name]))
    return results


def certify_segmenters(segmenters: Mapping[str, torch.nn.Module], x: torch.Tensor, n0: int, n: int, *,
                       num_classes: int, sigma: float, denoiser: torch.nn.Module | None = None, tau: float = 0.75,
                       alpha: float = 0.001, correction: Correction = "holm", generator: torch.Generator | None = None,
                       batch_size: int | str = SMOOTHER_BATCH, device: str | torch.device | None = "auto",
                       precision: str = "fp32", channels_last: bool = False,
                       progress: bool = False) -> dict[str, Certificate]:
    """Certify one image x (C, H, W) or volume x (C, D, H, W) in [0, 1] with several segmenters (name -> module,
    same classes)
    behind one denoiser, from one set of noisy and denoised draws: name -> Certificate, each identical
    (labels, p-values, counts) to ``SmoothedSegmenter(segmenter, num_classes, sigma, denoiser,
    batch_size).certify(x, n0, n, generator=<the same seed>)``. The denoiser runs once per batch
    of draws instead of once per segmenter; memory holds one batch of draws at a time. Each certificate
    holds at level alpha on its own (the segmenters share the draws, so their errors are not independent).
    """
    check_tau(tau)
    check_alpha(alpha)
    check_correction(correction)
    counts = segmenters_counts(segmenters, x, n0, n, num_classes=num_classes, sigma=sigma, denoiser=denoiser,
                               generator=generator, batch_size=batch_size, device=device, precision=precision,
                               channels_last=channels_last, progress=progress)
    return {name: certify_counts(selected, count, n, sigma=float(sigma), tau=tau, alpha=alpha, correction=correction,
                                 n0=n0, num_classes=num_classes) for name, (selected, count) in counts.items()}
