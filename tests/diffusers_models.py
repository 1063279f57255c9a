"""Tiny random diffusers models saved as users' ``save_pretrained`` folders, for the import tests (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_unet(size: int = 16, channels: int = 1, seed: int = 0):
    """A UNet2DModel our UNet cannot express (scale-shift time conditioning), so importing wraps it."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       resnet_time_scale_shift="scale_shift")


def save_unet(folder: Path, model=None) -> Path:
    """``model`` (default ``tiny_unet()``) and a DDPM scheduler saved side by side in ``folder``."""
    from diffusers import DDPMScheduler

    (model if model is not None else tiny_unet()).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


def save_dit_pipeline(folder: Path, seed: int = 0) -> Path:
    """A DiT + VAE + scheduler pipeline folder: 16x16 RGB images, 8x8x4 latents, 16 tokens of width 16."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
                          ).save_pretrained(folder / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, layers_per_block=1, sample_size=16).save_pretrained(folder / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
