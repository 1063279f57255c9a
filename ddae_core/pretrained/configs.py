"""Shapes read from diffusers config dicts alone: no model is built and diffusers is not imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def unet_input_shape(config: Mapping[str, Any]) -> tuple[int, int]:
    """(channels, size) a ``UNet2DModel`` config reads (``sample_size`` may be an int or [H, W])."""
    size = config["sample_size"]
    return int(config["in_channels"]), int(size if isinstance(size, int) else size[0])


def dit_image_size(transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> int:
    """The image side a DiT reads: its latent ``sample_size`` times the VAE's 2 ** (down-sampling blocks)."""
    return int(transformer["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
