"""Diffusers' ``UNet2DModel`` (Ho et al.'s DDPM UNet, e.g. google/ddpm-cifar10-32) as our UNet, exactly.

Reads the plain config dict (``config.json``) and a state dict of tensors, so it runs without
diffusers. What our UNet cannot compute exactly raises ImportSourceError naming the config key and
value: the caller then wraps the diffusers model instead; nothing here approximates.
"""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ddae_core.config import ConfigError
from ddae_core.nn.unet import NETWORKS, UNet, UNetConfig, unet_layout
from ddae_core.pretrained.errors import ImportSourceError

# UNet2DModel.__init__'s defaults (diffusers 0.42.1): a config.json may leave keys out, and diffusers then
# builds with these; one without attention_head_dim gets heads 8 channels wide, not one head per layer.
DIFFUSERS_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
})

# keys whose value must be one of these for our UNet to compute the same function
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),  # both are SiLU in diffusers
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> its res blocks end in attention
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_DOWN_PADDING = {0: "tf_same", 1: "symmetric"}  # diffusers' downsample_padding -> ours

# UNetConfig fields that change neither parameter shapes nor block layout (so not the paper's names)
NUMERICS_ONLY = ("dropout", "norm_eps", "freq_shift", "flip_sin_to_cos", "down_padding", "num_heads",
                 "norm_groups", "head_norm_groups", "zero_init_output")


def _fail(key: str, value: Any, why: str) -> ImportSourceError:
    return ImportSourceError(f"diffusers UNet2DModel config: {key}={value!r}: {why}")


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as diffusers builds from it: defaults filled in, bookkeeping keys (``_...``) dropped."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _fail("_class_name", config["_class_name"], "only UNet2DModel converts")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise _fail(unknown[0], config[unknown[0]], "unknown key (diffusers 0.42.1 has no such UNet2DModel option)")
    settings = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, allowed in _REQUIRED.items():
        if settings[key] not in allowed:
            raise _fail(key, settings[key], f"our UNet supports only {' or '.join(map(repr, allowed))}")
    return settings


def _int(settings: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, value, f"expected an integer >= {minimum}")
    return value


def _number(settings: Mapping[str, Any], key: str) -> float:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, value, "expected a number")
    return float(value)


def _num_heads(settings: Mapping[str, Any], widths: list[int], attn: list[bool], mid_attn: bool) -> int:
    """The one head count of every attention layer (diffusers: width // attention_head_dim, per layer)."""
    head_dim = settings["attention_head_dim"]
    sites = [w for w, a in zip(widths, attn) if a] + ([widths[-1]] if mid_attn else [])
    if head_dim is None:
        return 1  # diffusers then gives every attention layer one head of its full width
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise _fail("attention_head_dim", head_dim, "expected null or an integer >= 1")
    for width in sites:
        if width % head_dim:
            raise _fail("attention_head_dim", head_dim, f"does not divide an attention width {width}")
    heads = sorted({w // head_dim for w in sites})
    if len(heads) > 1:
        raise _fail("attention_head_dim", head_dim, f"gives head counts {heads} at widths {sorted(set(sites))}; "
                                                    "our UNet has one count for every attention layer")
    return heads[0] if heads else 1


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """A diffusers ``UNet2DModel`` config dict -> the UNetConfig that computes the same function."""
    settings = _settings(config)
    widths = list(settings["block_out_channels"])
    down, up = list(settings["down_block_types"]), list(settings["up_block_types"])
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise _fail("block_out_channels", widths, f"needs one width per down and up block ({len(down)}, {len(up)})")
    for i, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1 or width % widths[0]:
            raise _fail(f"block_out_channels[{i}]", width, f"not a whole multiple of the first width {widths[0]}")
    # diffusers strips a "UNetRes" prefix from block type names
    down = [t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t for t in down]
    up = [t[7:] if isinstance(t, str) and t.startswith("UNetRes") else t for t in up]
    for i, kind in enumerate(down):
        if kind not in _DOWN:
            raise _fail(f"down_block_types[{i}]", kind, f"our UNet has only {' and '.join(_DOWN)}")
    for i, kind in enumerate(up):
        if kind not in _UP:
            raise _fail(f"up_block_types[{i}]", kind, f"our UNet has only {' and '.join(_UP)}")
    attn = [_DOWN[kind] for kind in down]
    for k, kind in enumerate(up):  # up block k works on level L-1-k
        if _UP[kind] != attn[len(widths) - 1 - k]:
            raise _fail(f"up_block_types[{k}]", kind, f"attention differs from down_block_types[{len(widths) - 1 - k}] "
                                                      f"{down[len(widths) - 1 - k]!r}; ours has it on both or neither")
    size = settings["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int):
        raise _fail("sample_size", settings["sample_size"], "expected one square size (it names the attention levels)")
    groups = _int(settings, "norm_num_groups")
    if settings["attn_norm_num_groups"] not in (None, groups):
        raise _fail("attn_norm_num_groups", settings["attn_norm_num_groups"],
                    f"differs from norm_num_groups {groups}; ours has one group count")
    if settings["time_embedding_dim"] not in (None, 4 * widths[0]):
        raise _fail("time_embedding_dim", settings["time_embedding_dim"], f"ours is 4 x {widths[0]} = {4 * widths[0]}")
    if settings["downsample_padding"] not in _DOWN_PADDING:
        raise _fail("downsample_padding", settings["downsample_padding"], "ours is 0 (TF 'SAME') or 1")
    if not isinstance(settings["add_attention"], bool) or not isinstance(settings["flip_sin_to_cos"], bool):
        key = "add_attention" if not isinstance(settings["add_attention"], bool) else "flip_sin_to_cos"
        raise _fail(key, settings[key], "expected true or false")
    levels = [size // 2**i for i in range(len(widths))]
    in_channels, out_channels = _int(settings, "in_channels"), _int(settings, "out_channels")
    fields = dict(
        in_channels=in_channels,
        resolution=size,
        base_channels=widths[0],
        channel_mults=tuple(w // widths[0] for w in widths),
        num_res_blocks=_int(settings, "layers_per_block"),
        attn_resolutions=tuple(r for r, a in zip(levels, attn) if a),
        dropout=_number(settings, "dropout"),
        resample="conv",
        num_heads=_num_heads(settings, widths, attn, settings["add_attention"]),
        out_channels=None if out_channels == in_channels else out_channels,
        mid_attn=settings["add_attention"],
        norm_groups=groups,  # conv_norm_out too: the head keeps the body's groups (head_norm_groups unset)
        norm_eps=_number(settings, "norm_eps"),
        freq_shift=_number(settings, "freq_shift"),
        flip_sin_to_cos=settings["flip_sin_to_cos"],
        down_padding=_DOWN_PADDING[settings["downsample_padding"]],
    )
    try:
        return UNetConfig(**fields)
    except ConfigError as err:
        raise ImportSourceError(f"diffusers UNet2DModel config: not representable: {err}") from None


def _block_prefixes(config: UNetConfig) -> dict[str, str]:
    """Our module path -> diffusers' for every block with parameters (attention layers separately)."""
    levels = config.level_resolutions()
    last = len(levels) - 1
    prefixes = {
        "stem": "conv_in", "embed.mlp.0": "time_embedding.linear_1", "embed.mlp.2": "time_embedding.linear_2",
        "head.0": "conv_norm_out", "head.2": "conv_out",
        "mid.res0": "mid_block.resnets.0", "mid.attn": "mid_block.attentions.0", "mid.res1": "mid_block.resnets.1",
    }
    for spec in unet_layout(config):
        if spec.name.startswith("mid."):
            continue  # above
        stage, size, block = spec.name.split(".")  # enc.16x16.res1: up block k holds level L-1-k
        level = levels.index(int(size.split("x")[0]))
        parent = f"down_blocks.{level}" if stage == "enc" else f"up_blocks.{last - level}"
        if block == "down":
            prefixes[spec.name] = f"{parent}.downsamplers.0"
        elif block == "up":
            prefixes[spec.name] = f"{parent}.upsamplers.0"
        else:
            index = int(block.removeprefix("res"))
            prefixes[spec.name] = f"{parent}.resnets.{index}"
            if spec.attn:
                prefixes[f"{spec.name}.attn"] = f"{parent}.attentions.{index}"
    return prefixes


_RES_PARTS = {"emb_proj.1": "time_emb_proj", "skip": "conv_shortcut"}  # ResBlock part -> ResnetBlock2D's
_ATTN_PARTS = {"norm": "group_norm", "proj": "to_out.0"}  # SelfAttention part -> Attention's (qkv apart)
_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Attention weights under diffusers' pre-0.14 names (query, key, value, proj_attn) renamed, as
    diffusers itself does when it loads such a file."""
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _LEGACY_ATTN.match(key)
        new = f"{match[1]}.{_LEGACY_NAMES[match[2]]}.{match[3]}" if match else key
        if new in renamed:
            raise ImportSourceError(f"diffusers state dict: {key} and {new} are the same weight under two names")
        renamed[new] = value
    return renamed


Recipe = tuple[list[str], list[tuple[int, ...]], Callable[[list[Tensor]], Tensor]]


def _recipe(key: str, shape: torch.Size, prefixes: Mapping[str, str]) -> Recipe:
    """For one of our keys: the diffusers keys it is made from, their expected shapes, how to combine them."""
    module, _, name = key.rpartition(".")
    owner = max((p for p in prefixes if module == p or module.startswith(p + ".")), key=len, default=None)
    if owner is None:
        raise ImportSourceError(f"diffusers state dict: no diffusers counterpart for our {key}")
    part = module[len(owner) + 1:]
    theirs = prefixes[owner]
    if ".attentions." in theirs:
        if part == "qkv":  # (3C, C, 1, 1) 1x1 conv = to_q, to_k, to_v stacked along the outputs
            third = (shape[0] // 3, *shape[1:2])
            return ([f"{theirs}.to_{x}.{name}" for x in "qkv"], [third] * 3,
                    lambda ts: torch.cat(ts, 0).reshape(shape))
        if part == "proj":  # (C, C, 1, 1) 1x1 conv = to_out.0 Linear
            return [f"{theirs}.to_out.0.{name}"], [tuple(shape[:2])], lambda ts: ts[0].reshape(shape)
        part = _ATTN_PARTS.get(part, part)
    else:
        part = _RES_PARTS.get(part, part)
    source = ".".join(p for p in (theirs, part, name) if p)
    return [source], [tuple(shape)], lambda ts: ts[0]


def convert_unet_state(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers ``UNet2DModel`` state dict -> our UNet's, for ``unet_config_from_diffusers(config)``.

    Every diffusers tensor is used once and every one of ours is made, at its exact shape; a key left
    over, missing or misshapen raises ImportSourceError naming it.
    """
    ours = unet_config_from_diffusers(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(ours).state_dict().items()}
    source = _current_names(state)
    prefixes = _block_prefixes(ours)
    converted: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, shape in shapes.items():
        names, expected, combine = _recipe(key, shape, prefixes)
        tensors = []
        for name, want in zip(names, expected):
            if name not in source:
                raise ImportSourceError(f"diffusers state dict: {name} missing (needed for our {key})")
            tensor = source[name]
            if tuple(tensor.shape) != want:
                raise ImportSourceError(f"diffusers state dict: {name} has shape {tuple(tensor.shape)}, "
                                        f"our {key} needs {want}")
            tensors.append(tensor)
            used.add(name)
        converted[key] = combine(tensors)
    unused = [name for name in source if name not in used]
    if unused:
        raise ImportSourceError(f"diffusers state dict: {unused[0]} is not used by our UNet "
                                f"({len(unused)} unused key(s))")
    return converted


def unet_from_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> UNet:
    """Our UNet, built from a diffusers config dict and loaded (strictly) with its converted weights."""
    unet = UNet(unet_config_from_diffusers(config))
    unet.load_state_dict(convert_unet_state(state, config), strict=True)
    return unet


def matching_network(unet_config: UNetConfig) -> str | None:
    """The name in NETWORKS whose configuration at this input shape has this architecture, else None.

    Architecture is the block layout and every parameter shape: the ``NUMERICS_ONLY`` fields (dropout,
    GroupNorm groups (the head's too) and eps, sinusoid shift and order, down padding, head count) are not compared, so
    a DDPM from elsewhere keeps the paper's names and tap aliases (``ddpm-35m``, ``out_6``).
    """
    for name, factory in NETWORKS.items():
        try:
            candidate = factory(in_channels=unet_config.in_channels, resolution=unet_config.resolution)
        except ValueError:
            continue  # this network does not fit the input shape
        same = {field: getattr(candidate, field) for field in NUMERICS_ONLY}
        if dataclasses.replace(unet_config, **same, out_channels=candidate.out_channels) == candidate \
                and unet_config.output_channels == candidate.output_channels:
            return name
    return None
