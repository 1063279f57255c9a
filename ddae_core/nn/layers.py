"""Building blocks of the denoising UNet: noise-label embedding, GroupNorm, ResBlock, attention, resampling.

Every block that sits in the UNet's encoder or decoder takes ``(x, emb)`` so the UNet can run its
blocks in one loop; blocks that ignore the embedding say so.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Resample = Literal["none", "down", "up"]
DownPadding = Literal["symmetric", "tf_same"]
NormFactory = Callable[[int], nn.GroupNorm]  # channels -> GroupNorm; the UNet fixes groups and eps once


def group_norm(
    channels: int,
    max_groups: int = 32,
    min_group_channels: int = 4,
    *,
    groups: int | None = None,
    eps: float = 1e-5,
) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups; by default 32, or fewer for narrow layers (small nets).

    The default keeps at least ``min_group_channels`` channels a group: with one channel per group the
    norm would erase the per-channel noise-embedding shift added just before it, and the net would
    ignore the label. A fixed ``groups`` (diffusers' ``norm_num_groups``) must divide ``channels``.
    """
    if groups is None:
        limit = max(1, min(max_groups, channels // min_group_channels))
        groups = max(g for g in range(1, limit + 1) if channels % g == 0)
    elif groups < 1 or channels % groups:
        raise ValueError(f"groups: {groups} does not divide {channels} channels")
    return nn.GroupNorm(groups, channels, eps=eps)


def sinusoidal_embedding(
    label: Tensor,
    dim: int,
    max_period: float = 10_000.0,
    freq_shift: float = 0.0,
    flip_sin_to_cos: bool = False,
) -> Tensor:
    """Transformer-style sin/cos features of a real-valued label; (N,) -> (N, dim).

    Frequencies run geometrically from 1 towards 1/max_period, so integer DDPM steps (0..1000) and EDM's
    ``ln(sigma)/4`` (about -2..1) both land on distinct, smooth codes. Frequency i is
    ``max_period ** (-i / (dim/2 - freq_shift))``: shift 0 is ours, 1 is DDPM's code (the lowest one is
    then exactly 1/max_period); ``flip_sin_to_cos`` orders the halves [cos, sin] (diffusers' options).
    """
    if dim % 2:
        raise ValueError(f"dim: must be even, got {dim}")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(f"freq_shift: must be below dim/2 = {half}, got {freq_shift}")
    exponents = torch.arange(half, dtype=torch.float32, device=label.device) / (half - freq_shift)
    freqs = torch.exp(-math.log(max_period) * exponents)  # (half,) in [1/max_period, 1]
    args = label.float()[:, None] * freqs[None, :]  # (N, half)
    halves = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return torch.cat(halves, dim=1)  # (N, dim) in [-1, 1]


class NoiseEmbedding(nn.Module):
    """Noise label -> conditioning vector: sinusoid of width ``dim``, then a two-layer SiLU MLP."""

    def __init__(self, dim: int, emb_channels: int, freq_shift: float = 0.0, flip_sin_to_cos: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.freq_shift = freq_shift
        self.flip_sin_to_cos = flip_sin_to_cos
        self.mlp = nn.Sequential(nn.Linear(dim, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, label: Tensor) -> Tensor:
        # label: (N,) float, any real value -> (N, emb_channels)
        return self.mlp(sinusoidal_embedding(label, self.dim, freq_shift=self.freq_shift,
                                             flip_sin_to_cos=self.flip_sin_to_cos))


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention over positions, channels first: q, k, v (..., d, L) -> (..., d, L).

    In bf16/fp16 on the CPU it is two batched matmuls around a softmax, read straight from the
    channels-first layout: at the UNets' short sequences (a few hundred positions) that trains about 2x
    faster than PyTorch's fused CPU kernel. The softmax takes the logits in their own precision (it
    accumulates in fp32 and rounds once, as an fp32 softmax cast back would, without the two casts of
    the (L, L) matrix each way). In fp32 on the CPU, and on GPUs, the fused kernel (flash /
    memory-efficient) is the faster one; it wants positions first and contiguous.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))  # (..., L, d)
        return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)
    logits = (q * q.shape[-2] ** -0.5).transpose(-1, -2) @ k  # (..., L, L): query, key
    weights = torch.softmax(logits, dim=-1)  # (..., L, L) in v's precision (autocast keeps softmax there)
    return v @ weights.transpose(-1, -2)  # (..., d, L)


def _fold_taps(weight: Tensor, dim: int) -> Tensor:
    """Along ``dim``, the 3 taps (a, b, c) of a kernel -> the 4 taps (c, b + c, a + b, a) of its folded form."""
    a, b, c = weight.unbind(dim)
    return torch.stack((c, b + c, a + b, a), dim)


def upsample_conv3x3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(nearest_upsample_x2(x))`` for a 3x3, padding-1 ``conv``, without the up-sampled tensor.

    Each output pixel of that pair sees 2x2 distinct input pixels, so it is a stride-2 transposed 4x4
    convolution whose kernel sums taps of the 3x3 one: the same function and parameters, 2.25x fewer
    multiply-adds (4 per output pixel and channel pair instead of 9). The fold runs in the weight's
    own precision (sums are not matmuls, so autocast leaves them alone).
    """
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise ValueError(f"upsample_conv3x3: needs a plain 3x3 padding-1 convolution, got {conv}")
    folded = _fold_taps(_fold_taps(conv.weight, 2), 3)  # (C_out, C_in, 4, 4)
    return F.conv_transpose2d(x, folded.transpose(0, 1), conv.bias, stride=2, padding=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-normed, added back residually."""

    def __init__(self, channels: int, num_heads: int = 1, norm: NormFactory = group_norm) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide {channels} channels")
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, C, H, W) -> (N, C, H, W)
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.unbind(1)  # one gradient for the three (indexing would zero-fill and add three)
        out = attention(q, k, v)  # (N, heads, C/heads, H*W)
        return x + self.proj(out.reshape(n, c, h, w))


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
        norm: NormFactory = group_norm,
    ) -> None:
        super().__init__()
        self.norm1 = norm(in_channels)
        self.resample = _resampler(resample)
        self.upsamples = resample == "up"
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        self.attn = SelfAttention(out_channels, num_heads, norm) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: (N, C_in, H, W), emb: (N, E) -> (N, C_out, H', W'); H' = H, H/2 (down) or 2H (up)
        h = F.silu(self.norm1(x))
        if self.upsamples:  # both are linear maps that commute with nearest up-sampling: run them small
            h = upsample_conv3x3(h, self.conv1)
            skip = self.resample(self.skip(x))
        else:
            h = self.conv1(self.resample(h))
            skip = self.skip(self.resample(x))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = h + skip
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    """DDPM down-sampling: 3x3 convolution with stride 2 (halves H and W). Ignores the embedding.

    ``padding`` "symmetric" pads one zero on every side (windows centred on even pixels); "tf_same" pads
    one only after (bottom, right), as TensorFlow's "SAME" does and so DDPM's own code (diffusers'
    ``downsample_padding=0``): windows centred on odd pixels. Same parameters, different functions.
    """

    def __init__(self, channels: int, padding: DownPadding = "symmetric") -> None:
        super().__init__()
        if padding not in ("symmetric", "tf_same"):
            raise ValueError(f"padding: {padding!r} is not 'symmetric' or 'tf_same'")
        self.pad_after = padding == "tf_same"
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0 if self.pad_after else 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # x: (N, C, H, W) -> (N, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_after else x)


class Upsample(nn.Module):
    """DDPM up-sampling: nearest-neighbour x2, then a 3x3 convolution (computed folded). Ignores the embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # x: (N, C, H, W) -> (N, C, 2H, 2W)
        return upsample_conv3x3(x, self.conv)
