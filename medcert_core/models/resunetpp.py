"""ResUNet++ (Jha et al., 2019, "ResUNet++: An Advanced Architecture for Medical Image
Segmentation").

Layout (``f = base_channels * (1, 2, 4, 8, 16)``, ``H`` and ``W`` multiples of 8)::

    stem + SE            -> c1 (f0, H,   W)
    residual/2 + SE      -> c2 (f1, H/2, W/2)
    residual/2 + SE      -> c3 (f2, H/4, W/4)
    residual/2 + SE      -> c4 (f3, H/8, W/8)
    ASPP bridge          -> b  (f4, H/8, W/8)
    decoder(c3, b)       -> d1 (f3, H/4, W/4)   attention gate, upsample 2x, concat, residual
    decoder(c2, d1)      -> d2 (f2, H/2, W/2)
    decoder(c1, d2)      -> d3 (f1, H,   W)
    ASPP, 1x1 conv       -> logits (num_classes, H, W)

With ``base_channels=16`` the widths are those of the authors' Keras code (``m_resunet.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _bn_relu_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Pre-activation 3x3 conv: BN -> ReLU -> conv (``stride`` divides H and W)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
    )


def _projection(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Residual shortcut: 1x1 conv (with ``stride``) -> BN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride),
        nn.BatchNorm2d(out_channels),
    )


class SqueezeExcite(nn.Module):
    """Channel re-weighting: ``x * sigmoid(W2 relu(W1 avgpool(x)))``; (B, C, H, W) -> same."""

    def __init__(self, channels: int, ratio: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class Stem(nn.Module):
    """Input block: conv-BN-ReLU-conv plus a 1x1 conv-BN shortcut; (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        self.shortcut = _projection(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResidualUnit(nn.Module):
    """Pre-activation residual unit: two BN-ReLU-conv layers plus a 1x1 conv-BN shortcut.

    (B, Cin, H, W) -> (B, Cout, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _bn_relu_conv(in_channels, out_channels, stride),
            _bn_relu_conv(out_channels, out_channels),
        )
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ASPP(nn.Module):
    """ResUNet++ atrous spatial pyramid pooling: parallel 3x3 conv-BN branches at ``rates``,
    summed, then a 1x1 conv; (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=rate, dilation=rate),
                nn.BatchNorm2d(out_channels),
            )
            for rate in self.rates
        )
        self.project = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(sum(branch(x) for branch in self.branches))


class AttentionGate(nn.Module):
    """ResUNet++ attention block, gating the decoder feature with the encoder skip.

    ``encoder`` (B, Ce, 2h, 2w) and ``decoder`` (B, Cd, h, w) -> (B, Cd, h, w)::

        gate = conv(relu(bn(maxpool(conv(relu(bn(encoder)))) + conv(relu(bn(decoder))))))
        out = gate * decoder
    """

    def __init__(self, encoder_channels: int, decoder_channels: int) -> None:
        super().__init__()
        self.encoder_conv = nn.Sequential(
            _bn_relu_conv(encoder_channels, decoder_channels),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.decoder_conv = _bn_relu_conv(decoder_channels, decoder_channels)
        self.gate_conv = _bn_relu_conv(decoder_channels, decoder_channels)

    def forward(self, encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        gate = self.gate_conv(self.encoder_conv(encoder) + self.decoder_conv(decoder))
        return gate * decoder


class DecoderBlock(nn.Module):
    """Attention gate, 2x nearest upsampling, concat with the skip, residual unit.

    ``skip`` (B, Ce, 2h, 2w) and ``x`` (B, Cd, h, w) -> (B, Cout, 2h, 2w).
    """

    def __init__(self, skip_channels: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.attention = AttentionGate(skip_channels, in_channels)
        self.residual = ResidualUnit(in_channels + skip_channels, out_channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.attention(skip, x), scale_factor=2.0, mode="nearest")
        return self.residual(torch.cat([x, skip], dim=1))


class ResUNetPlusPlus(nn.Module):
    """ResUNet++ mapping (B, in_channels, H, W) -> logits (B, num_classes, H, W).

    ``H`` and ``W`` must be multiples of 8. Widths are ``base_channels * (1, 2, 4, 8, 16)``.
    """

    def __init__(self, *, in_channels: int, num_classes: int, base_channels: int = 16) -> None:
        super().__init__()
        f0, f1, f2, f3, f4 = (base_channels * m for m in (1, 2, 4, 8, 16))
        self.encoder = nn.ModuleList(
            [
                nn.Sequential(Stem(in_channels, f0), SqueezeExcite(f0)),
                nn.Sequential(ResidualUnit(f0, f1, stride=2), SqueezeExcite(f1)),
                nn.Sequential(ResidualUnit(f1, f2, stride=2), SqueezeExcite(f2)),
                nn.Sequential(ResidualUnit(f2, f3, stride=2), SqueezeExcite(f3)),
            ]
        )
        self.bridge = ASPP(f3, f4)
        self.decoder = nn.ModuleList(
            [DecoderBlock(f2, f4, f3), DecoderBlock(f1, f3, f2), DecoderBlock(f0, f2, f1)]
        )
        self.output_aspp = ASPP(f1, f0)
        self.head = nn.Conv2d(f0, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % 8 or width % 8:
            raise ValueError(f"ResUNet++ needs H and W divisible by 8, got {height}x{width}")
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bridge(skips.pop())
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(skip, x)
        return self.head(self.output_aspp(x))
