"""A latent DiT (diffusers ``DiTTransformer2DModel`` + its ``AutoencoderKL``) behind our network interface.

As in the paper's ImageNet DiT-XL/2 transfer: images are encoded by the VAE (posterior mean times
its ``scaling_factor``), noised in latent space by the DDPM schedule, and read by the transformer with
the null class label (the classifier-free-guidance slot); taps are its blocks (``transformer_blocks.14``),
whose tokens the feature path mean-pools (or pools on the patch grid). Features only: the VAE is frozen.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ddae_core.diffusion.ddpm import DDPMDenoiser, DDPMSchedule

KIND = "latent-dit"
VAE_SCALING = 0.18215  # Stable Diffusion's VAE, used by DiT, when a VAE config does not say


class DiTBackbone(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` whose forward takes ``(latents, noise_label)`` with the null class label."""

    def forward(self, z: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # z: (N, C_lat, h, w) noisy latents; noise_label: (N,) 0-based steps -> eps (N, C_lat, h, w)
        null_class = torch.full((z.shape[0],), self.null_class, dtype=torch.long, device=z.device)
        out = super().forward(z, timestep=noise_label, class_labels=null_class).sample
        return out[:, : self.config.in_channels]  # a learned sigma (DiT's second half) is dropped

    @property
    def null_class(self) -> int:
        """The label of "no class": the embedding row after the real classes (DiT trains it by label dropout)."""
        return int(self.config.num_embeds_ada_norm)

    def tap_names(self) -> list[str]:
        """Every transformer block, in forward order."""
        return [f"transformer_blocks.{i}" for i in range(len(self.transformer_blocks))]

    def tap_selectors(self) -> dict[str, tuple[str, ...]]:
        """``mid``: the middle block (the paper's DiT readout); ``decoder``: every block after it, ``dec1``
        the first of those; ``block_N``: block N (so any role name the UNet defaults use resolves)."""
        names = self.tap_names()
        middle = len(names) // 2
        after = tuple(names[middle + 1:]) or (names[-1],)
        selectors = {"mid": (names[middle],), "decoder": after, "dec1": after[:1]}
        selectors.update({f"block_{i}": (name,) for i, name in enumerate(names)})
        return selectors


class LatentDDPMDenoiser(DDPMDenoiser):
    """DDPM in a VAE's latent space: ``encode`` maps images to latents; the rest is ``DDPMDenoiser``."""

    def __init__(self, unet: DiTBackbone, schedule: DDPMSchedule, vae: AutoencoderKL, image_size: int) -> None:
        super().__init__(unet, schedule, noise_label="index")
        self.vae = vae.requires_grad_(False)
        self.image_size = image_size
        self.scaling_factor = float(vae.config.get("scaling_factor", VAE_SCALING) or VAE_SCALING)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean images (N, 1 or 3, S, S) in [-1, 1] -> scaled latents (N, C_lat, S/f, S/f); gray is repeated."""
        if x0.shape[1] == 1:
            x0 = x0.expand(-1, 3, -1, -1)
        return self.vae.encode(x0.to(self.vae.dtype)).latent_dist.mean * self.scaling_factor

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, size) of the images it reads: RGB at the VAE's factor times the DiT's latent size."""
        return 3, self.image_size

    def spec(self) -> dict[str, Any]:
        """What rebuilds it (``network.json``): both diffusers configs and the image size."""
        return {"kind": KIND, "transformer": dict(self.unet.config), "vae": dict(self.vae.config),
                "image_size": self.image_size, "noise_label": "index"}


def build(spec: dict[str, Any], schedule: DDPMSchedule) -> LatentDDPMDenoiser:
    """The denoiser of a ``spec`` (random weights: the caller loads them)."""
    return LatentDDPMDenoiser(DiTBackbone.from_config(spec["transformer"]), schedule,
                              AutoencoderKL.from_config(spec["vae"]), int(spec["image_size"]))
