"""3D U-Net: MONAI's ``UNet(spatial_dims=3)``, padded to its total stride so that any volume size works.

MONAI's UNet needs D, H and W divisible by the product of its ``strides``; :class:`PadToMultiple`
zero-pads the volume at the end of each axis to that multiple (as the volume datasets pad) and crops
the logits back. Its default normalisation is instance norm, which does not couple the items of a batch.
MONAI is imported when a 3D U-Net is built, not with the package (it takes seconds to import).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from medcert_core.models.volumetric import PadToMultiple

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
DEFAULT_STRIDES: tuple[int, ...] = (2, 2, 2)


def build_unet3d(
    *,
    in_channels: int,
    num_classes: int,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    strides: Sequence[int] = DEFAULT_STRIDES,
    num_res_units: int = 2,
    dropout: float = 0.0,
) -> PadToMultiple:
    """MONAI ``UNet(spatial_dims=3, ...)`` with ``channels`` per level and ``strides`` between levels (one
    fewer), ``num_res_units`` residual units per block, inside :class:`PadToMultiple`.

    Maps ``(B, in_channels, D, H, W) -> (B, num_classes, D, H, W)`` logits at any D, H, W (each padded
    internally to a multiple of the product of ``strides``).
    """
    from monai.networks.nets import UNet

    if len(channels) < 2 or len(strides) != len(channels) - 1:
        raise ValueError(f"a 3D U-Net needs at least 2 channel widths and one stride fewer than widths, got "
                         f"channels {tuple(channels)} and strides {tuple(strides)}")
    network = UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                   strides=tuple(strides), num_res_units=num_res_units, dropout=dropout)
    return PadToMultiple(network, math.prod(int(stride) for stride in strides))
