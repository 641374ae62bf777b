"""Networks at any spatial size, and 2D segmenters on volumes.

``padded_forward`` runs a network that needs sizes divisible by ``multiple`` (a U-Net's total stride)
on a batch of any size: the batch is zero-padded at the end of each spatial axis to the next multiple
(as the volume datasets pad, image 0) and the output cropped back to the input's size. It is one
deterministic function of the input, so a smoothed model built on it is certified as it runs.

``SliceWise`` applies a 2D segmenter to every D-slice of a volume and stacks the logits: a valid
volumetric base model (one deterministic function of the whole volume).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

SLICE_MULTIPLE = 32  # the 2D networks' largest total stride (a U-Net on a 5-stage encoder)


def check_multiple(multiple: int) -> int:
    """``multiple`` as an int >= 1; ValueError otherwise."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    return multiple


def rounded_up(spatial: tuple[int, ...], multiple: int) -> tuple[int, ...]:
    """Each length of ``spatial`` rounded up to a multiple of ``multiple``: rounded_up((5, 8), 4) -> (8, 8)."""
    return tuple(length + -length % multiple for length in spatial)


def padding_to_multiple(spatial: tuple[int, ...], multiple: int) -> list[int]:
    """``F.pad``'s padding (last axis first, (before, after) each) that brings ``spatial`` to multiples of
    ``multiple``, all of it after the data: padding_to_multiple((5, 9), 4) -> [0, 3, 0, 3]."""
    return padding_to_size(spatial, rounded_up(spatial, multiple))


def padding_to_size(spatial: tuple[int, ...], size: tuple[int, ...]) -> list[int]:
    """``F.pad``'s padding that brings ``spatial`` to ``size`` (each at least as large), all after the data."""
    return [amount for length, total in zip(reversed(spatial), reversed(size)) for amount in (0, total - length)]


def padded_to_size(network: nn.Module, batch: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``network`` on ``batch`` (B, C, *spatial) zero-padded at the end of each axis to ``size``, its output
    (B, K, *size) cropped back to (B, K, *spatial)."""
    spatial = tuple(batch.shape[2:])
    padding = padding_to_size(spatial, tuple(size))
    if not any(padding):
        return network(batch)
    output = network(F.pad(batch, padding))
    return output[(..., *(slice(0, length) for length in spatial))]


def padded_forward(network: nn.Module, batch: torch.Tensor, multiple: int) -> torch.Tensor:
    """``network`` on ``batch`` (B, C, *spatial) zero-padded to multiples of ``multiple``, its output
    (B, K, *padded) cropped back to (B, K, *spatial)."""
    return padded_to_size(network, batch, rounded_up(tuple(batch.shape[2:]), multiple))


class PadToMultiple(nn.Module):
    """``network`` at any input size: (B, C, *spatial) -> (B, K, *spatial) via :func:`padded_forward`."""

    def __init__(self, network: nn.Module, multiple: int) -> None:
        super().__init__()
        self.network = network
        self.multiple = check_multiple(multiple)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return padded_forward(self.network, batch, self.multiple)


def per_slice(function: Callable[[torch.Tensor], torch.Tensor], volumes: torch.Tensor) -> torch.Tensor:
    """``function`` (a 2D batch (N, C, H, W) -> (N, K, H, W)) on every D-slice of ``volumes`` (B, C, D, H, W),
    the B * D slices as one batch, its outputs stacked back to (B, K, D, H, W)."""
    batch, channels, depth, height, width = volumes.shape
    outputs = function(volumes.movedim(2, 1).reshape(batch * depth, channels, height, width))
    return outputs.reshape(batch, depth, -1, height, width).movedim(1, 2)


class SliceWise(nn.Module):
    """A 2D segmenter (B, C, H, W) -> (B, K, H, W) applied to each D-slice of a volume batch
    (B, C, D, H, W), its logits stacked to (B, K, D, H, W).

    The B * D slices go through ``model2d`` as one batch, each zero-padded to multiples of ``multiple``
    (default :data:`SLICE_MULTIPLE`) and cropped back, so any (H, W) works. With ``model2d`` in eval mode
    a slice's logits do not depend on the other slices: the same as a loop over slices.
    """

    def __init__(self, model2d: nn.Module, multiple: int = SLICE_MULTIPLE) -> None:
        super().__init__()
        self.model2d = model2d
        self.multiple = check_multiple(multiple)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        if volumes.dim() != 5:
            raise ValueError(f"SliceWise segments volume batches (B, C, D, H, W), got shape {tuple(volumes.shape)}")
        return per_slice(lambda slices: padded_forward(self.model2d, slices, self.multiple), volumes)
