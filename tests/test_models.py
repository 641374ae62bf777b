"""Tests for medcert_core.models: shapes, architecture details, trainability, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medcert_core.models import ARCHITECTURES, IMAGE_ARCHITECTURES, VOLUME_ARCHITECTURES, count_parameters, create_model
from medcert_core.models.deeplabv2 import ASPP as DeepLabASPP
from medcert_core.models.deeplabv2 import DeepLabV2
from medcert_core.models.resunetpp import ASPP as ResUNetASPP
from medcert_core.models.resunetpp import AttentionGate, ResUNetPlusPlus, SqueezeExcite

# Small widths so that every forward pass stays well under a second on a CPU.
TINY: dict[str, dict[str, object]] = {
    "unet": {"encoder_name": "resnet18", "decoder_channels": (64, 32, 16, 16, 8)},
    "resunetpp": {"base_channels": 8},
    "deeplabv2": {"backbone": "resnet18"},
}
PAPER_SIZES = [(512, 512), (384, 512), (288, 384)]  # H x W


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomize_batchnorm(module: nn.Module) -> None:
    """Give every BN non-trivial affine parameters and running statistics."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)


def test_architectures_registry() -> None:
    assert IMAGE_ARCHITECTURES == ("unet", "resunetpp", "deeplabv2")
    assert VOLUME_ARCHITECTURES == ("unet3d", "unet-slicewise", "resunetpp-slicewise", "deeplabv2-slicewise")
    assert ARCHITECTURES == IMAGE_ARCHITECTURES + VOLUME_ARCHITECTURES


@pytest.mark.parametrize("num_classes", [4, 2])
@pytest.mark.parametrize("size", PAPER_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("arch", IMAGE_ARCHITECTURES)
def test_forward_shape_paper_sizes(arch: str, size: tuple[int, int], num_classes: int) -> None:
    model = create_model(arch, 3, num_classes, **TINY[arch]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, num_classes, *size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def default_models() -> dict[str, nn.Module]:
    """One model per architecture at its default width (3 in-channels, 4 classes), eval mode."""
    torch.manual_seed(0)
    return {arch: create_model(arch, 3, 4).eval() for arch in IMAGE_ARCHITECTURES}


@pytest.mark.parametrize("arch", IMAGE_ARCHITECTURES)
def test_default_width_forward(arch: str, default_models: dict[str, nn.Module]) -> None:
    with torch.no_grad():
        out = default_models[arch](torch.randn(1, 3, 96, 128))
    assert out.shape == (1, 4, 96, 128)
    assert torch.isfinite(out).all()


def test_default_widths(default_models: dict[str, nn.Module]) -> None:
    resunetpp = default_models["resunetpp"]
    # the authors' Keras widths; 4.06 M parameters as the ResUNet++ paper reports (4.07 M)
    assert [stage[-1].fc[-2].out_features for stage in resunetpp.encoder] == [16, 32, 64, 128]
    assert resunetpp.bridge.project.out_channels == 256
    assert resunetpp.head.in_channels == 16
    assert count_parameters(resunetpp) == pytest.approx(4.07e6, rel=0.01)
    deeplab = default_models["deeplabv2"]
    assert len(deeplab.backbone.layer3) == 23  # resnet101
    assert deeplab.aspp.branches[0].in_channels == 2048
    unet = default_models["unet"]
    assert unet.name == "u-resnet34"
    assert len(unet.encoder.layer3) == 6  # resnet34


@pytest.mark.parametrize("arch", IMAGE_ARCHITECTURES)
def test_single_channel_single_class(arch: str) -> None:
    model = create_model(arch, 1, 1, **TINY[arch])
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 1, 64, 64)
    out.mean().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_other_sizes() -> None:
    model = create_model("resunetpp", 3, 2, **TINY["resunetpp"]).eval()
    with torch.no_grad():
        for size in [(64, 64), (128, 128), (96, 160)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 2, *size)


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        create_model("segformer", 3, 2)
    for name in ("unet", "resunetpp", "deeplabv2"):
        assert name in str(info.value)


def test_invalid_channel_counts() -> None:
    with pytest.raises(ValueError):
        create_model("unet", 3, 0)
    with pytest.raises(ValueError):
        create_model("unet", 0, 2)


def test_unet_rejects_encoder_weights() -> None:
    with pytest.raises(TypeError, match="encoder_weights"):
        create_model("unet", 3, 2, encoder_weights="imagenet")  # offline: rejected before any download


def test_count_parameters() -> None:
    assert count_parameters(nn.Conv2d(3, 4, kernel_size=3)) == 3 * 4 * 9 + 4
    assert count_parameters(nn.Sequential(nn.Linear(5, 2), nn.BatchNorm1d(2))) == 5 * 2 + 2 + 2 + 2


# ---------------------------------------------------------------------------------------- DeepLabV2


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_deeplabv2_backbone_output_stride_8(backbone: str) -> None:
    model = DeepLabV2(in_channels=3, num_classes=4, backbone=backbone).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 288, 384))
    channels = 512 if backbone == "resnet18" else 2048
    assert features.shape == (1, channels, 288 // 8, 384 // 8)


def test_deeplabv2_resnet18_dilation() -> None:
    backbone = DeepLabV2(in_channels=3, num_classes=2, backbone="resnet18").backbone
    for layer, first, rate in ((backbone.layer3, 1, 2), (backbone.layer4, 2, 4)):
        assert layer[0].downsample[0].stride == (1, 1)
        assert layer[0].conv1.dilation == (first, first) and layer[0].conv1.stride == (1, 1)
        assert layer[0].conv2.dilation == (rate, rate)
        assert layer[1].conv1.dilation == (rate, rate) and layer[1].conv2.dilation == (rate, rate)
        assert layer[1].conv1.padding == (rate, rate)
    assert backbone.layer2[0].conv1.stride == (2, 2)


def test_deeplabv2_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="resnet101"):
        DeepLabV2(in_channels=3, num_classes=2, backbone="vgg16")


def test_deeplabv2_aspp_sums_four_atrous_branches() -> None:
    aspp = DeepLabASPP(16, 3)
    assert aspp.rates == (6, 12, 18, 24)
    assert len(aspp.branches) == 4
    for branch, rate in zip(aspp.branches, (6, 12, 18, 24)):
        assert branch.kernel_size == (3, 3)
        assert branch.dilation == (rate, rate) and branch.padding == (rate, rate)
        assert branch.out_channels == 3
        branch.bias.data.normal_()  # non-zero biases so that they are checked too
    x = torch.randn(2, 16, 20, 28)
    expected = sum(
        F.conv2d(x, branch.weight, branch.bias, padding=rate, dilation=rate)
        for branch, rate in zip(aspp.branches, (6, 12, 18, 24))
    )
    with torch.no_grad():
        out = aspp(x)
        by_branch = aspp.branches[0](x) + aspp.branches[1](x) + aspp.branches[2](x) + aspp.branches[3](x)
    assert out.shape == (2, 3, 20, 28)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, by_branch)


def test_deeplabv2_forward_is_upsampled_aspp() -> None:
    model = DeepLabV2(in_channels=3, num_classes=2, backbone="resnet18").eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        logits = model.aspp(model.backbone(x))
        out = model(x)
    assert logits.shape == (1, 2, 12, 16)
    expected = F.interpolate(logits, size=(96, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------- ResUNet++


def test_resunetpp_structure() -> None:
    model = ResUNetPlusPlus(in_channels=3, num_classes=2, base_channels=8)
    modules = list(model.modules())
    assert sum(isinstance(m, SqueezeExcite) for m in modules) == 4
    assert sum(isinstance(m, AttentionGate) for m in modules) == 3
    aspps = [m for m in modules if isinstance(m, ResUNetASPP)]
    assert aspps == [model.bridge, model.output_aspp]
    assert model.bridge.rates == (1, 6, 12, 18)
    assert (model.bridge.project.out_channels, model.output_aspp.project.out_channels) == (128, 8)


def test_resunetpp_rejects_size_not_multiple_of_8() -> None:
    model = ResUNetPlusPlus(in_channels=3, num_classes=2, base_channels=8)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 3, 60, 64))


def _bn_relu_conv(x: torch.Tensor, seq: nn.Sequential) -> torch.Tensor:
    bn, _, conv = seq
    y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    return F.conv2d(F.relu(y), conv.weight, conv.bias, padding=1)


def test_attention_gate_matches_direct_computation() -> None:
    gate = AttentionGate(encoder_channels=3, decoder_channels=5)
    _randomize_batchnorm(gate)
    gate.eval()
    encoder = torch.randn(2, 3, 8, 6)
    decoder = torch.randn(2, 5, 4, 3)
    with torch.no_grad():
        out = gate(encoder, decoder)
        g = F.max_pool2d(_bn_relu_conv(encoder, gate.encoder_conv[0]), kernel_size=2, stride=2)
        d = _bn_relu_conv(decoder, gate.decoder_conv)
        expected = _bn_relu_conv(g + d, gate.gate_conv) * decoder
    assert out.shape == (2, 5, 4, 3)
    torch.testing.assert_close(out, expected)


def test_squeeze_excite_matches_direct_computation() -> None:
    se = SqueezeExcite(16, ratio=8)
    x = torch.randn(2, 16, 5, 7)
    w1, w2 = se.fc[0].weight, se.fc[2].weight  # (2, 16), (16, 2)
    with torch.no_grad():
        weights = torch.sigmoid(F.relu(x.mean(dim=(2, 3)) @ w1.T) @ w2.T)
        torch.testing.assert_close(se(x), x * weights[:, :, None, None])
    assert w1.shape == (2, 16)


# ---------------------------------------------------------------------------------- training, seeds


def _disk_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy 64x64 image of a disk and its mask (about 19% foreground)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    mask = ((yy - 30) ** 2 + (xx - 34) ** 2 < 16**2).long()
    noise = 0.3 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    image = (mask.float() + noise).expand(3, 64, 64).unsqueeze(0).contiguous()
    return image, mask.unsqueeze(0)


@pytest.mark.parametrize("arch", IMAGE_ARCHITECTURES)
def test_tiny_model_overfits_one_image(arch: str) -> None:
    image, mask = _disk_problem()
    assert 0.75 < 1 - mask.float().mean() < 0.85  # predicting background alone is not enough
    model = create_model(arch, 3, 2, **TINY[arch])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    for _ in range(50):
        loss = F.cross_entropy(model(image), mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(image).argmax(dim=1) == mask).float().mean().item()
    assert accuracy > 0.9


@pytest.mark.parametrize("arch", IMAGE_ARCHITECTURES)
def test_same_seed_same_weights(arch: str) -> None:
    torch.manual_seed(123)
    first = create_model(arch, 3, 2, **TINY[arch]).state_dict()
    torch.manual_seed(123)
    second = create_model(arch, 3, 2, **TINY[arch]).state_dict()
    torch.manual_seed(124)
    third = create_model(arch, 3, 2, **TINY[arch]).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], third[key]) for key in first)


# ------------------------------------------------------------------------ capacity-matched widths


def _every_weight_gets_a_gradient(model: nn.Module, shape: tuple[int, ...]) -> None:
    model(torch.randn(shape)).sum().backward()
    dead = [name for name, weight in model.named_parameters() if weight.grad is None]
    assert not dead, f"weights the forward pass never uses: {dead[:3]}"


def test_unet_with_a_shallower_encoder_keeps_no_dead_weights() -> None:
    model = create_model("unet", 3, 2, encoder_name="resnet18", encoder_depth=4, decoder_channels=(32, 16, 16, 8))
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 2, 48, 64), "multiples of 16 suffice at depth 4"
    assert isinstance(model.encoder.layer4, nn.Identity), "the unused last stage holds no weights"
    _every_weight_gets_a_gradient(model, (2, 3, 32, 32))
    full = create_model("unet", 3, 2, encoder_name="resnet18", decoder_channels=(32, 16, 16, 8, 8))
    layer4 = sum(w.numel() for name, w in full.named_parameters() if name.startswith("encoder.layer4."))
    encoder = lambda m: sum(w.numel() for name, w in m.named_parameters() if name.startswith("encoder."))  # noqa: E731
    assert encoder(full) - encoder(model) == layer4
    with pytest.raises(ValueError, match=r"decoder_channels needs 4 entries \(one per encoder stage\)"):
        create_model("unet", 3, 2, encoder_name="resnet18", encoder_depth=4, decoder_channels=(32, 16, 16, 8, 8))


def test_deeplabv2_on_three_backbone_stages_keeps_output_stride_8() -> None:
    model = DeepLabV2(in_channels=3, num_classes=4, backbone="resnet18", backbone_stages=3).eval()
    assert not hasattr(model.backbone, "layer4")
    with torch.no_grad():
        assert model.backbone(torch.randn(1, 3, 64, 96)).shape == (1, 256, 8, 12)
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 4, 64, 96)
    _every_weight_gets_a_gradient(model.train(), (2, 3, 32, 32))
    with pytest.raises(ValueError, match="3 or 4 residual stages"):
        DeepLabV2(in_channels=3, num_classes=4, backbone="resnet18", backbone_stages=2)


def test_multiply_accumulates_of_a_convolution_by_hand() -> None:
    from medcert_core.models import multiply_accumulates

    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    assert multiply_accumulates(conv, (2, 3, 8, 10)) == 2 * 8 * 10 * 5 * 3 * 9  # per output value: C_in * k * k


def test_the_matched_preset_puts_the_three_architectures_within_2x_in_weights_and_3x_in_compute() -> None:
    from medcert_core.training import preset_capacity

    matched = {arch: preset_capacity("matched", arch) for arch in IMAGE_ARCHITECTURES}
    tiny = {arch: preset_capacity("tiny", arch) for arch in IMAGE_ARCHITECTURES}
    spread = lambda table, key: max(row[key] for row in table.values()) / min(row[key] for row in table.values())  # noqa: E731
    assert spread(matched, "parameters") <= 2 and spread(matched, "macs") <= 3
    assert spread(tiny, "parameters") > 10, "the gap the matched preset closes"
