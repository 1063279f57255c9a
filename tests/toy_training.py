"""A tiny diffusion training setup the training, multi-process, interruption and profile tests share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ddae_core.config import DiffusionConfig, TrainConfig
from ddae_core.diffusion import build_denoiser
from ddae_core.nn.unet import build_unet

DIFFUSION = DiffusionConfig()  # DDPM, T = 1000


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each train() call starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_denoiser(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    """ddpm-tiny at 16x16x1 with dropout on, so the loop's dropout seeding is exercised too."""
    torch.manual_seed(seed)
    return build_denoiser(DIFFUSION, build_unet("ddpm-tiny", in_channels=1, resolution=16, dropout=dropout))


def make_images(n: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (n, 16, 16, 1): smooth random blobs, a little structure for the network to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    centres = rng.uniform(3, 13, size=(n, 2, 1, 1))
    width = rng.uniform(2, 5, size=(n, 1, 1))
    blob = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / (2 * width**2))
    return (blob * 255).round().astype(np.uint8)[..., None]


def resume_config(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=8, grad_accum=2, lr=2e-3, warmup_steps=5, ema_decay=0.99,
        ema_warmup="ramp", hflip=True, checkpoint_every=5, keep_last=2, log_every=5, seed=3, mixed_precision="no",
    )  # fmt: skip
