"""U-Net from ``segmentation_models_pytorch`` with a randomly initialised encoder.

Pretrained encoder weights are deliberately not supported: the models are trained from scratch
and nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
from torch import nn

DEFAULT_DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)


def build_unet(
    *,
    in_channels: int,
    num_classes: int,
    encoder_name: str = "resnet34",
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
) -> smp.Unet:
    """Build ``smp.Unet`` (``encoder_weights=None``) with an encoder of ``encoder_depth`` stages (5:
    the whole ResNet; 4: without its last stage, a quarter of resnet18's weights).

    Maps ``(B, in_channels, H, W) -> (B, num_classes, H, W)`` logits; ``H`` and ``W`` must be
    multiples of ``2 ** encoder_depth``. ``decoder_channels`` needs one width per stage.
    """
    if encoder_depth not in (3, 4, 5):
        raise ValueError(f"encoder_depth must be 3, 4 or 5, got {encoder_depth}")
    if len(decoder_channels) != encoder_depth:
        raise ValueError(f"decoder_channels needs {encoder_depth} entries (one per encoder stage), "
                         f"got {tuple(decoder_channels)}")
    model = smp.Unet(
        encoder_name=encoder_name,
        encoder_weights=None,
        encoder_depth=encoder_depth,
        decoder_channels=tuple(decoder_channels),
        in_channels=in_channels,
        classes=num_classes,
    )
    for stage in range(encoder_depth, 5):  # smp keeps a ResNet's unused last stages: their weights would be dead
        if hasattr(model.encoder, f"layer{stage}"):  # an Identity, not deleted: smp's stage lists may name it
            setattr(model.encoder, f"layer{stage}", nn.Identity())
    return model
