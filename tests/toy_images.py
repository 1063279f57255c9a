"""A toy image task for probe and fine-tune tests: the class (0..2) is an image's mean brightness."""

from __future__ import annotations

import numpy as np
import torch

from ddae_core.config import DiffusionConfig
from ddae_core.diffusion import build_denoiser
from ddae_core.heads.probe_online import ImageSet
from ddae_core.nn import build_unet

RES = 16


def brightness_split(n: int, first_id: int, seed: int) -> ImageSet:
    """``n`` images of three brightness classes plus texture noise: uint8 (n, RES, RES, 1)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 3
    base = np.array([50.0, 128.0, 205.0])[labels][:, None, None, None]
    images = np.clip(base + rng.normal(0, 20, size=(n, RES, RES, 1)), 0, 255).astype(np.uint8)
    return ImageSet(images=images, labels=labels, sample_ids=np.arange(first_id, first_id + n, dtype=np.int64))


def random_tiny_denoiser() -> torch.nn.Module:
    """A seeded ``ddpm-tiny`` DDPM denoiser with every convolution random (features depend on the input)."""
    torch.manual_seed(0)
    unet = build_unet("ddpm-tiny", in_channels=1, resolution=RES, zero_init_output=False)
    return build_denoiser(DiffusionConfig(framework="ddpm"), unet).eval()
