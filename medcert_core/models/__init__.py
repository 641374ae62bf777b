"""Segmentation networks: a name -> builder registry.

Every model maps a float batch (B, in_channels, H, W) to logits (B, num_classes, H, W) at the
input resolution (H, W multiples of 32); ``num_classes == 1`` gives a single binary logit.
No pretrained weights are ever loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medcert_core.models.deeplabv2 import DeepLabV2
from medcert_core.models.resunetpp import ResUNetPlusPlus
from medcert_core.models.unet import build_unet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "resunetpp": ResUNetPlusPlus,
    "deeplabv2": DeepLabV2,
}

ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


def create_model(arch: str, in_channels: int, num_classes: int, **kwargs: object) -> nn.Module:
    """Build architecture ``arch`` (one of :data:`ARCHITECTURES`) with random weights.

    ``kwargs`` go to the builder: ``unet`` takes ``encoder_name`` / ``encoder_depth`` /
    ``decoder_channels``, ``resunetpp`` takes ``base_channels``, ``deeplabv2`` takes ``backbone`` /
    ``backbone_stages``.
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
    ``input_shape`` (B, C, H, W), counted by torch's FlopCounterMode (matmuls and convolutions; 2 FLOPs
    per multiply-accumulate)."""
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
    "DeepLabV2",
    "ResUNetPlusPlus",
    "build_unet",
    "count_parameters",
    "create_model",
    "model_capacity",
    "multiply_accumulates",
]
