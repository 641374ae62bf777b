"""U-Net from ``segmentation_models_pytorch`` with a randomly initialised encoder.

Pretrained encoder weights are deliberately not supported: the models are trained from scratch
and nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp

DEFAULT_DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)


def build_unet(
    *,
    in_channels: int,
    num_classes: int,
    encoder_name: str = "resnet34",
    decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
) -> smp.Unet:
    """Build ``smp.Unet`` (depth-5 encoder, ``encoder_weights=None``).

    Maps ``(B, in_channels, H, W) -> (B, num_classes, H, W)`` logits; ``H`` and ``W`` must be
    multiples of 32. ``decoder_channels`` needs one width per decoder stage (5 of them).
    """
    if len(decoder_channels) != 5:
        raise ValueError(f"decoder_channels needs 5 entries, got {tuple(decoder_channels)}")
    return smp.Unet(
        encoder_name=encoder_name,
        encoder_weights=None,
        decoder_channels=tuple(decoder_channels),
        in_channels=in_channels,
        classes=num_classes,
    )
