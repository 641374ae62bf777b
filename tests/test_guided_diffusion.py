"""Tests for medcert_core.denoisers.guided_diffusion: guided-diffusion -> diffusers UNet conversion.

The reference below is an independent, compact re-implementation of guided-diffusion's
``UNetModel`` forward (openai/guided-diffusion, ``unet.py`` / ``nn.py``) with exactly its
state-dict key names, so that no real weights and no guided-diffusion install are needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from medcert_core.denoisers.guided_diffusion import (
    GUIDED_DIFFUSION_DEFAULTS,
    convert_checkpoint,
    load_guided_diffusion_unet,
    split_qkv,
    unet_config_from_flags,
)

# ----------------------------------------------------------------------------------------------
# Reference guided-diffusion UNetModel
# ----------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as guided-diffusion's ``normalization``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """cos then sin of t * exp(-log(max_period) * i / half), i < half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, scale_shift: bool, up: bool = False, down: bool = False):
        super().__init__()
        self.scale_shift, self.up, self.down = scale_shift, up, down
        self.in_layers = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(
            norm(out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[-1](self.resample(self.in_layers[:-1](x)))
        x = self.resample(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def qkv_attention_legacy(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """QKVAttentionLegacy: (B, heads * 3 * ch, T) -> (B, heads * ch, T), heads split before q, k, v."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, 3 * ch, length).split(ch, dim=1)
    scale = ch**-0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def qkv_attention_new(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """QKVAttention: (B, 3 * heads * ch, T) -> (B, heads * ch, T), q, k, v split before heads."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = (part.reshape(bs * heads, ch, length) for part in qkv.chunk(3, dim=1))
    scale = ch**-0.25
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, heads: int, new_order: bool):
        super().__init__()
        self.heads = heads
        self.attention = qkv_attention_new if new_order else qkv_attention_legacy
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x)), self.heads))
        return (x + h).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Seq(nn.Sequential):
    """TimestepEmbedSequential: passes the embedding to ResBlocks only."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ReferenceUNet(nn.Module):
    """guided-diffusion's UNetModel as built by ``script_util.create_model`` (no class conditioning)."""

    def __init__(self, *, image_size: int, num_channels: int, num_res_blocks: int, channel_mult: str,
                 attention_resolutions: str, num_heads: int = 4, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, learn_sigma: bool = True, resblock_updown: bool = True,
                 use_scale_shift_norm: bool = True, use_new_attention_order: bool = False, in_channels: int = 3):
        super().__init__()
        mults = [int(m) for m in channel_mult.split(",")]
        attention_ds = {image_size // int(res) for res in attention_resolutions.split(",")}
        up_heads = num_heads if num_heads_upsample == -1 else num_heads_upsample
        emb_ch = 4 * num_channels
        self.model_channels = num_channels

        def res(ch: int, out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch, emb_ch, out, use_scale_shift_norm, **updown)

        def attn(ch: int, heads: int) -> AttentionBlock:
            heads = heads if num_head_channels == -1 else ch // num_head_channels
            return AttentionBlock(ch, heads, use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        ch = mults[0] * num_channels
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chs, ds = [ch], 1
        for level, mult in enumerate(mults):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * num_channels)]
                ch = mult * num_channels
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(Seq(*layers))
                skip_chs.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(Seq(res(ch, ch, down=True) if resblock_updown else Downsample(ch)))
                skip_chs.append(ch)
                ds *= 2
        self.middle_block = Seq(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), mult * num_channels)]
                ch = mult * num_channels
                if ds in attention_ds:
                    layers.append(attn(ch, up_heads))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        out_ch = 2 * in_channels if learn_sigma else in_channels
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (norms and zero-initialised convs included) so no mapping error hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

TINY = {  # the 256x256 layout, shrunk: updown resblocks, scale-shift norm, legacy attention, heads > 1
    "image_size": 32, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,2,2",
    "attention_resolutions": "16,8", "num_heads": 4, "num_head_channels": 8, "num_heads_upsample": -1,
    "learn_sigma": True, "resblock_updown": True, "use_scale_shift_norm": True, "use_new_attention_order": False,
}
VARIANTS = {
    "tiny32": TINY,
    "tiny64": {**TINY, "image_size": 64, "num_res_blocks": 1, "channel_mult": "1,1,2,2",
               "attention_resolutions": "32,8"},
    "conv_resample_plain_norm_new_order": {**TINY, "num_res_blocks": 1, "resblock_updown": False,
                                           "use_scale_shift_norm": False, "use_new_attention_order": True},
    "num_heads_no_sigma": {**TINY, "num_res_blocks": 1, "num_head_channels": -1, "num_heads": 2, "learn_sigma": False},
}
TIMESTEPS = torch.tensor([0, 17, 999])


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny networks: one thread avoids oversubscribing a shared CPU (10x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[ReferenceUNet, nn.Module]:
    reference = randomized(ReferenceUNet(**TINY))
    return reference, convert_checkpoint(reference.state_dict(), **TINY)


# ----------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------


def test_timestep_embedding_matches_diffusers() -> None:
    t = torch.tensor([0.0, 17.0, 999.0, 3.5])
    expected = get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 32), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_converted_model_reproduces_guided_diffusion(name: str) -> None:
    flags = VARIANTS[name]
    reference = randomized(ReferenceUNet(**flags), seed=1)
    model = convert_checkpoint(reference.state_dict(), **flags)
    size = flags["image_size"]
    x = torch.randn(len(TIMESTEPS), 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(x, TIMESTEPS)
        actual = model(x, TIMESTEPS).sample
    assert actual.shape == (len(TIMESTEPS), 6 if flags["learn_sigma"] else 3, size, size)
    assert expected.abs().mean() > 0.1  # the comparison is not between near-zero outputs
    err = (actual - expected).abs().max().item()
    assert err < 1e-5 * max(1.0, expected.abs().max().item()), f"max abs error {err:.2e}"


def test_parameter_count_matches_tensor_for_tensor(tiny_pair: tuple[ReferenceUNet, nn.Module]) -> None:
    reference, model = tiny_pair
    source, target = reference.state_dict(), model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    n_qkv = sum(key.endswith(".qkv.weight") for key in source)
    assert len(target) == len(source) + 4 * n_qkv  # each qkv weight and bias becomes q, k, v
    assert not any(p.is_meta for p in model.parameters())


def test_legacy_attention_matches_direct_computation() -> None:
    heads, ch, length = 3, 4, 5
    qkv = torch.randn(2, heads * 3 * ch, length, generator=torch.Generator().manual_seed(3))
    out = []
    for h in range(heads):  # legacy layout: per head, [q | k | v] blocks of ch rows
        q, k, v = (qkv[:, (3 * h + i) * ch:(3 * h + i + 1) * ch] for i in range(3))
        attn = torch.einsum("bct,bcs->bts", q, k).div(math.sqrt(ch)).softmax(dim=-1)
        out.append(torch.einsum("bts,bcs->bct", attn, v))
    torch.testing.assert_close(qkv_attention_legacy(qkv, heads), torch.cat(out, dim=1))


def test_split_qkv_layouts() -> None:
    heads, head_dim, c = 2, 3, 6
    rows = torch.arange(3 * c, dtype=torch.float32)
    q, k, v = split_qkv(rows, head_dim, legacy_order=True)
    assert q.tolist() == [0, 1, 2, 9, 10, 11] and k.tolist() == [3, 4, 5, 12, 13, 14]
    assert v.tolist() == [6, 7, 8, 15, 16, 17]
    q, k, v = split_qkv(rows, head_dim, legacy_order=False)
    assert q.tolist() == list(range(6)) and v.tolist() == list(range(12, 18))
    assert split_qkv(torch.zeros(3 * c + 1), head_dim, legacy_order=True) is None
    weight_parts = split_qkv(torch.randn(3 * c, c, 1), head_dim, legacy_order=True)
    assert weight_parts is not None and all(part.shape == (c, c) for part in weight_parts)
    assert heads * head_dim == c


def test_converted_attention_block_reproduces_legacy_attention(tiny_pair: tuple[ReferenceUNet, nn.Module]) -> None:
    reference, model = tiny_pair
    source, converted = reference.middle_block[1], model.mid_block.attentions[0]
    assert source.heads == converted.heads == 8  # 64 channels / 8 per head
    x = torch.randn(2, 64, 3, 5, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(converted(x), source(x), rtol=1e-5, atol=1e-5)
    down_source, down_converted = reference.input_blocks[4][1], model.down_blocks[1].attentions[0]
    with torch.no_grad():
        torch.testing.assert_close(down_converted(x), down_source(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Config and the full-size model (on the meta device: no memory, no compute)
# ----------------------------------------------------------------------------------------------


def test_default_config_is_the_256_uncond_model() -> None:
    config = unet_config_from_flags()
    assert config["block_out_channels"] == (256, 256, 512, 512, 1024, 1024)
    assert config["down_block_types"] == ("ResnetDownsampleBlock2D",) * 3 + ("AttnDownBlock2D",) * 3
    assert config["up_block_types"] == ("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",) * 3
    assert config["out_channels"] == 6
    assert config["attention_head_dim"] == 64
    assert config["layers_per_block"] == 2
    assert config["resnet_time_scale_shift"] == "scale_shift"


def test_full_size_checkpoint_layout_converts() -> None:
    flags = {key: GUIDED_DIFFUSION_DEFAULTS[key] for key in TINY}
    flags["channel_mult"] = "1,1,2,2,4,4"
    with torch.device("meta"):
        reference = ReferenceUNet(**flags)
    model = convert_checkpoint(reference.state_dict())
    assert sum(p.numel() for p in reference.parameters()) == 552_814_086  # 256x256_diffusion_uncond.pt
    assert sum(p.numel() for p in model.parameters()) == 552_814_086


def test_channel_mult_rules() -> None:
    assert unet_config_from_flags(image_size=64, num_channels=64)["block_out_channels"] == (64, 128, 192, 256)
    assert unet_config_from_flags(image_size=128, num_channels=64)["block_out_channels"] == (64, 64, 128, 192, 256)
    assert unet_config_from_flags(channel_mult="1,2")["block_out_channels"] == (256, 512)
    with pytest.raises(NotImplementedError, match="channel_mult"):
        unet_config_from_flags(image_size=512)
    with pytest.raises(ValueError, match="unsupported image size"):
        unet_config_from_flags(image_size=48)


def test_varying_head_widths_are_rejected() -> None:
    with pytest.raises(NotImplementedError, match="head width"):
        unet_config_from_flags(num_head_channels=-1)  # 4 heads over 512 and 1024 channels


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return ReferenceUNet(**TINY).state_dict()


def test_extra_key_is_reported(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    state = {**tiny_state_dict, "label_emb.weight": torch.zeros(1000, 128)}
    with pytest.raises(ValueError, match=r"1 unmapped source key\(s\): label_emb.weight"):
        convert_checkpoint(state, **TINY)


def test_missing_key_is_reported(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state_dict)
    del state["middle_block.1.qkv.weight"]
    with pytest.raises(ValueError, match=r"3 missing target key\(s\): mid_block.attentions.0.to_q.weight") as info:
        convert_checkpoint(state, **TINY)
    assert "middle_block.1.qkv.weight" in str(info.value)


def test_wrong_shape_is_reported(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    state = {**tiny_state_dict, "out.2.weight": torch.zeros(3, 32, 3, 3)}
    with pytest.raises(ValueError, match=r"1 shape mismatch\(es\): out.2.weight -> conv_out.weight"):
        convert_checkpoint(state, **TINY)


def test_wrong_flags_list_many_problems(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match=r"unmapped source key.*\n.*missing target key.*\n.*more"):
        convert_checkpoint(tiny_state_dict, **{**TINY, "num_res_blocks": 1})


def test_unknown_flag_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="num_chanels.*valid flags.*num_channels"):
        unet_config_from_flags(num_chanels=128)


def test_class_cond_is_not_implemented(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    with pytest.raises(NotImplementedError, match="class_cond"):
        convert_checkpoint(tiny_state_dict, **TINY, class_cond=True)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_guided_diffusion_unet(path, **TINY)


@pytest.mark.parametrize("content", [b"not a checkpoint", None, {"weight": torch.zeros(2)}])
def test_load_rejects_non_guided_files(tmp_path: Path, content: object) -> None:
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match="bad.pt"):
        load_guided_diffusion_unet(path, **TINY)


def test_converted_model_saves_and_reloads_with_diffusers(tmp_path: Path) -> None:
    flags = VARIANTS["conv_resample_plain_norm_new_order"]
    model = convert_checkpoint(randomized(ReferenceUNet(**flags)).state_dict(), **flags)
    model.save_pretrained(tmp_path)
    reloaded = UNet2DModel.from_pretrained(tmp_path, local_files_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_load_round_trip(tmp_path: Path, tiny_pair: tuple[ReferenceUNet, nn.Module]) -> None:
    reference, converted = tiny_pair
    path = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_guided_diffusion_unet(path, **TINY)
    for name, tensor in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"(?s)tiny\.pt: state dict does not match.*unmapped source key"):
        load_guided_diffusion_unet(path, **{**TINY, "num_res_blocks": 1})
