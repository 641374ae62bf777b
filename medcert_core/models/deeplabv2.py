"""DeepLabV2 (Chen et al., 2016, "DeepLab: Semantic Image Segmentation with Deep Convolutional
Nets, Atrous Convolution, and Fully Connected CRFs"), without the CRF.

A torchvision ResNet made dilated (output stride 8: layer3 dilation 2, layer4 dilation 4, no
stride in either), an ASPP-L head whose four 3x3 atrous convolutions (rates 6, 12, 18, 24) each
predict class logits and are summed, and bilinear upsampling back to the input size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

BACKBONES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
    "resnet101": models.resnet101,
}


def _dilate_basic_layer(layer: nn.Sequential, dilation: int, previous_dilation: int) -> None:
    """Turn a strided layer of ``BasicBlock`` s into a dilated one, in place.

    Mirrors torchvision's ``replace_stride_with_dilation`` for bottlenecks: the stride becomes
    1, the first block's first 3x3 conv keeps ``previous_dilation`` and every other 3x3 conv
    uses ``dilation`` (padding = dilation keeps the spatial size).
    """
    for index, block in enumerate(layer):
        if not isinstance(block, BasicBlock):
            raise TypeError(f"expected BasicBlock, got {type(block).__name__}")
        block.stride = 1
        for conv in (block.conv1, block.conv2):
            rate = previous_dilation if index == 0 and conv is block.conv1 else dilation
            conv.stride = (1, 1)
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilated_resnet(name: str, in_channels: int, stages: int = 4) -> tuple[nn.Sequential, int]:
    """Randomly initialised ResNet trunk with output stride 8, of its first ``stages`` residual
    stages (4: the whole ResNet; 3: without ``layer4``, a quarter of resnet18's weights).

    Returns the trunk, mapping (B, in_channels, H, W) -> (B, C, ceil(H/8), ceil(W/8)), and C
    (512 for resnet18/34, 2048 for resnet50/101; half that with 3 stages).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if stages not in (3, 4):
        raise ValueError(f"a DeepLabV2 backbone has 3 or 4 residual stages (output stride 8), got {stages}")
    if name in ("resnet18", "resnet34"):
        resnet = BACKBONES[name](weights=None)
        _dilate_basic_layer(resnet.layer3, dilation=2, previous_dilation=1)
        _dilate_basic_layer(resnet.layer4, dilation=4, previous_dilation=2)
    else:
        resnet = BACKBONES[name](weights=None, replace_stride_with_dilation=[False, True, True])
    if in_channels != resnet.conv1.in_channels:
        resnet.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
    trunk = nn.Sequential(
        OrderedDict(
            (key, getattr(resnet, key))
            for key in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")[:4 + stages]
        )
    )
    return trunk, resnet.fc.in_features // (2 ** (4 - stages))


class ASPP(nn.Module):
    """DeepLabV2 ASPP-L: parallel 3x3 atrous convs to class logits, summed.

    (B, Cin, h, w) -> (B, num_classes, h, w); ``output == sum(branch(x) for branch in branches)``.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=rate, dilation=rate)
            for rate in self.rates
        )
        for branch in self.branches:
            nn.init.normal_(branch.weight, mean=0.0, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(nn.Module):
    """DeepLabV2 mapping (B, in_channels, H, W) -> logits (B, num_classes, H, W).

    ``backbone`` is one of :data:`BACKBONES`, of its first ``backbone_stages`` residual stages (4:
    the paper's; 3: the capacity-matched tiny preset's); ``self.backbone`` yields the stride-8 features
    and ``self.aspp`` the stride-8 logits, upsampled bilinearly to the input size.
    """

    def __init__(self, *, in_channels: int, num_classes: int, backbone: str = "resnet101",
                 backbone_stages: int = 4) -> None:
        super().__init__()
        self.backbone, features = dilated_resnet(backbone, in_channels, backbone_stages)
        self.aspp = ASPP(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.aspp(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
