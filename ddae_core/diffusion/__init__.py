"""Diffusion frameworks behind one protocol: build a denoiser, its loss and samplers from the config.

Callers (training, sampling, feature extraction) use these factories and never branch on the framework.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from torch import nn

from ddae_core.config import ConfigError, DiffusionConfig, SampleConfig
from ddae_core.diffusion.ddpm import (
    NOISE_LABELS,
    DDPMDenoiser,
    DDPMLoss,
    DDPMSchedule,
    NoiseLabel,
    ddim_sampler,
    ddpm_sampler,
)
from ddae_core.diffusion.edm import EDMLoss, EDMPrecond, edm_sampler, karras_sigmas, sigma_from_index

__all__ = [
    "DDPMDenoiser",
    "DDPMLoss",
    "DDPMSchedule",
    "EDMLoss",
    "EDMPrecond",
    "NOISE_LABELS",
    "NoiseLabel",
    "SAMPLERS",
    "build_denoiser",
    "build_loss",
    "ddim_sampler",
    "ddpm_sampler",
    "default_sampler",
    "edm_sampler",
    "feature_levels",
    "grid_sampler",
    "karras_sigmas",
    "level_kind",
    "sigma_from_index",
]

Sampler = Callable[..., torch.Tensor]  # sampler(net, latents, *, generator=None, **opts) -> [-1, 1]
Loss = Callable[..., torch.Tensor]  # loss(net, x0, generator=None) -> (N,)

SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm_sampler, "ddim": ddim_sampler, "edm": edm_sampler}


def build_denoiser(config: DiffusionConfig, unet: nn.Module, noise_label: NoiseLabel | None = None
                   ) -> DDPMDenoiser | EDMPrecond:
    """Wrap a raw UNet in the framework's denoiser (eps-prediction DDPM or preconditioned EDM);
    ``noise_label`` is how a DDPM network reads t (``DDPMDenoiser``): None = ``config.noise_label``,
    a network from elsewhere passes its own."""
    if noise_label is None:
        noise_label = config.noise_label
    if config.framework == "ddpm":
        return DDPMDenoiser(unet, DDPMSchedule(config.timesteps, config.beta_start, config.beta_end), noise_label)
    if noise_label != "scaled":
        raise ValueError(f"noise_label: {noise_label!r} applies to DDPM networks only")
    if config.framework == "edm":
        return EDMPrecond(unet, config.sigma_data)
    raise ValueError(f"framework: unknown {config.framework!r} (expected 'ddpm' or 'edm')")


def build_loss(config: DiffusionConfig) -> DDPMLoss | EDMLoss:
    """The framework's training loss, ``loss(net, x0, generator) -> (N,)``."""
    if config.framework == "ddpm":
        return DDPMLoss(config.timesteps, config.beta_start, config.beta_end, config.t_power)
    if config.framework == "edm":
        return EDMLoss(config.p_mean, config.p_std, config.sigma_data)
    raise ValueError(f"framework: unknown {config.framework!r} (expected 'ddpm' or 'edm')")


def default_sampler(framework: str) -> str:
    """Name in ``SAMPLERS`` of the paper's sampler: DDIM for DDPM, Heun for EDM."""
    names = {"ddpm": "ddim", "edm": "edm"}
    if framework not in names:
        raise ValueError(f"framework: unknown {framework!r} (expected 'ddpm' or 'edm')")
    return names[framework]


def grid_sampler(framework: str, samples: SampleConfig) -> tuple[Sampler, dict[str, Any]]:
    """The sampler ``pretrain.samples`` names (auto: ``default_sampler``) and the options it reads:
    ``steps`` (DDIM, Heun) or ``variance`` (ancestral DDPM, which runs all T steps)."""
    name = default_sampler(framework) if samples.sampler == "auto" else samples.sampler
    return SAMPLERS[name], {"variance": samples.variance} if name == "ddpm" else {"steps": samples.steps}


def level_kind(framework: str) -> Literal["t", "sigma"]:
    """What a feature level value means: a DDPM step ``t`` or an EDM ``sigma``."""
    if framework == "ddpm":
        return "t"
    if framework == "edm":
        return "sigma"
    raise ValueError(f"framework: unknown {framework!r} (expected 'ddpm' or 'edm')")


def feature_levels(
    config: DiffusionConfig, levels: tuple[float, ...], sigma_indices: tuple[int, ...] = ()
) -> tuple[float, ...]:
    """Resolve the extract section's levels to values: integer t in 1..T (DDPM) or sigma > 0 (EDM).

    EDM ``sigma_indices`` (the paper's 3, 4, 5) are converted with ``sigma_from_index`` and appended
    after ``levels``; exact duplicates are dropped, order kept. Errors name the offending key.
    """
    values: list[float] = []
    if config.framework == "ddpm":
        if sigma_indices:
            raise ConfigError(f"sigma_indices: {list(sigma_indices)} only applies to framework 'edm', not 'ddpm'")
        for i, level in enumerate(levels):
            if not math.isfinite(level) or level != round(level) or not 1 <= level <= config.timesteps:
                raise ConfigError(f"levels[{i}]: DDPM t must be an integer in 1..{config.timesteps}, got {level!r}")
            values.append(float(int(level)))
    elif config.framework == "edm":
        for i, level in enumerate(levels):
            if not (math.isfinite(level) and level > 0):
                raise ConfigError(f"levels[{i}]: EDM sigma must be > 0, got {level!r}")
            values.append(float(level))
        for i, index in enumerate(sigma_indices):
            try:
                values.append(sigma_from_index(index))
            except ValueError as err:
                raise ConfigError(f"sigma_indices[{i}]: {err}") from None
    else:
        raise ValueError(f"framework: unknown {config.framework!r} (expected 'ddpm' or 'edm')")
    return tuple(dict.fromkeys(values))
