"""Convert OpenAI guided-diffusion UNet checkpoints into diffusers ``UNet2DModel``\\ s.

The denoiser of Carlini et al. (2023) and Laousy et al. (MICCAI 2023) is guided-diffusion's
unconditional 256x256 ImageNet model (``256x256_diffusion_uncond.pt``). This module rebuilds that
network as a :class:`diffusers.UNet2DModel` and moves the weights over, so that
``model(x, t).sample`` equals guided-diffusion's ``model(x, t)``: a ``(B, 2 * C, H, W)`` tensor
with ``learn_sigma`` whose first ``C`` channels are the predicted noise (eps).

Flags use guided-diffusion's own argument names (``script_util.create_model``), plus
``in_channels``; :data:`GUIDED_DIFFUSION_DEFAULTS` holds those of ``256x256_diffusion_uncond``.

Name correspondence (guided-diffusion -> diffusers):

* ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` -> ``conv_in``;
  ``out.{0,2}`` -> ``conv_norm_out`` / ``conv_out``.
* ``input_blocks.k`` walk the levels: per level ``num_res_blocks`` blocks ``(ResBlock[, attention])``
  -> ``down_blocks.l.resnets.i`` / ``.attentions.i``, then (all levels but the last) one downsample
  block -> ``down_blocks.l.downsamplers.0``.
* ``middle_block.{0,1,2}`` -> ``mid_block.resnets.0`` / ``.attentions.0`` / ``.resnets.1``.
* ``output_blocks.k`` walk the levels in reverse, ``num_res_blocks + 1`` blocks per level
  ``(ResBlock[, attention][, upsample])`` -> ``up_blocks.j.resnets.i`` / ``.attentions.i`` /
  ``.upsamplers.0``.
* ResBlock: ``in_layers.0`` norm1, ``in_layers.2`` conv1, ``emb_layers.1`` time_emb_proj,
  ``out_layers.0`` norm2, ``out_layers.3`` conv2, ``skip_connection`` conv_shortcut.
* AttentionBlock: ``norm`` group_norm, ``proj_out`` to_out.0 (Conv1d -> Linear), ``qkv`` split
  into to_q / to_k / to_v. guided-diffusion's legacy order (``QKVAttentionLegacy``) splits the
  heads *before* q, k, v: the ``3 * C`` output rows are laid out as ``(heads, 3, head_dim)``; the
  new order (``QKVAttention``) as ``(3, heads, head_dim)``.

guided-diffusion scales q and k each by ``head_dim ** -0.25``; diffusers scales q.k by
``head_dim ** -0.5``: the same logits. All GroupNorms use 32 groups and eps 1e-5 in both.

The layout is walked once (``_modules``: every module with weights, in guided-diffusion's order, with
its diffusers name and channels); the conversion rules and :func:`checkpoint_shapes` (the tensors a
checkpoint of given flags holds, which the test fixtures fill with random weights) both read it.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DModel

__all__ = [
    "GUIDED_DIFFUSION_DEFAULTS",
    "attention_downsample_factors",
    "channel_multipliers",
    "checkpoint_shapes",
    "convert_checkpoint",
    "load_guided_diffusion_unet",
    "parse_model_flags",
    "split_qkv",
    "unet_config_from_flags",
]

GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": "",
    "attention_resolutions": "32,16,8",
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "learn_sigma": True,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "dropout": 0.0,
    "class_cond": False,
    "use_new_attention_order": False,
    "use_fp16": False,
    "use_checkpoint": False,
    "in_channels": 3,
}
"""Flags of ``256x256_diffusion_uncond.pt``, the only accepted flag names. ``use_fp16`` and
``use_checkpoint`` do not change the weights; the converted model is always float32."""

GUIDED_DIFFUSION_SCHEDULE_FLAGS: dict[str, Any] = {
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
}
"""guided-diffusion's diffusion flags (``diffusion_defaults()`` less ``learn_sigma``), which users write
in the same MODEL_FLAGS string. medcert runs every checkpoint on the linear 1000-step schedule with
eps prediction, so these three must keep their defaults; the others only concern training or
guided-diffusion's own sampler and are accepted and dropped."""

_SCHEDULE_REQUIRED = ("diffusion_steps", "noise_schedule", "predict_xstart")


def _str2bool(text: str) -> bool:
    """guided-diffusion's ``str2bool``: yes/true/t/y/1 and no/false/f/n/0, any case."""
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (True or False), got {text!r}")


def _flag_parser() -> argparse.ArgumentParser:
    """An argparse parser built as guided-diffusion's ``add_dict_to_argparser`` builds its own."""
    parser = argparse.ArgumentParser(prog="guided-diffusion flags", add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    for name, default in {**GUIDED_DIFFUSION_DEFAULTS, **GUIDED_DIFFUSION_SCHEDULE_FLAGS}.items():
        kind = _str2bool if isinstance(default, bool) else str if default is None else type(default)
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, type=kind)
    return parser


def parse_model_flags(text: str) -> dict[str, Any]:
    """guided-diffusion flags as its users write them -> keyword arguments of :func:`load_guided_diffusion_unet`.

    ``text`` is a MODEL_FLAGS string such as ``"--attention_resolutions 32,16,8 --image_size 256
    --learn_sigma True --num_channels 256 --num_head_channels 64 --num_res_blocks 2
    --resblock_updown True --use_scale_shift_norm True"``, parsed the way guided-diffusion's
    argparse parses it: each flag takes the type of its default (booleans ``True``/``False``,
    also yes/no/1/0; ints; comma lists such as ``32,16,8`` stay strings); ``--name=value`` works
    too; abbreviated names do not. Returns only the model flags given (the others keep the
    256x256_diffusion_uncond defaults); "" gives ``{}``. Diffusion flags from the same string
    (``--diffusion_steps 1000 --noise_schedule linear``, ...) are checked against the schedule
    medcert uses and dropped (see :data:`GUIDED_DIFFUSION_SCHEDULE_FLAGS`).

    Raises ValueError naming the flag for an unknown name (listing the valid ones), a bad value, a
    flag without a value or a stray word, and for a schedule medcert does not run.
    """
    if not isinstance(text, str):
        raise ValueError(f"guided-diffusion flags must be a string like '--num_channels 256 --learn_sigma True', "
                         f"got {type(text).__name__} {text!r}")
    valid = sorted({**GUIDED_DIFFUSION_DEFAULTS, **GUIDED_DIFFUSION_SCHEDULE_FLAGS})
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"guided-diffusion flags {text!r}: {error}") from error
    try:
        parsed, extra = _flag_parser().parse_known_args(words)
    except argparse.ArgumentError as error:
        raise ValueError(f"guided-diffusion flags {text!r}: {error}") from error
    unknown = [word.split("=", 1)[0] for word in extra if word.startswith("-")]
    if unknown:
        raise ValueError(f"unknown guided-diffusion flag(s) {unknown} in {text!r}; valid flags: "
                         + ", ".join(f"--{name}" for name in valid))
    if extra:
        raise ValueError(f"guided-diffusion flags {text!r}: {extra[0]!r} is not a flag (write --name value, "
                         f"e.g. --num_channels 256)")
    given = vars(parsed)
    for name in _SCHEDULE_REQUIRED:
        if name in given and given[name] != GUIDED_DIFFUSION_SCHEDULE_FLAGS[name]:
            raise ValueError(f"guided-diffusion flag --{name} {given[name]} is not supported: medcert runs "
                             f"guided-diffusion checkpoints on the linear 1000-step schedule with eps prediction "
                             f"(--diffusion_steps 1000 --noise_schedule linear --predict_xstart False)")
    return {name: value for name, value in given.items() if name in GUIDED_DIFFUSION_DEFAULTS}


_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels), eps 1e-5
_SHOWN = 5  # problems listed per category in error messages


class _Rule(NamedTuple):
    """How one source tensor becomes target tensor(s)."""

    targets: tuple[str, ...]  # one name, or (to_q, to_k, to_v) for an attention qkv projection
    kind: str  # "copy", "conv1d_to_linear" or "qkv"


class _Module(NamedTuple):
    """One module with weights of guided-diffusion's UNetModel and its diffusers counterpart."""

    source: str  # guided-diffusion name, e.g. "input_blocks.1.0"
    target: str  # diffusers name, e.g. "down_blocks.0.resnets.0"
    kind: str  # a key of _LEAVES
    channels: int  # input channels (features of a linear layer)
    out: int  # output channels


_LEAVES: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "linear": {"": (("",), "copy")},
    "conv": {"": (("",), "copy")},
    "norm": {"": (("",), "copy")},
    "resblock": {
        "in_layers.0": (("norm1",), "copy"),
        "in_layers.2": (("conv1",), "copy"),
        "emb_layers.1": (("time_emb_proj",), "copy"),
        "out_layers.0": (("norm2",), "copy"),
        "out_layers.3": (("conv2",), "copy"),
        "skip_connection": (("conv_shortcut",), "copy"),
    },
    "attention": {
        "norm": (("group_norm",), "copy"),
        "qkv": (("to_q", "to_k", "to_v"), "qkv"),
        "proj_out": (("to_out.0",), "conv1d_to_linear"),
    },
    "downsample": {"op": (("conv",), "copy")},
    "upsample": {"conv": (("conv",), "copy")},
}
"""Per module kind: guided-diffusion submodule -> (diffusers submodule(s), tensor transform)."""


def _resolve_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``flags`` into the defaults; reject unknown names and class-conditional models."""
    unknown = sorted(set(flags) - set(GUIDED_DIFFUSION_DEFAULTS))
    if unknown:
        raise TypeError(
            f"unknown guided-diffusion flag(s) {unknown}; valid flags: {sorted(GUIDED_DIFFUSION_DEFAULTS)}"
        )
    resolved = {**GUIDED_DIFFUSION_DEFAULTS, **flags}
    if resolved["class_cond"]:
        raise NotImplementedError("class-conditional guided-diffusion models (class_cond=True) are not supported")
    return resolved


def channel_multipliers(image_size: int, channel_mult: str = "") -> tuple[float, ...]:
    """Per-level channel multipliers, by guided-diffusion's ``create_model`` rule.

    An empty ``channel_mult`` picks the default for ``image_size``; a comma string such as
    ``"1,2,2"`` overrides it.
    """
    if channel_mult == "":
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"unsupported image size {image_size} without channel_mult; "
                f"defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)}"
            )
        return _DEFAULT_CHANNEL_MULT[image_size]
    return tuple(int(mult) for mult in channel_mult.split(","))


def attention_downsample_factors(image_size: int, attention_resolutions: str) -> set[int]:
    """Downsample factors ``image_size // res`` at which guided-diffusion puts attention."""
    return {image_size // int(res) for res in attention_resolutions.split(",")}


def _attention_head_dim(flags: Mapping[str, Any], down_mid_channels: list[int], up_channels: list[int]) -> int:
    """The single attention head width diffusers needs, from guided-diffusion's head flags."""
    head_channels = flags["num_head_channels"]
    if head_channels != -1:
        bad = sorted({ch for ch in down_mid_channels + up_channels if ch % head_channels})
        head_dims = {head_channels}
    else:
        up_heads = flags["num_heads"] if flags["num_heads_upsample"] == -1 else flags["num_heads_upsample"]
        layers = [(ch, flags["num_heads"]) for ch in down_mid_channels] + [(ch, up_heads) for ch in up_channels]
        bad = sorted({ch for ch, heads in layers if ch % heads})
        head_dims = {ch // heads for ch, heads in layers}
    if bad:
        raise ValueError(f"attention channels {bad} cannot be split into heads with the given head flags")
    if len(head_dims) != 1:
        raise NotImplementedError(
            f"these flags give attention head widths {sorted(head_dims)}; diffusers' UNet2DModel "
            "supports one head width for all attention blocks (set num_head_channels)"
        )
    return head_dims.pop()


def unet_config_from_flags(**flags: Any) -> dict[str, Any]:
    """The ``UNet2DModel`` config equivalent to guided-diffusion's ``create_model(**flags)``."""
    resolved = _resolve_flags(flags)
    mults = channel_multipliers(resolved["image_size"], resolved["channel_mult"])
    if mults[0] != 1:
        raise NotImplementedError(
            f"channel_mult {mults} starts with {mults[0]}: diffusers ties the timestep embedding width to "
            "the first level's channels, guided-diffusion to num_channels; only channel_mult[0] == 1 is supported"
        )
    channels = tuple(int(mult * resolved["num_channels"]) for mult in mults)
    attention_ds = attention_downsample_factors(resolved["image_size"], resolved["attention_resolutions"])
    has_attention = [2**level in attention_ds for level in range(len(channels))]
    attention_channels = [ch for ch, attn in zip(channels, has_attention) if attn]
    head_dim = _attention_head_dim(resolved, attention_channels + [channels[-1]], attention_channels)

    updown = bool(resolved["resblock_updown"])
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    in_channels = resolved["in_channels"]
    return {
        "sample_size": resolved["image_size"],
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if resolved["learn_sigma"] else in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple("AttnDownBlock2D" if attn else plain_down for attn in has_attention),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple("AttnUpBlock2D" if attn else plain_up for attn in reversed(has_attention)),
        "block_out_channels": channels,
        "layers_per_block": resolved["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": float(resolved["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": _GROUPS,
        "attn_norm_num_groups": _GROUPS,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if resolved["use_scale_shift_norm"] else "default",
        "add_attention": True,
    }


def _join(*parts: str) -> str:
    """Dotted name from the non-empty ``parts``."""
    return ".".join(part for part in parts if part)


def _modules(config: Mapping[str, Any]) -> list[_Module]:
    """Every module with weights of the guided-diffusion UNet that a ``unet_config_from_flags`` config
    describes, in guided-diffusion's registration order (its state dict's), with its diffusers name and
    channels: the one walk of the layout, behind the converter's rules and :func:`checkpoint_shapes`."""
    channels = config["block_out_channels"]
    base, emb, last = channels[0], 4 * channels[0], channels[-1]  # channel_mult[0] == 1: base is num_channels
    head = [_Module("time_embed.0", "time_embedding.linear_1", "linear", base, emb),
            _Module("time_embed.2", "time_embedding.linear_2", "linear", emb, emb),
            _Module("input_blocks.0.0", "conv_in", "conv", config["in_channels"], base)]
    down, skips = _input_blocks(config)
    middle = [_Module("middle_block.0", "mid_block.resnets.0", "resblock", last, last),
              _Module("middle_block.1", "mid_block.attentions.0", "attention", last, last),
              _Module("middle_block.2", "mid_block.resnets.1", "resblock", last, last)]
    tail = [_Module("out.0", "conv_norm_out", "norm", base, base),
            _Module("out.2", "conv_out", "conv", base, config["out_channels"])]
    return head + down + middle + _output_blocks(config, skips) + tail


def _input_blocks(config: Mapping[str, Any]) -> tuple[list[_Module], list[int]]:
    """``input_blocks.k`` after conv_in: per level ``num_res_blocks`` blocks (ResBlock[, attention]),
    then (all levels but the last) a downsample block; and the output channels of every input block,
    conv_in's first (the skip connections the output blocks take, last first)."""
    channels, blocks = config["block_out_channels"], config["layers_per_block"]
    downsample = "resblock" if config["downsample_type"] == "resnet" else "downsample"
    modules, skips, ch, k = [], [channels[0]], channels[0], 1
    for level, block_type in enumerate(config["down_block_types"]):
        for i in range(blocks):
            modules.append(_Module(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{i}", "resblock", ch,
                                   channels[level]))
            ch = channels[level]
            if block_type.startswith("Attn"):
                modules.append(_Module(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{i}", "attention",
                                       ch, ch))
            skips.append(ch)
            k += 1
        if level < len(channels) - 1:
            modules.append(_Module(f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", downsample, ch, ch))
            skips.append(ch)
            k += 1
    return modules, skips


def _output_blocks(config: Mapping[str, Any], skips: list[int]) -> list[_Module]:
    """``output_blocks.k``: the levels in reverse, ``num_res_blocks + 1`` blocks per level
    (ResBlock on the concatenated skip[, attention][, upsample after the level's last block])."""
    channels, blocks = config["block_out_channels"], config["layers_per_block"]
    upsample = "resblock" if config["upsample_type"] == "resnet" else "upsample"
    modules, remaining, ch, k = [], list(skips), channels[-1], 0
    for j, block_type in enumerate(config["up_block_types"]):
        level, attention = len(channels) - 1 - j, block_type.startswith("Attn")
        for i in range(blocks + 1):
            modules.append(_Module(f"output_blocks.{k}.0", f"up_blocks.{j}.resnets.{i}", "resblock",
                                   ch + remaining.pop(), channels[level]))
            ch = channels[level]
            if attention:
                modules.append(_Module(f"output_blocks.{k}.1", f"up_blocks.{j}.attentions.{i}", "attention", ch, ch))
            if level > 0 and i == blocks:
                modules.append(_Module(f"output_blocks.{k}.{1 + attention}", f"up_blocks.{j}.upsamplers.0", upsample,
                                       ch, ch))
            k += 1
    return modules


def _weight_shapes(module: _Module, emb: int, scale_shift: bool) -> dict[str, tuple[int, ...]]:
    """Submodule -> weight shape of one guided-diffusion module (every bias is (weight.shape[0],));
    a ResBlock has a skip_connection only when it changes the channels."""
    c, o = module.channels, module.out
    if module.kind == "linear":
        return {"": (o, c)}
    if module.kind == "conv":
        return {"": (o, c, 3, 3)}
    if module.kind == "norm":
        return {"": (c,)}
    if module.kind == "attention":
        return {"norm": (c,), "qkv": (3 * c, c, 1), "proj_out": (c, c, 1)}  # Conv1d, kernel 1
    if module.kind == "resblock":
        shapes = {"in_layers.0": (c,), "in_layers.2": (o, c, 3, 3), "emb_layers.1": (2 * o if scale_shift else o, emb),
                  "out_layers.0": (o,), "out_layers.3": (o, o, 3, 3)}
        return shapes | ({"skip_connection": (o, c, 1, 1)} if o != c else {})
    (leaf,) = _LEAVES[module.kind]  # downsample "op", upsample "conv"
    return {leaf: (o, c, 3, 3)}


def checkpoint_shapes(**flags: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of guided-diffusion's ``UNetModel`` built by ``create_model(**flags)``,
    in its order (flags as :func:`convert_checkpoint` takes them): the tensors a checkpoint of these flags
    holds, from the converter's own walk of the layout (:func:`_modules`)."""
    config = unet_config_from_flags(**flags)
    emb, scale_shift = 4 * config["block_out_channels"][0], config["resnet_time_scale_shift"] == "scale_shift"
    shapes: dict[str, tuple[int, ...]] = {}
    for module in _modules(config):
        for leaf, shape in _weight_shapes(module, emb, scale_shift).items():
            shapes[_join(module.source, leaf, "weight")] = shape
            shapes[_join(module.source, leaf, "bias")] = shape[:1]
    return shapes


def _conversion_rules(config: Mapping[str, Any]) -> dict[str, _Rule]:
    """Source state-dict key -> rule, for every tensor a guided-diffusion UNet of ``config`` has."""
    rules = {}
    for module in _modules(config):
        for src_leaf, (dst_leaves, transform) in _LEAVES[module.kind].items():
            for param in ("weight", "bias"):
                targets = tuple(_join(module.target, dst_leaf, param) for dst_leaf in dst_leaves)
                rules[_join(module.source, src_leaf, param)] = _Rule(targets, transform)
    return rules


def _conv1d_to_linear(tensor: torch.Tensor) -> torch.Tensor:
    """Drop the kernel axis of a kernel-size-1 Conv1d weight (biases pass through)."""
    return tensor.squeeze(-1) if tensor.dim() == 3 and tensor.shape[-1] == 1 else tensor


def split_qkv(qkv: torch.Tensor, head_dim: int, legacy_order: bool) -> tuple[torch.Tensor, ...] | None:
    """Split a guided-diffusion ``qkv`` weight ``(3C, C[, 1])`` or bias ``(3C,)`` into q, k, v.

    ``legacy_order`` (``QKVAttentionLegacy``): rows are ``(heads, 3, head_dim)``; otherwise
    (``QKVAttention``) ``(3, heads, head_dim)``. Returns None if the rows do not divide. The
    parts are fresh tensors, so q, k and v never share storage with each other or ``qkv``.
    """
    rows, rest = qkv.shape[0], qkv.shape[1:]
    if rows % (3 * head_dim):
        return None
    heads = rows // (3 * head_dim)
    layout = (heads, 3, head_dim) if legacy_order else (3, heads, head_dim)
    grouped = qkv.reshape(*layout, *rest)
    parts = [grouped[:, i] if legacy_order else grouped[i] for i in range(3)]
    return tuple(_conv1d_to_linear(part.reshape(heads * head_dim, *rest)).clone() for part in parts)


def _transform(tensor: torch.Tensor, rule: _Rule, head_dim: int, legacy_order: bool) -> tuple[torch.Tensor, ...] | None:
    """The target tensor(s) of ``rule``; None if a qkv tensor cannot be split."""
    if rule.kind == "qkv":
        return split_qkv(tensor, head_dim, legacy_order)
    if rule.kind == "conv1d_to_linear":
        return (_conv1d_to_linear(tensor),)
    return (tensor,)


def _listing(title: str, items: list[str]) -> str:
    """``count title: first few items`` for an error message."""
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"  {len(items)} {title}: " + ", ".join(items[:_SHOWN]) + more


def _convert_tensors(
    state_dict: Mapping[str, torch.Tensor],
    rules: Mapping[str, _Rule],
    target: Mapping[str, torch.Tensor],
    head_dim: int,
    legacy_order: bool,
) -> dict[str, torch.Tensor]:
    """Rename/reshape every source tensor to the target's names, shapes and dtypes.

    Raises ValueError listing unmapped source keys, missing target keys and shape mismatches.
    """
    converted: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    unmapped, mismatched = [], []
    for key, tensor in state_dict.items():
        rule = rules.get(key)
        if rule is None or not all(name in target for name in rule.targets):
            unmapped.append(key)
            continue
        covered.update(rule.targets)
        parts = _transform(tensor, rule, head_dim, legacy_order)
        if parts is None:
            mismatched.append(f"{key} {tuple(tensor.shape)} does not split into q, k, v of head width {head_dim}")
            continue
        for name, part in zip(rule.targets, parts):
            if part.shape != target[name].shape:
                mismatched.append(f"{key} -> {name}: got {tuple(part.shape)}, expected {tuple(target[name].shape)}")
            else:
                converted[name] = part.to(dtype=target[name].dtype).contiguous()
    source_of = {name: key for key, rule in rules.items() for name in rule.targets}
    missing = [f"{name} (from {source_of.get(name, '?')})" for name in target if name not in covered]
    if unmapped or missing or mismatched:
        problems = [
            _listing(title, items)
            for title, items in (
                ("unmapped source key(s)", unmapped),
                ("missing target key(s)", missing),
                ("shape mismatch(es)", mismatched),
            )
            if items
        ]
        raise ValueError(
            "state dict does not match the guided-diffusion UNet described by the flags:\n" + "\n".join(problems)
        )
    return converted


def convert_checkpoint(state_dict: Mapping[str, torch.Tensor], **flags: Any) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` (eval mode, float32) equivalent to a guided-diffusion UNet.

    ``flags`` are guided-diffusion's ``create_model`` arguments (see
    :data:`GUIDED_DIFFUSION_DEFAULTS`). Every tensor of ``state_dict`` must map onto the model
    with the right shape, else ValueError. Float32 tensors that need no reordering are adopted,
    not copied: the model shares their storage with ``state_dict``.
    """
    config = unet_config_from_flags(**flags)
    with torch.device("meta"):
        model = UNet2DModel(**config)
    converted = _convert_tensors(
        state_dict,
        _conversion_rules(config),
        model.state_dict(),
        config["attention_head_dim"],
        legacy_order=not _resolve_flags(flags)["use_new_attention_order"],
    )
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def _looks_like_guided_diffusion(obj: object) -> bool:
    """Whether ``obj`` is a str -> tensor mapping with guided-diffusion's UNet key names."""
    return (
        isinstance(obj, Mapping)
        and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items())
        and {"input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight", "out.2.weight"} <= set(obj)
    )


def load_guided_diffusion_unet(path: str | Path, **flags: Any) -> UNet2DModel:
    """Load a guided-diffusion ``.pt`` state dict and convert it (see :func:`convert_checkpoint`).

    Raises FileNotFoundError for a missing file and ValueError (naming ``path``) for a file that
    is not a guided-diffusion UNet state dict matching ``flags``.
    """
    unet_config_from_flags(**flags)  # reject bad flags before reading a large file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"guided-diffusion checkpoint not found: {path}")
    from medcert_core.io import UnsafeFileError, load_weights

    try:
        state_dict = load_weights(path)  # tensors only: a file that needs code to unpickle is refused
    except UnsafeFileError:
        raise
    except ValueError as err:
        raise ValueError(f"{path} is not a readable PyTorch state dict of tensors ({type(err.__cause__).__name__}); "
                         f"expected OpenAI's guided-diffusion UNet checkpoint, e.g. 256x256_diffusion_uncond.pt") from err
    if not _looks_like_guided_diffusion(state_dict):
        raise ValueError(
            f"{path} does not look like a guided-diffusion UNet state dict "
            "(expected a dict of tensors named input_blocks.*, middle_block.*, output_blocks.*, out.*)"
        )
    try:
        return convert_checkpoint(state_dict, **flags)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
