"""The denoising UNet with named, hookable blocks, the paper's configurations and its alias table.

Block names are real module paths (``net.get_submodule("dec.8x8.res2")``): ``enc.<R>x<R>.res<i>``,
``enc.<R>x<R>.down``, ``mid.res0``, ``mid.attn``, ``mid.res1``, ``dec.<R>x<R>.res<i>``, ``dec.<R>x<R>.up``,
where ``R`` is the resolution a level works at. One layout function decides names, widths and order, so
the module tree, ``tap_names`` and ``paper_aliases`` cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ddae_core.config import ConfigError, as_dict, section_from_dict
from ddae_core.nn.layers import (
    DownPadding,
    Downsample,
    NoiseEmbedding,
    ResBlock,
    SelfAttention,
    Upsample,
    group_norm,
)

KIND = "unet"  # network.json's kind for our own UNet (files written before kinds existed have none: ours)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class UNetConfig:
    """Shape and size of a UNet; JSON-friendly through ``to_dict``/``from_dict``."""

    in_channels: int = 3
    resolution: int = 32  # square input H = W; divisible by 2**(len(channel_mults) - 1)
    base_channels: int = 128  # width after the stem; the noise embedding MLP is 4x this
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # width of level i = base_channels * channel_mults[i]
    num_res_blocks: int = 2  # per encoder level; decoder levels have one more (they eat the down skip)
    attn_resolutions: tuple[int, ...] = (16,)  # levels (by resolution) whose res blocks end in attention
    dropout: float = 0.1
    resample: Literal["conv", "biggan"] = "conv"  # DDPM strided conv / nearest+conv, or BigGAN res blocks
    num_heads: int = 1  # attention heads (the official code uses one)
    out_channels: int | None = None  # None = in_channels
    mid_attn: bool = True  # attention between the two middle res blocks
    zero_init_output: bool = True  # DDPM zero-inits the last conv; False gives an all-random network
    # numerics of networks trained elsewhere (diffusers' UNet2DModel); the defaults are ours
    norm_groups: int | None = None  # groups of every GroupNorm; None = 32, fewer for narrow layers (>= 4 ch each)
    head_norm_groups: int | None = None  # the output head's GroupNorm only; None = as norm_groups (official DDAE: 8)
    norm_eps: float = 1e-5  # epsilon of every GroupNorm (DDPM's code: 1e-6)
    freq_shift: float = 0.0  # sinusoid frequency i = 10000 ** (-i / (base_channels/2 - freq_shift)); DDPM: 1
    flip_sin_to_cos: bool = False  # sinusoid halves as [cos, sin] instead of [sin, cos]
    down_padding: DownPadding = "symmetric"  # conv down-sampling: pad 1 all round, or TF "SAME" (DDPM's code)

    def __post_init__(self) -> None:
        _require(self.in_channels >= 1, "in_channels", f"must be >= 1, got {self.in_channels}")
        _require(
            self.base_channels >= 2 and self.base_channels % 2 == 0,
            "base_channels",
            f"must be an even number >= 2 (sinusoid width), got {self.base_channels}",
        )
        _require(len(self.channel_mults) >= 1, "channel_mults", "list at least one level")
        for i, mult in enumerate(self.channel_mults):
            _require(mult >= 1, f"channel_mults[{i}]", f"must be >= 1, got {mult}")
        factor = 2 ** (len(self.channel_mults) - 1)
        _require(
            self.resolution >= 1 and self.resolution % factor == 0,
            "resolution",
            f"must be a positive multiple of {factor} (2**(len(channel_mults)-1)), got {self.resolution}",
        )
        _require(self.num_res_blocks >= 1, "num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        levels = self.level_resolutions()
        for i, res in enumerate(self.attn_resolutions):
            _require(res in levels, f"attn_resolutions[{i}]", f"{res} is not a level resolution {levels}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.resample in ("conv", "biggan"), "resample", f"must be 'conv' or 'biggan', got {self.resample!r}")
        _require(self.num_heads >= 1, "num_heads", f"must be >= 1, got {self.num_heads}")
        attn_widths = [self.base_channels * m for m, r in zip(self.channel_mults, levels) if r in self.attn_resolutions]
        if self.mid_attn:
            attn_widths.append(self.base_channels * self.channel_mults[-1])
        for width in attn_widths:
            _require(width % self.num_heads == 0, "num_heads", f"{self.num_heads} does not divide {width} channels")
        if self.out_channels is not None:
            _require(self.out_channels >= 1, "out_channels", f"must be >= 1 or null, got {self.out_channels}")
        _require(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        half = self.base_channels // 2
        _require(self.freq_shift < half, "freq_shift", f"must be below base_channels/2 = {half}, got {self.freq_shift}")
        _require(
            self.down_padding in ("symmetric", "tf_same"),
            "down_padding",
            f"must be 'symmetric' or 'tf_same', got {self.down_padding!r}",
        )
        _require(
            self.resample == "conv" or self.down_padding == "symmetric",
            "down_padding",
            f"{self.down_padding!r} applies to resample 'conv' only (BigGAN blocks average-pool)",
        )
        if self.norm_groups is not None:
            _require(self.norm_groups >= 1, "norm_groups", f"must be >= 1 or null, got {self.norm_groups}")
            for spec in unet_layout(self):
                for width in (spec.in_channels, spec.out_channels):
                    _require(
                        width % self.norm_groups == 0,
                        "norm_groups",
                        f"{self.norm_groups} does not divide the {width} channels of {spec.name}",
                    )

        if self.head_norm_groups is not None:
            head = self.base_channels * self.channel_mults[0]
            _require(self.head_norm_groups >= 1 and head % self.head_norm_groups == 0, "head_norm_groups",
                     f"must be >= 1 and divide the head's {head} channels, or null; got {self.head_norm_groups}")

    def level_resolutions(self) -> tuple[int, ...]:
        """Resolution of each encoder level, top first: (32, 16, 8, 4) for 32 and four levels."""
        return tuple(self.resolution // 2**i for i in range(len(self.channel_mults)))

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def make_norm(self, channels: int) -> nn.GroupNorm:
        """A GroupNorm as every block of this network has it (``norm_groups``, ``norm_eps``)."""
        return group_norm(channels, groups=self.norm_groups, eps=self.norm_eps)

    def make_head_norm(self, channels: int) -> nn.GroupNorm:
        """The output head's GroupNorm: ``head_norm_groups`` groups where set, else as every block's."""
        if self.head_norm_groups is None:
            return self.make_norm(channels)
        return group_norm(channels, groups=self.head_norm_groups, eps=self.norm_eps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples become lists)."""
        return as_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Inverse of ``to_dict``; rejects unknown keys and wrong types, naming the key."""
        return section_from_dict(cls, data, "")


@dataclass(frozen=True)
class BlockSpec:
    """One tappable block: module path, kind, widths (decoder input includes the skip) and output size."""

    name: str
    kind: Literal["res", "down", "up", "attn"]
    in_channels: int
    out_channels: int
    resolution: int  # of the block's output
    attn: bool = False


def unet_layout(config: UNetConfig) -> list[BlockSpec]:
    """Every block of the UNet in forward order; the single source of names, widths and skips."""
    blocks: list[BlockSpec] = []
    res = config.resolution
    ch = config.base_channels
    skips = [ch]  # widths pushed for the decoder: stem, every encoder block
    last = len(config.channel_mults) - 1
    for level, mult in enumerate(config.channel_mults):
        width = config.base_channels * mult
        key = f"enc.{res}x{res}"
        for i in range(config.num_res_blocks):
            blocks.append(BlockSpec(f"{key}.res{i}", "res", ch, width, res, res in config.attn_resolutions))
            ch = width
            skips.append(ch)
        if level < last:
            blocks.append(BlockSpec(f"{key}.down", "down", ch, ch, res // 2))
            skips.append(ch)
            res //= 2
    blocks.append(BlockSpec("mid.res0", "res", ch, ch, res))
    if config.mid_attn:
        blocks.append(BlockSpec("mid.attn", "attn", ch, ch, res))
    blocks.append(BlockSpec("mid.res1", "res", ch, ch, res))
    for level in reversed(range(len(config.channel_mults))):
        width = config.base_channels * config.channel_mults[level]
        key = f"dec.{res}x{res}"
        for i in range(config.num_res_blocks + 1):
            skip = skips.pop()
            blocks.append(BlockSpec(f"{key}.res{i}", "res", ch + skip, width, res, res in config.attn_resolutions))
            ch = width
        if level > 0:
            blocks.append(BlockSpec(f"{key}.up", "up", ch, ch, res * 2))
            res *= 2
    if skips:
        raise AssertionError(f"unet_layout: {len(skips)} skip connections left unused")
    return blocks


def _make_block(spec: BlockSpec, config: UNetConfig, emb_channels: int) -> nn.Module:
    """The module for one layout entry."""
    norm = config.make_norm
    if spec.kind == "attn":
        return SelfAttention(spec.in_channels, config.num_heads, norm)
    if spec.kind == "res":
        return ResBlock(
            spec.in_channels, spec.out_channels, emb_channels, config.dropout, spec.attn, config.num_heads, norm=norm
        )
    if config.resample == "biggan":
        return ResBlock(
            spec.in_channels, spec.out_channels, emb_channels, config.dropout, resample=spec.kind, norm=norm
        )
    if spec.kind == "down":
        return Downsample(spec.in_channels, config.down_padding)
    return Upsample(spec.in_channels)


class UNet(nn.Module):
    """Noise-conditioned UNet: ``forward(x, noise_label) -> tensor shaped like x`` (out_channels aside).

    Skip connections concatenate; the noise label is embedded by a sinusoid and a 4x-wide MLP. The
    network does not know which diffusion framework feeds it: the denoiser decides the label's meaning.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        emb_channels = 4 * config.base_channels
        self.embed = NoiseEmbedding(config.base_channels, emb_channels, config.freq_shift, config.flip_sin_to_cos)
        self.stem = nn.Conv2d(config.in_channels, config.base_channels, kernel_size=3, padding=1)
        self.enc = nn.ModuleDict()
        self.mid = nn.ModuleDict()
        self.dec = nn.ModuleDict()
        for spec in unet_layout(config):
            parts = spec.name.split(".")
            parent: nn.ModuleDict = getattr(self, parts[0])
            for part in parts[1:-1]:
                if part not in parent:
                    parent[part] = nn.ModuleDict()
                parent = parent[part]
            parent[parts[-1]] = _make_block(spec, config, emb_channels)
        width = config.base_channels * config.channel_mults[0]
        self.head = nn.Sequential(
            config.make_head_norm(width), nn.SiLU(), nn.Conv2d(width, config.output_channels, kernel_size=3, padding=1)
        )
        if config.zero_init_output:
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor, noise_label: Tensor) -> Tensor:
        # x: (N, C, H, W) in [-1, 1] (scaled by the denoiser); noise_label: (N,) float -> (N, C_out, H, W)
        emb = self.embed(noise_label)  # (N, 4 * base_channels)
        h = self.stem(x)
        skips = [h]
        for level in self.enc.values():
            for block in level.values():
                h = block(h, emb)
                skips.append(h)
        h = self.mid["res0"](h, emb)
        if "attn" in self.mid:
            h = self.mid["attn"](h)
        h = self.mid["res1"](h, emb)
        for level in self.dec.values():
            for key, block in level.items():
                if key != "up":
                    h = torch.cat([h, skips.pop()], dim=1)
                h = block(h, emb)
        return self.head(h)

    def tap_names(self) -> list[str]:
        """Every hookable block name, in the order forward runs them."""
        return tap_names(self.config)

    def tap_channels(self) -> dict[str, tuple[int, int]]:
        """Block name -> (channels, resolution) of its output, in forward order."""
        return tap_channels(self.config)

    def tap_selectors(self) -> dict[str, tuple[str, ...]]:
        """Resolution-free names (``mid``, ``decoder``, ``dec1``, ``out_6``) -> blocks: ``tap_selectors``."""
        return tap_selectors(self.config)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, size) of the images it denoises."""
        return self.config.in_channels, self.config.resolution

    def spec(self) -> dict[str, Any]:
        """What rebuilds it without its weights (``network.json``): our UNet and its configuration."""
        return {"kind": KIND, "unet": self.config.to_dict()}


def tap_names(config: UNetConfig) -> list[str]:
    """Block names of the UNet built from ``config``, in forward order (no network built)."""
    return [spec.name for spec in unet_layout(config)]


def tap_channels(config: UNetConfig) -> dict[str, tuple[int, int]]:
    """Block name -> (output channels, output resolution), e.g. for sizing pooled features."""
    return {spec.name: (spec.out_channels, spec.resolution) for spec in unet_layout(config)}


def paper_aliases(config: UNetConfig) -> dict[str, str]:
    """Official DDAE feature names -> ours: ``out_k`` is the k-th decoder res block, deepest first.

    The official code counts only the up path's res(+attn) blocks, not its up-samplers, so for the
    35.7M UNet ``out_6`` is ``dec.8x8.res2`` and for DDPM++ ``out_7`` is ``dec.16x16.res1``.
    """
    decoder_res = [s.name for s in unet_layout(config) if s.kind == "res" and s.name.startswith("dec.")]
    return {f"out_{k}": name for k, name in enumerate(decoder_res, start=1)}


SELECTOR_HELP = (
    "mid (the middle block), decoder (every decoder res block, deepest first), dec1, dec2, ... (the decoder "
    "res blocks of one level, dec1 the deepest), out_N (the paper's N-th decoder res block)"
)


def tap_selectors(config: UNetConfig) -> dict[str, tuple[str, ...]]:
    """Names that do not depend on the resolution -> the blocks they stand for, in forward order.

    ``mid`` is the middle block's output (``mid.res1``); ``decoder`` every decoder res block, deepest
    first; ``dec<K>`` the res blocks of the K-th decoder level counted from the deepest; ``out_N`` the
    paper's aliases. So ``[mid, decoder]`` means the same readouts at 28x28, 32x32 or 64x64.
    """
    layout = unet_layout(config)
    decoder = [s for s in layout if s.kind == "res" and s.name.startswith("dec.")]
    selectors: dict[str, tuple[str, ...]] = {"mid": ("mid.res1",), "decoder": tuple(s.name for s in decoder)}
    for k, resolution in enumerate(dict.fromkeys(s.resolution for s in decoder), start=1):
        selectors[f"dec{k}"] = tuple(s.name for s in decoder if s.resolution == resolution)
    selectors.update({alias: (name,) for alias, name in paper_aliases(config).items()})
    return selectors


ATTENTION_SIZE = 16  # DDPM's attention resolution, kept at any input size


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --- the named configurations. Attention sits on the level nearest 16x16, as in DDPM (16x16 at 32x32 and
# at 256x256 input), so a larger input does not make attention the dominant cost. ---


def attention_level(resolution: int, levels: int, target: int = ATTENTION_SIZE) -> int:
    """The level size (``resolution / 2**i``, i < ``levels``) nearest ``target``; the larger one on a tie."""
    sizes = [resolution // 2**i for i in range(levels)]
    return min(sizes, key=lambda size: (abs(size - target), -size))


# The official DDAE code's one UNet class (both paper networks) normalises its output head with 8
# groups, every other GroupNorm with 32; groups change no parameter. Its sinusoid's frequencies are
# 10000 ** (-i / (half - 1)), i.e. our freq_shift 1 (DDPM's own code too), halves [sin, cos].
OFFICIAL_HEAD_GROUPS = 8
OFFICIAL_FREQ_SHIFT = 1.0


def ddpm_35m(*, in_channels: int = 3, resolution: int = 32) -> UNetConfig:
    """DDPM's CIFAR-10 UNet as the official DDAE code builds it: 35,746,307 parameters at 3x32x32."""
    return UNetConfig(
        in_channels=in_channels,
        resolution=resolution,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(attention_level(resolution, 4),),
        dropout=0.1,
        resample="conv",
        head_norm_groups=OFFICIAL_HEAD_GROUPS,
        freq_shift=OFFICIAL_FREQ_SHIFT,
    )


def ddpmpp_56m(*, in_channels: int = 3, resolution: int = 32) -> UNetConfig:
    """DDPM++ as in the official DDAE code: 4 blocks/level, BigGAN residual up/down; ~56.5M at 3x32x32.

    Dropout 0.1 is the DDPM setting; the official EDM run uses 0.13 (pass ``dropout=0.13``).
    """
    return UNetConfig(
        in_channels=in_channels,
        resolution=resolution,
        base_channels=128,
        channel_mults=(2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(attention_level(resolution, 3),),
        dropout=0.1,
        resample="biggan",
        head_norm_groups=OFFICIAL_HEAD_GROUPS,
        freq_shift=OFFICIAL_FREQ_SHIFT,
    )


def ddpm_small(*, in_channels: int = 1, resolution: int = 32) -> UNetConfig:
    """A ~1.6M-parameter DDPM UNet that trains on two CPU cores (28x28 or 32x32 inputs)."""
    return UNetConfig(
        in_channels=in_channels,
        resolution=resolution,
        base_channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(attention_level(resolution, 3),),
        dropout=0.1,
        resample="conv",
    )


def ddpm_cpu(*, in_channels: int = 1, resolution: int = 28) -> UNetConfig:
    """The CPU profile's ~1.1M-parameter UNet: ddpm-small with one res block per level and no dropout.

    About 2x the training images/s of ddpm-small on two cores, which buys more images seen in a
    fixed wall-time budget; dropout only slows a run that sees each image about twice.
    """
    return dataclasses.replace(
        ddpm_small(in_channels=in_channels, resolution=resolution), num_res_blocks=1, dropout=0.0
    )


def ddpm_tiny(*, in_channels: int = 1, resolution: int = 32) -> UNetConfig:
    """A very small attention-free UNet for tests and smoke runs."""
    return UNetConfig(
        in_channels=in_channels,
        resolution=resolution,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
        resample="conv",
        mid_attn=False,
    )


def ddpmpp_64(*, in_channels: int = 3, resolution: int = 64) -> UNetConfig:
    """DDPM++ for 64x64 (Tiny-ImageNet): widths 128-256-256-256, 4 blocks/level, BigGAN up/down,
    attention at 16x16, dropout 0.1."""
    return UNetConfig(
        in_channels=in_channels,
        resolution=resolution,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(attention_level(resolution, 4),),
        dropout=0.1,
        resample="biggan",
        head_norm_groups=OFFICIAL_HEAD_GROUPS,
        freq_shift=OFFICIAL_FREQ_SHIFT,
    )


NETWORKS: dict[str, Callable[..., UNetConfig]] = {
    "ddpm-35m": ddpm_35m,
    "ddpmpp-56m": ddpmpp_56m,
    "ddpm-small": ddpm_small,
    "ddpm-cpu": ddpm_cpu,
    "ddpm-tiny": ddpm_tiny,
    "ddpmpp-64": ddpmpp_64,
}


def size_multiple(name: str) -> int:
    """What the named network's input size must be a multiple of: 2 ** (down-sampling steps)."""
    if name not in NETWORKS:
        raise ValueError(f"network: unknown name {name!r} (known: {', '.join(NETWORKS)})")
    return 2 ** (len(NETWORKS[name]().channel_mults) - 1)


def network_config(
    name: str, in_channels: int | None = None, resolution: int | None = None, **overrides: Any
) -> UNetConfig:
    """The named configuration at the given input shape (None = its default), with field overrides."""
    if name not in NETWORKS:
        raise ValueError(f"network: unknown name {name!r} (known: {', '.join(NETWORKS)})")
    shape = {k: v for k, v in (("in_channels", in_channels), ("resolution", resolution)) if v is not None}
    config = NETWORKS[name](**shape)
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown UNetConfig field (known: {', '.join(sorted(fields))})")
    return dataclasses.replace(config, **overrides)


def build_unet(name: str, in_channels: int | None = None, resolution: int | None = None, **overrides: Any) -> UNet:
    """Build the named network; e.g. ``build_unet("ddpm-35m", 3, 32, dropout=0.0)``."""
    return UNet(network_config(name, in_channels, resolution, **overrides))
