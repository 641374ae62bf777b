"""Denoisers: every one is built for one sigma and maps a noisy (B, C, H, W) batch in [0, 1] scale
to its clean estimate (a volume denoiser: (B, C, D, H, W)).

``load_denoiser(spec, sigma)`` is the one entry point, for specs
``none``, ``ddpm:<folder>`` (a diffusers DDPMPipeline folder, or any folder with ``unet/`` and
``scheduler/``; or a 3D DDPM's folder written by ``train_ddpm`` on volumes, told apart by its
``unet/config.json``: see :mod:`medcert_core.denoisers.volume_ddpm`),
``guided-diffusion:<file.pt>`` (OpenAI's checkpoint, e.g. the paper's
256x256_diffusion_uncond.pt) and ``unet:<folder>`` (the baseline written by
``train_unet_denoiser``) and ``ffdnet:<file.pth>`` (FFDNet, an off-the-shelf natural-image denoiser;
see :mod:`medcert_core.denoisers.ffdnet`).

A guided-diffusion checkpoint other than 256x256_diffusion_uncond.pt needs its flags, given as its
users write them: ``load_denoiser("guided-diffusion:model.pt", 0.5, flags="--num_channels 128
--num_res_blocks 2 --attention_resolutions 16,8 --learn_sigma True ...")`` (see
:func:`medcert_core.denoisers.guided_diffusion.parse_model_flags`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medcert_core.denoisers.diffusion import DiffusionDenoiser, resize_noise_factor, timestep_for_sigma
from medcert_core.denoisers.ffdnet import FFDNetDenoiser, load_ffdnet
from medcert_core.denoisers.training import DDPM_PRESETS, linear_scheduler, train_ddpm, train_unet_denoiser
from medcert_core.denoisers.unet_denoiser import UNetDenoiser
from medcert_core.denoisers.volume_ddpm import VolumeDiffusionUNet, is_volume_ddpm, load_volume_unet

SPEC_KINDS = ("none", "ddpm", "guided-diffusion", "unet", "ffdnet")


def load_ddpm(folder: str | Path, sigma: float, **options: Any) -> DiffusionDenoiser:
    """A DiffusionDenoiser over a diffusers folder holding ``unet/`` and ``scheduler/``, or over a 3D DDPM's
    folder (``is_volume_ddpm``: its network from its JSON config and weights-only state_dict), which denoises
    volumes (B, C, D, H, W) at their own size (``image_size`` must then be None)."""
    from diffusers import DDPMScheduler, UNet2DModel

    folder = Path(folder)
    missing = [name for name in ("unet", "scheduler") if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a diffusers DDPM folder: missing {', '.join(f'{name}/' for name in missing)}; expected "
            f"{folder}/unet/(config.json, diffusion_pytorch_model.safetensors) and {folder}/scheduler/scheduler_config.json"
        )
    if is_volume_ddpm(folder):
        unet = load_volume_unet(folder)
    else:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return DiffusionDenoiser(unet, scheduler, sigma, **options)


def load_guided_diffusion(path: str | Path, sigma: float, *, steps: str | int = "single",
                          sampler: str = "ddpm", generator: torch.Generator | None = None,
                          **flags: Any) -> DiffusionDenoiser:
    """The paper's denoiser: an OpenAI guided-diffusion checkpoint on its linear 1000-step schedule."""
    from medcert_core.denoisers.guided_diffusion import load_guided_diffusion_unet

    unet = load_guided_diffusion_unet(path, **flags)
    return DiffusionDenoiser(unet, linear_scheduler(), sigma, steps=steps, sampler=sampler, generator=generator)


def parse_spec(spec: str) -> tuple[str, Path]:
    """(kind, path) of a denoiser spec other than ``none``; ValueError listing the valid forms."""
    kind, _, location = spec.partition(":")
    if kind not in SPEC_KINDS[1:] or not location:
        raise ValueError(f"denoiser spec must be 'none' or one of ddpm:<folder>, guided-diffusion:<file.pt>, "
                         f"unet:<folder>, ffdnet:<file.pth>; got {spec!r}")
    return kind, Path(location).expanduser()


def model_flags(flags: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """guided-diffusion flags as a dict: a MODEL_FLAGS string is parsed (``parse_model_flags``), a
    mapping copied, None and "" are the 256x256_diffusion_uncond defaults (``{}``)."""
    from medcert_core.denoisers.guided_diffusion import parse_model_flags

    if flags is None:
        return {}
    return parse_model_flags(flags) if isinstance(flags, str) else dict(flags)


def load_denoiser(spec: str | None, sigma: float, *, flags: str | Mapping[str, Any] | None = None,
                  **options: Any) -> torch.nn.Module | None:
    """Build the denoiser of ``spec`` for noise level ``sigma``; None for ``none``.

    options go to DiffusionDenoiser (``steps``, ``sampler``, ``image_size``, ``generator``; for
    ``ddpm:`` also ``shrink``, "box" or "bilinear"); ``ffdnet:`` takes ``shrink`` ("box", "bilinear" or
    "none", for sigma above 75/255) and ignores the others; ``none`` and the UNet baseline ignore them. ``flags``: a guided-diffusion checkpoint's flags, as a
    MODEL_FLAGS string (``"--num_channels 128 --learn_sigma True ..."``) or a dict of them; other
    kinds ignore them (a chapter passes one set of flags to all of its denoisers).
    """
    if spec is None or spec == "none":
        return None
    kind, path = parse_spec(spec)
    parsed_flags = model_flags(flags) if kind == "guided-diffusion" else {}  # bad flags fail before any file is read
    if not path.exists():
        raise FileNotFoundError(f"denoiser {spec!r}: {path} does not exist")
    if kind == "ddpm":
        return load_ddpm(path, sigma, **options)
    if kind == "guided-diffusion":
        return load_guided_diffusion(path, sigma, **options, **parsed_flags)
    if kind == "ffdnet":
        return load_ffdnet(path, sigma, shrink=options.get("shrink", "box"))
    denoiser = UNetDenoiser.load(path)
    if abs(denoiser.sigma - sigma) > 1e-9:
        raise ValueError(f"the UNet denoiser in {path} was trained for sigma = {denoiser.sigma}, not {sigma}")
    return denoiser


__all__ = [
    "DDPM_PRESETS", "DiffusionDenoiser", "FFDNetDenoiser", "UNetDenoiser", "VolumeDiffusionUNet", "is_volume_ddpm",
    "linear_scheduler", "load_ddpm", "load_denoiser", "load_ffdnet", "load_guided_diffusion", "load_volume_unet",
    "model_flags", "parse_spec", "resize_noise_factor", "timestep_for_sigma", "train_ddpm", "train_unet_denoiser",
]
