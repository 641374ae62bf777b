"""Offline training of the denoisers: a DDPM (diffusers layout) and the UNet baseline.

``train_ddpm`` trains a diffusers ``UNet2DModel`` to predict the noise on the linear 1000-step
schedule of the paper's checkpoint (betas 1e-4 to 0.02) and saves it as a ``DDPMPipeline``
(``model_index.json``, ``unet/``, ``scheduler/``), loadable offline with ``ddpm:<folder>``. On volumes
(C, D, H, W) the same loop trains a 3D network, MONAI's ``DiffusionModelUNet`` at the volumes' own size
(``VolumeDiffusionUNet``, the preset's ``volume_unet`` widths), saved in medcert's own folder of the same
layout (:mod:`medcert_core.denoisers.volume_ddpm`), also loaded by ``ddpm:<folder>``.
Training timesteps can be limited to the largest t* the study needs (``max_sigma``): denoised
smoothing never asks the model about noisier steps; a share of them (``focus_share``) can be drawn
near the t* of the study's sigmas (``focus_sigmas``, in the model's noise scale), where
certification queries the model. ``ema_decay`` keeps an exponential moving average of the weights
(diffusers' ``EMAModel``), which is what gets published. Both trainers checkpoint and resume.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch.utils.data import Dataset
from tqdm import tqdm  # text bars: no widget output in executed chapters

from medcert_core.data.base import as_size
from medcert_core.denoisers.diffusion import resize, timestep_for_sigma
from medcert_core.denoisers.unet_denoiser import DEFAULT_MODEL_KWARGS, IMAGE_ARCH, VOLUME_ARCH, UNetDenoiser
from medcert_core.denoisers.volume_ddpm import VolumeDiffusionUNet, save_volume_ddpm
from medcert_core.devices import autocast, resolve_device, resolve_precision
from medcert_core.io import load_weights, save_torch_atomically

DDPM_PRESETS: dict[str, dict[str, Any]] = {
    # a few minutes on 2 CPU cores (images); volumes: 2.9 M parameters, total stride 4, one attention head in
    # the middle block (MONAI always has one there), no other attention
    "tiny": {"image_size": 64, "steps": 300, "batch_size": 16, "lr": 2e-3, "unet": {
        "block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    }, "volume_unet": {
        "channels": (32, 64, 64), "attention_levels": (False, False, False), "num_res_blocks": 1,
        "norm_num_groups": 16, "num_head_channels": 64, "use_flash_attention": True,
    }},
    # the paper's resolution, for a GPU; volumes: 17 M parameters, total stride 8, attention at the lowest level
    "paper": {"image_size": 256, "steps": 100_000, "batch_size": 16, "lr": 1e-4, "unet": {
        "block_out_channels": (128, 128, 256, 256, 512, 512), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    }, "volume_unet": {
        "channels": (32, 64, 128, 128), "attention_levels": (False, False, False, True), "num_res_blocks": 2,
        "norm_num_groups": 32, "num_head_channels": 128, "use_flash_attention": True,
    }},
}


def linear_scheduler() -> DDPMScheduler:
    """The schedule of guided-diffusion's 256x256 model: 1000 steps, linear betas 1e-4 to 0.02."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=True)


def training_timesteps(count: int, max_timestep: int, focus_timesteps: Sequence[int], focus_share: float,
                       generator: torch.Generator) -> torch.Tensor:
    """(count,) int64 training timesteps: uniform in [0, max_timestep), except a ``focus_share`` of
    them drawn near one of ``focus_timesteps`` (uniform within +-10 % of it, clipped to the range)."""
    timesteps = torch.randint(0, max_timestep, (count,), generator=generator)
    if not focus_timesteps or focus_share <= 0:
        return timesteps
    focused = torch.rand(count, generator=generator) < focus_share
    centres = torch.as_tensor(focus_timesteps, dtype=torch.float64)[
        torch.randint(0, len(focus_timesteps), (count,), generator=generator)]
    jitter = (torch.rand(count, generator=generator, dtype=torch.float64) * 0.2 - 0.1) * centres
    near = (centres + jitter).round().long().clamp(0, max_timestep - 1)
    return torch.where(focused, near, timesteps)


def _stacked_images(dataset: Dataset, size: tuple[int, int]) -> torch.Tensor:
    """All images of a (image, mask) dataset at ``size``: (N, C, H, W) in [0, 1]."""
    return torch.cat([resize(dataset[i][0][None], size) for i in range(len(dataset))])


def _stacked_inputs(dataset: Dataset, image_size: int | None) -> torch.Tensor:
    """All inputs of a (input, mask) dataset in [0, 1]: images (N, C, H, W) at ``image_size`` (square; default
    their own size), volumes (N, C, D, H, W) as they are (``image_size`` must then be None)."""
    first = dataset[0][0]
    if first.dim() == 4:
        if image_size:
            raise ValueError(f"image_size resizes images; volumes (here {tuple(first.shape)}) are used at their "
                             "own size: leave image_size None")
        return torch.stack([dataset[i][0] for i in range(len(dataset))])
    return _stacked_images(dataset, (image_size, image_size) if image_size else tuple(first.shape[-2:]))


@dataclass
class _DDPMTraining:
    """The state of a DDPM training run that ``training_state.pt`` stores."""

    unet: torch.nn.Module  # UNet2DModel (images) or VolumeDiffusionUNet (volumes)
    optimizer: torch.optim.Optimizer
    ema: Any | None  # diffusers' EMAModel of the weights, or None
    generator: torch.Generator  # batches, noise and timesteps
    step: int = 0  # steps done
    losses: list[float] = field(default_factory=list)

    def checkpoint(self) -> dict[str, Any]:
        return {"unet": self.unet.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "step": self.step, "losses": self.losses,
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def resume(self, path: Path, device: torch.device) -> None:
        state = load_weights(path, map_location=device)
        self.unet.load_state_dict(state["unet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.losses = state["step"], state["losses"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def _ddpm_network(images: torch.Tensor, size: tuple[int, int] | None, settings: dict[str, Any]) -> torch.nn.Module:
    """A fresh noise-prediction network of the preset's layout for ``images``: a UNet2DModel at ``size`` for
    images (N, C, H, W), a VolumeDiffusionUNet (any size; ``size`` None) for volumes (N, C, D, H, W)."""
    channels = images.shape[1]
    if images.dim() == 5:
        return VolumeDiffusionUNet(channels, channels, **settings["volume_unet"])
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, **settings["unet"])


def _start_ddpm(images: torch.Tensor, size: tuple[int, int] | None, settings: dict[str, Any], lr: float, seed: int,
                ema_decay: float | None, device: torch.device) -> _DDPMTraining:
    """A fresh network of the preset's layout for ``images`` (``_ddpm_network``; torch's global seed set to
    ``seed`` first), AdamW, the optional EMA of its weights (with warm-up) and the run's generator seeded with
    ``seed``."""
    torch.manual_seed(seed)
    unet = _ddpm_network(images, size, settings).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    ema = None
    if ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True)
    return _DDPMTraining(unet, optimizer, ema, torch.Generator().manual_seed(seed))


def _ddpm_step(state: _DDPMTraining, images: torch.Tensor, batch_size: int, alphas_cumprod: torch.Tensor,
               draw_timesteps: Callable[[torch.Generator], torch.Tensor], device: torch.device,
               precision: str = "fp32") -> float:
    """One AdamW step (and EMA update) on the noise-prediction MSE of a random batch of ``images``
    (N, C, *spatial: images or volumes) in [0, 1], mapped to [-1, 1], noised at timesteps from
    ``draw_timesteps`` (the network under autocast at ``precision``, the loss and the weights fp32);
    returns the loss."""
    clean = images[torch.randint(0, len(images), (batch_size,), generator=state.generator)] * 2 - 1
    noise = torch.randn(clean.shape, generator=state.generator)
    timesteps = draw_timesteps(state.generator)
    abar = alphas_cumprod[timesteps.to(device)].view(-1, *(1,) * (clean.dim() - 1))
    noisy = abar.sqrt() * clean.to(device) + (1 - abar).sqrt() * noise.to(device)
    with autocast(device, precision):
        predicted = state.unet(noisy, timesteps.to(device)).sample
    loss = F.mse_loss(predicted.float(), noise.to(device))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if state.ema is not None:
        state.ema.step(state.unet.parameters())
    return loss.item()


def train_ddpm(
    dataset: Dataset,
    output_dir: str | Path,
    *,
    preset: str = "tiny",
    max_sigma: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    checkpoint_every: int = 50,
    ema_decay: float | None = None,
    focus_sigmas: Sequence[float] = (),
    focus_share: float = 0.0,
    precision: str = "fp32",
) -> Path:
    """Train a DDPM on the images of ``dataset`` and save it in ``output_dir`` (DDPMPipeline layout).

    Volumes (C, D, H, W) train a 3D network (``VolumeDiffusionUNet``, the preset's ``volume_unet``) at their
    own size, saved by ``save_volume_ddpm`` (the same folder layout: ``ddpm:<folder>`` loads either).

    image_size: the model's resolution, n (square) or (H, W); None: the preset's (square). Images only:
        volumes are never resized (ValueError when it is given for them).
    max_sigma: draw training timesteps only up to t*(max_sigma) (all 1000 when None).
    focus_sigmas, focus_share: draw that share of the timesteps near the t* of these noise levels
        (in the model's [0, 1] noise scale, after any resize to its resolution).
    ema_decay: publish an exponential moving average of the weights with this decay (with warm-up).
    precision: autocast of the network in training (fp32 | bf16 | fp16 | auto); the weights stay fp32.
    A finished folder is returned as is; an interrupted one resumes from ``training_state.pt``.
    """
    if preset not in DDPM_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DDPM_PRESETS)}, got {preset!r}")
    settings = DDPM_PRESETS[preset]
    total_steps = steps or settings["steps"]
    batch_size = batch_size or settings["batch_size"]
    output_dir = Path(output_dir)
    if (output_dir / "model_index.json").is_file():
        return output_dir
    volumes = dataset[0][0].dim() == 4
    size = None if volumes else as_size(image_size or settings["image_size"])
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    images = _stacked_inputs(dataset, image_size) if volumes else _stacked_images(dataset, size)
    scheduler = linear_scheduler()
    max_timestep = 1000 if max_sigma is None else timestep_for_sigma(scheduler.alphas_cumprod, max_sigma) + 1
    focus_timesteps = [timestep_for_sigma(scheduler.alphas_cumprod, sigma) for sigma in focus_sigmas]
    draw_timesteps = partial(training_timesteps, batch_size, max_timestep, focus_timesteps, focus_share)
    state = _start_ddpm(images, size, settings, lr or settings["lr"], seed, ema_decay, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_path = output_dir / "training_state.pt"
    if state_path.is_file():
        state.resume(state_path, device)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    state.unet.train()
    bar = tqdm(range(state.step, total_steps), desc="train ddpm", disable=not progress)
    for step in bar:
        state.losses.append(_ddpm_step(state, images, batch_size, alphas_cumprod, draw_timesteps, device, precision))
        bar.set_postfix(loss=f"{sum(state.losses[-20:]) / len(state.losses[-20:]):.4f}")
        state.step = step + 1
        if state.step % checkpoint_every == 0 and state.step < total_steps:
            save_torch_atomically(state.checkpoint(), state_path)
    if state.ema is not None:
        state.ema.copy_to(state.unet.parameters())  # publish the averaged weights
    unet = state.unet.eval().cpu()
    if volumes:
        _publish(partial(save_volume_ddpm, unet, scheduler), output_dir)
    else:
        _publish(DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained, output_dir)
    state_path.unlink(missing_ok=True)
    return output_dir


def _publish(save: Callable[[Path], Any], output_dir: Path) -> None:
    """``save(folder)`` a DDPM into ``output_dir`` so that ``model_index.json`` (the completion mark) lands last.

    Everything is written into a temporary sibling folder first, then moved in; a crash leaves no
    ``model_index.json`` beside half-written weights, so the next call trains or resumes instead.
    """
    temporary = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".saving", dir=output_dir.parent))
    save(temporary)
    for item in sorted(temporary.iterdir(), key=lambda path: path.name == "model_index.json"):
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(temporary)


def train_unet_denoiser(
    dataset: Dataset,
    sigma: float,
    output_dir: str | Path,
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    image_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint_every: int = 50,
    precision: str = "fp32",
) -> Path:
    """Train the UNet baseline for one sigma with MSE to the clean image; save it in ``output_dir``
    (the network under autocast at ``precision``, fp32 | bf16 | fp16 | auto; the weights stay fp32).

    Images (C, H, W) train a 2D ``"unet"`` (at ``image_size``, default their own), volumes (C, D, H, W) a
    3D ``"unet3d"`` at their own size; ``model_kwargs`` default to ``DEFAULT_MODEL_KWARGS`` of that arch.

    An interrupted run resumes from ``output_dir/training_state.pt`` (weights, optimizer, learning
    rate schedule and generator state), so the resumed model is the one an uninterrupted run gives."""
    output_dir = Path(output_dir)
    if (output_dir / "unet_denoiser.pt").is_file():
        return output_dir
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    images = _stacked_inputs(dataset, image_size)
    size = tuple(images.shape[2:])
    arch = VOLUME_ARCH if images.dim() == 5 else IMAGE_ARCH
    torch.manual_seed(seed)
    kwargs = model_kwargs or DEFAULT_MODEL_KWARGS[arch]
    denoiser = UNetDenoiser.build(images.shape[1], sigma, arch, **kwargs).to(device).train()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    state_path, start = output_dir / "training_state.pt", 0
    if state_path.is_file():
        state = load_weights(state_path, map_location=device)
        denoiser.network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        start = state["step"]
    bar = tqdm(range(start, steps), desc=f"train unet denoiser sigma={sigma}", disable=not progress)
    for step in bar:
        clean = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
        noisy = noisy.to(device)
        with autocast(device, precision):
            estimate = denoiser.network(noisy)
        loss = F.mse_loss(estimate.float(), clean.to(device))  # unclamped: keeps gradients
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_torch_atomically({"network": denoiser.network.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                                   "step": step + 1}, state_path)
    denoiser.eval().cpu().save(output_dir, image_size=list(size), steps=steps, seed=seed)
    state_path.unlink(missing_ok=True)
    return output_dir
