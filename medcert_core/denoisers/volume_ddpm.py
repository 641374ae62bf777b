"""The 3D DDPM's network: MONAI's ``DiffusionModelUNet(spatial_dims=3)`` at any volume size, called as a
diffusers UNet is (``unet(x_t, timesteps).sample``), and its folder on disk.

MONAI's network halves D, H and W at every level but the last, so it needs each a multiple of
``2 ** (len(channels) - 1)``; the volume is zero-padded at the end of each axis to that multiple and the
output cropped back (``models.volumetric.padded_forward``, as the 3D U-Net segmenter does), so the DDPM
works at the volume's own size and nothing resizes the smoothing noise. Its group norms and attention act
within one volume: an item's output does not depend on its batch-mates. MONAI's ``DiffusionModelUNet``
always has a self-attention block in its middle (lowest resolution): it needs ``einops``.

A MONAI network is not a diffusers model, so the folder is medcert's own, beside the diffusers layout
of the 2D DDPM (same names, so ``ddpm:<folder>`` and the model cache treat both alike)::

    model_index.json                  {"_class_name": "VolumeDDPM", ...}; written last (the completion mark)
    unet/config.json                  {"architecture": "monai.DiffusionModelUNet", "in_channels": ...,
                                       "out_channels": ..., "kwargs": {constructor keyword arguments}}
    unet/diffusion_unet.pt            the state_dict: tensors only, read by ``io.load_weights`` (weights only)
    scheduler/scheduler_config.json   diffusers' DDPMScheduler config (JSON)

Nothing in the folder runs code: the architecture is a name medcert knows, its arguments JSON values.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from medcert_core.io import load_weights, save_torch_atomically, write_json_atomically
from medcert_core.models.volumetric import padded_forward

ARCHITECTURE = "monai.DiffusionModelUNet"  # the one architecture a volume DDPM folder may name
CONFIG, WEIGHTS, INDEX = "config.json", "diffusion_unet.pt", "model_index.json"
INDEX_CLASS = "VolumeDDPM"  # model_index.json's _class_name: not a diffusers pipeline
SETTINGS = ("channels", "attention_levels", "num_res_blocks", "norm_num_groups", "num_head_channels",
            "norm_eps", "resblock_updown", "use_flash_attention")  # the constructor arguments a config may set


@dataclass
class UNetOutput:
    """What the network returns, as diffusers' ``UNet2DOutput``: the prediction in ``.sample``."""

    sample: torch.Tensor


def _json_value(value: Any) -> Any:
    """Tuples as lists, so that a config survives a JSON round trip unchanged."""
    return [_json_value(item) for item in value] if isinstance(value, (tuple, list)) else value


class VolumeDiffusionUNet(nn.Module):
    """(B, C, D, H, W) noisy volumes x_t and (B,) timesteps -> ``UNetOutput(sample=(B, out_channels, D, H, W))``,
    at any D, H, W.

    ``settings`` are ``DiffusionModelUNet``'s keyword arguments among :data:`SETTINGS` (``channels``,
    ``attention_levels``, ``num_res_blocks``, ``norm_num_groups``, ...). ``config`` holds what the
    denoiser reads (``in_channels``, ``sample_size`` None: any size, ``spatial_dims`` 3) and what is saved.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, **settings: Any) -> None:
        super().__init__()
        if importlib.util.find_spec("einops") is None:
            raise ImportError("the 3D DDPM needs einops (MONAI's DiffusionModelUNet builds its attention with it); it "
                              "is in medcert's requirements: pip install 'einops>=0.7'")
        from monai.networks.nets import DiffusionModelUNet

        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings {unknown} of a volume DDPM network; valid: {', '.join(SETTINGS)}")
        out_channels = in_channels if out_channels is None else out_channels
        settings = {name: _json_value(value) for name, value in settings.items()}
        tupled = {name: tuple(value) if isinstance(value, list) else value for name, value in settings.items()}
        self.network = DiffusionModelUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **tupled)
        self.multiple = 2 ** (len(self.network.block_out_channels) - 1)
        self.config = SimpleNamespace(architecture=ARCHITECTURE, in_channels=int(in_channels),
                                      out_channels=int(out_channels), sample_size=None, spatial_dims=3,
                                      kwargs=settings)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> UNetOutput:
        if x_t.dim() != 5:
            raise ValueError(f"a volume DDPM network takes (B, C, D, H, W) batches, got shape {tuple(x_t.shape)}")
        return UNetOutput(padded_forward(partial(self.network, timesteps=timesteps), x_t, self.multiple))

    def saved_config(self) -> dict[str, Any]:
        """``unet/config.json``: the architecture's name and its constructor's arguments (JSON values)."""
        return {"architecture": ARCHITECTURE, "in_channels": self.config.in_channels,
                "out_channels": self.config.out_channels, "kwargs": self.config.kwargs}


def save_volume_ddpm(unet: VolumeDiffusionUNet, scheduler, folder: str | Path) -> Path:
    """Write a volume DDPM folder (layout in the module doc), ``model_index.json`` last; each file atomically."""
    folder = Path(folder)
    write_json_atomically(unet.saved_config(), folder / "unet" / CONFIG)
    save_torch_atomically({name: tensor.detach().cpu() for name, tensor in unet.state_dict().items()},
                          folder / "unet" / WEIGHTS)
    scheduler.save_config(folder / "scheduler")
    index = {"_class_name": INDEX_CLASS, "_written_by": "medcert", "unet": ["monai", "DiffusionModelUNet"],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    write_json_atomically(index, folder / INDEX)
    return folder


def is_volume_ddpm(folder: str | Path) -> bool:
    """Whether ``folder`` holds a volume DDPM (its ``unet/config.json`` names an ``architecture``, which a
    diffusers config never does)."""
    path = Path(folder) / "unet" / CONFIG
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" in config


def load_volume_unet(folder: str | Path, map_location: str | torch.device = "cpu") -> VolumeDiffusionUNet:
    """The network of the volume DDPM in ``folder``, in eval mode: built from its JSON config by name
    (only :data:`ARCHITECTURE`), its weights read with ``io.load_weights`` (nothing in a file runs)."""
    folder = Path(folder)
    path = folder / "unet" / CONFIG
    config = json.loads(path.read_text())
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path} names architecture {config.get('architecture')!r}; a volume DDPM folder must name "
                         f"{ARCHITECTURE!r}")
    try:
        unet = VolumeDiffusionUNet(int(config["in_channels"]), int(config["out_channels"]), **config["kwargs"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a volume DDPM config written by medcert (expected 'architecture', "
                         f"'in_channels', 'out_channels' and 'kwargs' among {', '.join(SETTINGS)}; {error})") from error
    state_dict = load_weights(folder / "unet" / WEIGHTS, map_location=map_location)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{folder / 'unet' / WEIGHTS} holds {type(state_dict).__name__}, not a state_dict")
    unet.load_state_dict(state_dict)
    return unet.eval()
