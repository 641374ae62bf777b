"""Diffusion denoised smoothing (Carlini et al. 2023) over any diffusers UNet2DModel + scheduler, and over a
3D noise-prediction network for volumes (``VolumeDiffusionUNet``, MONAI's ``DiffusionModelUNet``).

Randomized smoothing adds N(0, sigma^2) noise to x in [0, 1]. A DDPM works in [-1, 1], where that
noise has std 2 sigma; the step t* whose sqrt((1 - abar_t) / abar_t) is nearest to 2 sigma has the
same signal-to-noise ratio, and x_t = sqrt(abar_t*) (2 (x + delta) - 1) is then distributed as
the forward process at t*. One step predicts x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); several
steps follow the DDPM posterior (or DDIM) from t* down to 0; (x0 + 1) / 2 maps back.

Two operations change the noise level before the model sees it, and t* follows them:
- resizing to the model's resolution: with ``shrink="box"`` (the default) a box (area) average for
  integer shrink factors, which keeps the noise white with std sigma / factor, as the DDPM saw it
  in training; otherwise (and always with ``shrink="bilinear"``) an antialiased bilinear filter
  (weights w per output pixel scale the noise std by sqrt(sum w^2), root mean square over output
  pixels; neighbouring noise values are then correlated);
- averaging 3 channels for a 1-channel model (std / sqrt(3)); a 1-channel image replicated for a
  3-channel model keeps its std.
The result is resized back smoothly (bilinear) and to the input's channel count.

A volume model (``unet.config.spatial_dims == 3``, ``sample_size`` None) works at the volume's own size:
nothing is resized (it pads inside to its total stride and crops back), so t* is the one of sigma itself.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """t* = the step whose sqrt((1 - abar_t) / abar_t) is nearest to 2 * sigma ([0, 1] -> [-1, 1])."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    ratio = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    target = 2.0 * float(sigma)
    if not ratio.min() <= target <= ratio.max():
        raise ValueError(
            f"2 * sigma = {target:g} is outside the schedule's noise range "
            f"[{ratio.min().item():.4g}, {ratio.max().item():.4g}] (sqrt((1 - abar_t) / abar_t))"
        )
    return int((ratio - target).abs().argmin())


def noisy_sample(images: torch.Tensor, abar: float) -> torch.Tensor:
    """x_t = sqrt(abar_t*) (2 (x + delta) - 1): a noisy [0, 1] batch as the forward process at t*."""
    return math.sqrt(abar) * (2 * images - 1)


def x0_from_output(x_t: torch.Tensor, output: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The x0 estimate in [-1, 1] (clipped, as diffusers' ``clip_sample``) from the model output at step t."""
    if prediction_type == "epsilon":
        x0 = (x_t - math.sqrt(1 - abar) * output) / math.sqrt(abar)
    elif prediction_type == "v_prediction":
        x0 = math.sqrt(abar) * x_t - math.sqrt(1 - abar) * output
    elif prediction_type == "sample":
        x0 = output
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0.clamp(-1, 1)


def ddpm_posterior_step(x_t: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float,
                        noise: torch.Tensor) -> torch.Tensor:
    """A sample of q(x_s | x_t, x0) for s < t, with ``noise`` ~ N(0, I) of x_t's shape."""
    alpha_ts = abar_t / abar_s
    beta_ts = 1 - alpha_ts
    mean = (math.sqrt(abar_s) * beta_ts * x0 + math.sqrt(alpha_ts) * (1 - abar_s) * x_t) / (1 - abar_t)
    std = math.sqrt(beta_ts * (1 - abar_s) / (1 - abar_t))
    return mean + std * noise


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, abar_t: float, abar_s: float) -> torch.Tensor:
    """The deterministic DDIM (eta = 0) step from t to s < t given the (clipped) x0 estimate.

    eps is re-derived from x0, as diffusers' ``DDIMScheduler.step(..., use_clipped_model_output=True)``.
    """
    eps = (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    return math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s) * eps


SHRINKS = ("box", "bilinear")
"""How ``resize`` shrinks: "box" averages by integer factors (bilinear otherwise), "bilinear" always filters."""


def check_shrink(shrink: str) -> None:
    """shrink must name a way of resizing: one of SHRINKS."""
    if shrink not in SHRINKS:
        raise ValueError(f"shrink must be one of {list(SHRINKS)}, got {shrink!r}")


def is_box_factor(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether ``target`` divides ``source`` in both dimensions (a shrink, or the same size, by
    integer factors): then the resize is a box (area) average, which keeps i.i.d. noise i.i.d."""
    return all(length % new == 0 for length, new in zip(source, target))


def resize(images: torch.Tensor, size: tuple[int, int], shrink: str = "box") -> torch.Tensor:
    """Resize (B, C, H, W) to ``size``: with ``shrink="box"``, box (area) averaging for integer shrink
    factors, which keeps the smoothing noise white (i.i.d., std / factor), what the DDPM saw in
    training; otherwise (and always with ``shrink="bilinear"``) bilinear, antialiased when shrinking
    (an antialiasing filter leaves neighbouring noise values correlated, about 0.3 for 2x)."""
    check_shrink(shrink)
    source = tuple(images.shape[-2:])
    if source == tuple(size):
        return images
    if shrink == "box" and is_box_factor(source, tuple(size)):
        return F.avg_pool2d(images, kernel_size=(source[0] // size[0], source[1] // size[1]))
    shrinking = size[0] < source[0] or size[1] < source[1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


@lru_cache(maxsize=64)
def resize_noise_factor(source: tuple[int, int], target: tuple[int, int], shrink: str = "box") -> float:
    """RMS over output pixels of sqrt(sum of squared filter weights) of ``resize(source -> target, shrink)``.

    i.i.d. noise of std s becomes noise of (per-pixel) std s * sqrt(sum w^2) after the resize
    (1 / factor for a box average by integer factors).
    """
    check_shrink(shrink)
    if shrink == "box" and is_box_factor(source, target):
        return 1.0 / math.sqrt((source[0] // target[0]) * (source[1] // target[1]))
    factors = []
    for length, new_length in zip(source, target):
        identity = torch.eye(length, dtype=torch.float64)[:, None, None, :]  # length unit impulses, (N, 1, 1, L)
        rows = F.interpolate(identity, size=(1, new_length), mode="bilinear", align_corners=False,
                             antialias=new_length < length)[:, 0, 0, :]  # (L_in, L_out): column j = weights of output j
        factors.append((rows**2).sum(0).mean().item())
    return math.sqrt(factors[0] * factors[1])


class DiffusionDenoiser(torch.nn.Module):
    """Maps a noisy batch (B, C, H, W) in [0, 1] scale (x + N(0, sigma^2)) to its clean estimate; over a volume
    model, a noisy (B, C, D, H, W) batch, at its own size.

    unet: diffusers ``UNet2DModel`` (learned-sigma models: the first C output channels are used), or any network
        called as ``unet(x_t, timesteps).sample`` with a ``config`` holding ``in_channels``, ``sample_size`` and,
        for volumes, ``spatial_dims = 3`` with ``sample_size`` None (``VolumeDiffusionUNet``: any volume size).
    scheduler: a diffusers scheduler with ``alphas_cumprod`` and ``config.prediction_type``
        ("epsilon", "v_prediction" or "sample").
    steps: "single" (one x0 prediction at t*) or an int number of model calls from t* down to 0.
    sampler: "ddpm" (posterior sampling between the steps, drawing from ``generator``) or "ddim"
        (deterministic); only used when steps > 1.
    image_size: the model's (H, W); default its ``config.sample_size``. None for a volume model (ValueError
        otherwise): it denoises every volume at its own size, nothing resized.
    shrink: how a batch is resized to the model's resolution and back (see ``resize``): "box"
        (box average by integer factors, bilinear otherwise) or "bilinear" (always bilinear).
    input_shape: the (C, H, W) of the images (the (C, D, H, W) of the volumes) it will denoise, when known:
        t* is then checked here for the noise the model will see, not at the first batch.
    generator: draws the posterior noise of multi-step DDPM when ``forward`` gets no per-sample
        generators (``SmoothedSegmenter`` passes one per draw, so its results do not depend on
        the batch size).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler,
        sigma: float,
        *,
        steps: str | int = "single",
        sampler: str = "ddpm",
        image_size: int | tuple[int, int] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        generator: torch.Generator | None = None,
        shrink: str = "box",
    ) -> None:
        super().__init__()
        if steps != "single" and not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f'steps must be "single" or an int >= 1, got {steps!r}')
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f'sampler must be "ddpm" or "ddim", got {sampler!r}')
        check_shrink(shrink)
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.unet = unet.eval()
        self.sigma = float(sigma)
        self.steps = 1 if steps == "single" else int(steps)
        self.sampler = sampler
        self.shrink = shrink
        self.prediction_type = prediction_type
        self.generator = generator
        self.spatial_dims = int(getattr(unet.config, "spatial_dims", 2))
        if self.spatial_dims == 2:
            size = image_size if image_size is not None else unet.config.sample_size
            self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        elif image_size is not None:
            raise ValueError(f"a {self.spatial_dims}D diffusion model denoises each volume at its own size (padded "
                             f"inside the network and cropped back, so the noise stays white); got image_size "
                             f"{image_size!r}: leave it None")
        else:
            self.image_size = None  # any size: nothing is resized
        self.model_channels = int(unet.config.in_channels)
        self.register_buffer("alphas_cumprod", torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))
        self._abar = tuple(self.alphas_cumprod.tolist())  # host floats: no device read (sync) per step
        timestep_for_sigma(self.alphas_cumprod, self.sigma)  # fail early when sigma is out of range
        self._timestep_of_shape: dict[tuple[int, ...], int] = {}
        if input_shape is not None:
            self.check_input(tuple(input_shape))

    @property
    def stochastic(self) -> bool:
        """Whether forward draws noise (multi-step DDPM sampling)."""
        return self.steps > 1 and self.sampler == "ddpm"

    def check_input(self, shape: tuple[int, ...]) -> int:
        """t* for inputs of shape (C, H, W) (a volume model: (C, D, H, W)); a clear error when their noise is
        outside the schedule, or when they are not what the model denoises (a volume for an image model).

        Computed once per shape (every batch of a certification asks again)."""
        shape = tuple(int(length) for length in shape)
        if shape in self._timestep_of_shape:
            return self._timestep_of_shape[shape]
        if len(shape) != self.spatial_dims + 1:
            layout = "images (C, H, W)" if self.spatial_dims == 2 else "volumes (C, D, H, W)"
            raise ValueError(f"this {self.spatial_dims}D diffusion model denoises {layout}; got an input of shape "
                             f"{shape}")
        channels, spatial = shape[0], shape[1:]
        sigma = self.effective_sigma(channels, spatial)
        try:
            start = timestep_for_sigma(self.alphas_cumprod, sigma)
        except ValueError as error:
            resolution = ("3D (any size)" if self.image_size is None
                          else " x ".join(map(str, self.image_size)))
            raise ValueError(
                f"sigma = {self.sigma:g} on {' x '.join(map(str, shape))} inputs reaches the "
                f"{self.model_channels}-channel {resolution} diffusion model as noise of std {sigma:.4g}: {error}"
            ) from error
        self._timestep_of_shape[shape] = start
        return start

    def effective_sigma(self, channels: int, size: tuple[int, ...]) -> float:
        """Noise std, in [0, 1] scale, of the batch the model sees for a (channels, *size) input."""
        sigma = self.sigma
        if self.image_size is not None:
            sigma *= resize_noise_factor(tuple(size), self.image_size, self.shrink)
        if channels > 1 and self.model_channels == 1:
            sigma /= math.sqrt(channels)
        return sigma

    def timesteps(self, start: int) -> list[int]:
        """The model-call steps, from t* down to 0 (one entry for single step)."""
        if self.steps == 1:
            return [start]
        return sorted({round(start * (1 - i / (self.steps - 1))) for i in range(self.steps)}, reverse=True)

    def _model_channels(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == self.model_channels:
            return images
        if images.shape[1] == 1:
            return images.expand(-1, self.model_channels, *images.shape[2:])
        if self.model_channels == 1:
            return images.mean(1, keepdim=True)
        raise ValueError(f"cannot feed {images.shape[1]}-channel images to a {self.model_channels}-channel model")

    def predict_x0(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The model's x0 estimate (B, C, *spatial) in [-1, 1] at step t."""
        channels = x_t.shape[1]
        timestep = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        output = self.unet(x_t, timestep).sample[:, :channels].to(x_t.dtype)
        return x0_from_output(x_t, output, self._abar[t], self.prediction_type)

    def _posterior_noise(self, like: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        """N(0, I) noise of ``like``'s shape: per sample from ``generators``, else from self.generator."""
        if generators is not None:
            if len(generators) != like.shape[0]:
                raise ValueError(f"got {len(generators)} generators for a batch of {like.shape[0]}")
            return torch.stack([torch.randn(like.shape[1:], generator=generator, device=generator.device,
                                            dtype=like.dtype).to(like.device) for generator in generators])
        device = like.device if self.generator is None else self.generator.device
        return torch.randn(like.shape, generator=self.generator, device=device, dtype=like.dtype).to(like.device)

    def step_back(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, s: int,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """x_s from x_t and the x0 estimate: DDPM posterior q(x_s | x_t, x0) sample, or DDIM."""
        abar_t, abar_s = self._abar[t], self._abar[s]
        if self.sampler == "ddim":
            return ddim_step(x_t, x0, abar_t, abar_s)
        return ddpm_posterior_step(x_t, x0, abar_t, abar_s, self._posterior_noise(x_t, generators))

    def _resized(self, images: torch.Tensor, size: tuple[int, ...] | None) -> torch.Tensor:
        """``images`` at ``size`` (see ``resize``); as they are for a volume model (no resolution of its own)."""
        return images if self.image_size is None else resize(images, size, self.shrink)

    def forward(self, noisy: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Clean estimate (B, C, H, W) (a volume model: (B, C, D, H, W)) in [0, 1] of a noisy batch;
        differentiable (for attacks).

        generators: one per sample for the posterior noise of multi-step DDPM.
        """
        channels, spatial = noisy.shape[1], tuple(noisy.shape[2:])
        start = self.check_input(tuple(noisy.shape[1:]))
        images = self._model_channels(self._resized(noisy.float(), self.image_size))
        x_t = noisy_sample(images, self._abar[start])
        steps = self.timesteps(start)
        for t, s in zip(steps, steps[1:] + [None]):
            x0 = self.predict_x0(x_t, t)
            if s is not None:
                x_t = self.step_back(x_t, x0, t, s, generators)
        clean = self._resized((x0 + 1) / 2, spatial).clamp(0, 1)
        if clean.shape[1] != channels:
            clean = clean.expand(-1, channels, *spatial) if clean.shape[1] == 1 else clean.mean(1, keepdim=True)
        return clean.to(noisy.dtype)
