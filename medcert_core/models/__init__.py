"""Segmentation networks: a name -> builder registry.

Every model maps a float batch to logits at the input resolution; ``num_classes == 1`` gives a single
binary logit. No pretrained weights are ever loaded.

- 2D (:data:`IMAGE_ARCHITECTURES`): images (B, in_channels, H, W) -> (B, num_classes, H, W), H and W
  multiples of 32 ("unet", "resunetpp", "deeplabv2").
- 3D (:data:`VOLUME_ARCHITECTURES`): volumes (B, in_channels, D, H, W) -> (B, num_classes, D, H, W) at
  any D, H, W: "unet3d" (MONAI's 3D U-Net) and "<arch>-slicewise", the 2D architecture ``<arch>``
  applied to every D-slice (:class:`SliceWise`), trained end to end on volumes like any 3D model.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from medcert_core.models.deeplabv2 import DeepLabV2
from medcert_core.models.resunetpp import ResUNetPlusPlus
from medcert_core.models.unet import build_unet
from medcert_core.models.unet3d import build_unet3d
from medcert_core.models.volumetric import PadToMultiple, SliceWise

_IMAGE_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "resunetpp": ResUNetPlusPlus,
    "deeplabv2": DeepLabV2,
}
IMAGE_ARCHITECTURES: tuple[str, ...] = tuple(_IMAGE_REGISTRY)
SLICEWISE: dict[str, str] = {f"{arch}-slicewise": arch for arch in IMAGE_ARCHITECTURES}  # 3D name -> its 2D arch
VOLUME_ARCHITECTURES: tuple[str, ...] = ("unet3d", *SLICEWISE)
ARCHITECTURES: tuple[str, ...] = (*IMAGE_ARCHITECTURES, *VOLUME_ARCHITECTURES)


def build_slicewise(arch: str, *, in_channels: int, num_classes: int, **kwargs: object) -> SliceWise:
    """The 2D architecture ``arch`` (built with ``kwargs``) applied to every D-slice of a volume."""
    return SliceWise(create_model(arch, in_channels, num_classes, **kwargs))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **_IMAGE_REGISTRY,
    "unet3d": build_unet3d,
    **{name: partial(build_slicewise, arch) for name, arch in SLICEWISE.items()},
}


def create_model(arch: str, in_channels: int, num_classes: int, **kwargs: object) -> nn.Module:
    """Build architecture ``arch`` (one of :data:`ARCHITECTURES`) with random weights.

    ``kwargs`` go to the builder: ``unet`` takes ``encoder_name`` / ``encoder_depth`` /
    ``decoder_channels``, ``resunetpp`` takes ``base_channels``, ``deeplabv2`` takes ``backbone`` /
    ``backbone_stages``, ``unet3d`` takes ``channels`` / ``strides`` / ``num_res_units`` / ``dropout``,
    ``<arch>-slicewise`` takes those of ``<arch>``.
    """
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCHITECTURES)}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    return _REGISTRY[arch](in_channels=in_channels, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not) in ``model``."""
    return sum(p.numel() for p in model.parameters())


def multiply_accumulates(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` (in eval mode) on a zero tensor of
    ``input_shape`` (B, C, H, W) or (B, C, D, H, W), counted by torch's FlopCounterMode (matmuls and
    convolutions; 2 FLOPs per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(input_shape))
    model.train(was_training)
    return counter.get_total_flops() // 2


def model_capacity(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """{"parameters": its weights, "macs": multiply-accumulates of one forward pass on ``input_shape``}."""
    return {"parameters": count_parameters(model), "macs": multiply_accumulates(model, input_shape)}


__all__ = [
    "ARCHITECTURES",
    "IMAGE_ARCHITECTURES",
    "SLICEWISE",
    "VOLUME_ARCHITECTURES",
    "DeepLabV2",
    "PadToMultiple",
    "ResUNetPlusPlus",
    "SliceWise",
    "build_slicewise",
    "build_unet",
    "build_unet3d",
    "count_parameters",
    "create_model",
    "model_capacity",
    "multiply_accumulates",
]
