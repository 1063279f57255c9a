"""The UNet's faster formulations compute the textbook functions they replace, values and gradients.

``upsample_conv3x3`` (folded transposed convolution) against nearest x2 + 3x3 convolution; the
BigGAN up-sampling res block against its written-out definition; ``attention`` against
``scaled_dot_product_attention``, in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddae_core.nn.layers import ResBlock, attention, upsample_conv3x3


def _grads(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's output and the gradients of a fixed random projection of it w.r.t. ``tensors``."""
    out = fn()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return out.detach(), list(torch.autograd.grad((out.float() * probe).sum(), tensors))


@pytest.mark.parametrize("size", [(5, 5), (6, 9), (14, 14)])
def test_folded_upsample_conv_equals_nearest_upsample_then_conv(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, kernel_size=3, padding=1)
    x = torch.randn(3, 6, *size, requires_grad=True)
    fast, fast_grads = _grads(lambda: upsample_conv3x3(x, conv), x, conv.weight, conv.bias)
    ref, ref_grads = _grads(lambda: conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), x, conv.weight, conv.bias)
    assert fast.shape == (3, 4, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_folded_upsample_conv_stays_close_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = upsample_conv3x3(x, conv).float()
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert (fast - ref).abs().max() < 0.05 * ref.abs().max()


def test_folded_upsample_conv_refuses_other_convolutions() -> None:
    with pytest.raises(ValueError, match="3x3 padding-1"):
        upsample_conv3x3(torch.zeros(1, 2, 4, 4), nn.Conv2d(2, 2, kernel_size=3, padding=0))


@pytest.mark.parametrize("in_channels", [8, 12])  # same width (identity skip) and a 1x1 skip
def test_upsampling_res_block_equals_its_written_out_definition(in_channels: int) -> None:
    torch.manual_seed(0)
    block = ResBlock(in_channels, 8, emb_channels=10, resample="up").eval()
    x, emb = torch.randn(2, in_channels, 4, 4, requires_grad=True), torch.randn(2, 10)

    def reference() -> torch.Tensor:
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        h = block.conv1(up(F.silu(block.norm1(x)))) + block.emb_proj(emb)[:, :, None, None]
        h = block.conv2(F.silu(block.norm2(h)))
        return h + block.skip(up(x))

    params = [x, block.conv1.weight, *([block.skip.weight] if in_channels != 8 else [])]
    fast, fast_grads = _grads(lambda: block(x, emb), *params)
    ref, ref_grads = _grads(reference, *params)
    assert fast.shape == (2, 8, 8, 8)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _qkv(heads: int = 2, d: int = 16, length: int = 49) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, heads, d, length, generator=gen, requires_grad=True) for _ in range(3)]


def _sdpa_channels_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*(t.transpose(-1, -2) for t in (q, k, v))).transpose(-1, -2)


def test_attention_is_softmax_attention_in_fp32() -> None:
    q, k, v = _qkv()
    out, grads = _grads(lambda: attention(q, k, v), q, k, v)
    ref, ref_grads = _grads(lambda: _sdpa_channels_first(q, k, v), q, k, v)
    assert out.shape == (4, 2, 16, 49)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_attention_matmul_path_under_bf16_matches_fp32_attention() -> None:
    """bf16 on the CPU takes the two-matmul path; it must agree with fp32 attention to bf16 precision."""
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [t.to(torch.bfloat16) for t in (q, k, v)]
        out, grads = _grads(lambda: attention(*low), q, k, v)
    ref, ref_grads = _grads(lambda: _sdpa_channels_first(q, k, v), q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    # and the weights really are a softmax over keys: constant values come back unchanged
    const = torch.ones(4, 2, 16, 49, dtype=torch.bfloat16)
    torch.testing.assert_close(attention(low[0].detach(), low[1].detach(), const), const)
