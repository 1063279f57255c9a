"""Building blocks of the denoising UNet: noise-label embedding, GroupNorm, ResBlock, attention, resampling.

Every block that sits in the UNet's encoder or decoder takes ``(x, emb)`` so the UNet can run its
blocks in one loop; blocks that ignore the embedding say so.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Resample = Literal["none", "down", "up"]


def group_norm(channels: int, max_groups: int = 32, min_group_channels: int = 4) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer for narrow layers (small nets).

    Groups keep at least ``min_group_channels`` channels: with one channel per group the norm would
    erase the per-channel noise-embedding shift added just before it, and the net would ignore the label.
    """
    limit = max(1, min(max_groups, channels // min_group_channels))
    groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def sinusoidal_embedding(label: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style sin/cos features of a real-valued label; (N,) -> (N, dim).

    Frequencies run geometrically from 1 to 1/max_period, so integer DDPM steps (0..1000) and EDM's
    ``ln(sigma)/4`` (about -2..1) both land on distinct, smooth codes.
    """
    if dim % 2:
        raise ValueError(f"dim: must be even, got {dim}")
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=label.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)  # (half,) in (1/max_period, 1]
    args = label.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (N, dim) in [-1, 1]


class NoiseEmbedding(nn.Module):
    """Noise label -> conditioning vector: sinusoid of width ``dim``, then a two-layer SiLU MLP."""

    def __init__(self, dim: int, emb_channels: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, label: Tensor) -> Tensor:
        # label: (N,) float, any real value -> (N, emb_channels)
        return self.mlp(sinusoidal_embedding(label, self.dim))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-normed, added back residually."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W) -> (N, C, H, W)
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        # contiguous q, k, v let scaled_dot_product_attention take its fused CPU kernel
        q, k, v = (qkv[:, i].transpose(-1, -2).contiguous() for i in range(3))  # (N, heads, H*W, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, H*W, C/heads)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


def _resampler(mode: Resample) -> nn.Module:
    """Parameter-free resampling used inside BigGAN-style residual blocks."""
    if mode == "down":
        return nn.AvgPool2d(2)
    if mode == "up":
        return nn.Upsample(scale_factor=2.0, mode="nearest")
    return nn.Identity()


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on the noise embedding, with optional attention.

    ``GN -> SiLU -> [resample] -> conv -> + proj(emb) -> GN -> SiLU -> dropout -> conv``, plus a 1x1
    skip when the width changes. ``resample`` makes it a BigGAN-style up/down block (the skip path is
    resampled too). With ``attn`` the block's output is taken after the attention, as in the paper's code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        attn: bool = False,
        num_heads: int = 1,
        resample: Resample = "none",
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.resample = _resampler(resample)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        self.attn = SelfAttention(out_channels, num_heads) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: (N, C_in, H, W), emb: (N, E) -> (N, C_out, H', W'); H' = H, H/2 (down) or 2H (up)
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + self.skip(self.resample(x))
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    """DDPM down-sampling: 3x3 convolution with stride 2 (halves H and W). Ignores the embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # x: (N, C, H, W) -> (N, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    """DDPM up-sampling: nearest-neighbour x2, then a 3x3 convolution. Ignores the embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # x: (N, C, H, W) -> (N, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
