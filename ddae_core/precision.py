"""Which autocast precision a machine trains fastest in: ``mixed_precision: auto`` resolves here.

bf16 autocast pays off only where the hardware computes in bf16 natively (CUDA cards with bf16,
CPUs with AVX512-BF16 or AMX); elsewhere oneDNN emulates it and it runs slower than fp32.
"""

from __future__ import annotations

from typing import Literal

import torch

from ddae_core.readout import FEATURE_PRECISIONS, FeaturePrecision

Precision = Literal["no", "bf16", "fp16"]


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls and convolutions in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def emulated_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether ``precision`` asks a CPU without native bf16 for bf16: oneDNN then emulates it, many times
    slower than fp32 (``auto`` never does; an explicit ``bf16`` does, on such a CPU)."""
    device = torch.device(device)
    return precision == "bf16" and device.type == "cpu" and not native_bf16(device)


def resolve_mixed_precision(requested: str, device: torch.device | str | None = None) -> Precision:
    """``requested`` as given, except ``auto``: bf16 where native, else fp16 on CUDA, else no autocast."""
    if requested != "auto":
        return requested  # type: ignore[return-value]  # validated by TrainConfig
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"


def resolve_feature_precision(requested: str, device: torch.device | str) -> FeaturePrecision:
    """``extract.precision`` as given, except ``auto``: bf16 where ``device`` computes it natively, else fp32."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if requested not in FEATURE_PRECISIONS:
        raise ValueError(f"precision: expected auto or one of {', '.join(FEATURE_PRECISIONS)}, got {requested!r}")
    return requested  # type: ignore[return-value]
