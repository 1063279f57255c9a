"""DDPM (Ho et al. 2020) as used by DDAE: linear-beta schedule, eps-prediction, MSE loss, samplers.

Timesteps run ``t = 1..T`` (as in the paper); arrays are indexed with ``t - 1``. ``t = 0`` means the
clean image and is only used inside the samplers (``alpha_bar_0 = 1``).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NOISE_LABEL_SCALE = 1000.0  # a "scaled" UNet gets 1000 * t / T (see DDPMDenoiser.noise_label)
# what a DDPM network was trained to read: 1000 t / T (ours), t / T (the official DDAE code), or t - 1
NoiseLabel = Literal["scaled", "fraction", "index"]
NOISE_LABELS: tuple[str, ...] = ("scaled", "fraction", "index")
Variance = Literal["small", "large"]  # ancestral step variance: posterior beta_tilde_t, or beta_t
VARIANCES: tuple[str, ...] = ("small", "large")


def per_example(level: torch.Tensor | float | int, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``(N,)`` noise level to an ``(N,)`` tensor on ``x``'s device."""
    level = torch.as_tensor(level, device=x.device)
    if level.ndim == 0:
        level = level.expand(x.shape[0])
    if level.shape != (x.shape[0],):
        raise ValueError(f"noise level must be a scalar or shaped ({x.shape[0]},), got {tuple(level.shape)}")
    return level


def draw_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    """Random draws happen on the generator's device (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else x.device


class DDPMSchedule(nn.Module):
    """Linear beta schedule and the derived per-step constants, as non-persistent float32 buffers.

    Constants are computed in float64 and ``1 - alpha_bar`` is kept as its own buffer, so small
    steps (``1 - alpha_bar_1 = 1e-4``) keep full precision. Buffers are not saved in state dicts:
    they are rebuilt from ``(timesteps, beta_start, beta_end)``.
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__()
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.timesteps = timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)  # (T,) beta_1..beta_T
        alphas = 1.0 - betas
        alphas_bar = torch.cumprod(alphas, dim=0)
        one_minus_alphas_bar = -torch.expm1(torch.cumsum(torch.log1p(-betas), dim=0))  # exact for small t
        alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])  # alpha_bar_{t-1}
        one_minus_prev = torch.cat([torch.zeros(1, dtype=torch.float64), one_minus_alphas_bar[:-1]])
        constants = {
            "betas": betas,
            "alphas": alphas,
            "alphas_bar": alphas_bar,
            "one_minus_alphas_bar": one_minus_alphas_bar,
            "alphas_bar_prev": alphas_bar_prev,
            "sqrt_alphas_bar": alphas_bar.sqrt(),
            "sqrt_one_minus_alphas_bar": one_minus_alphas_bar.sqrt(),
            # q(x_{t-1} | x_t, x_0) = N(coef_x0 * x0 + coef_xt * x_t, posterior_variance)
            "posterior_variance": betas * one_minus_prev / one_minus_alphas_bar,
            "posterior_coef_x0": alphas_bar_prev.sqrt() * betas / one_minus_alphas_bar,
            "posterior_coef_xt": alphas.sqrt() * one_minus_prev / one_minus_alphas_bar,
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, beta_start={self.beta_start}, beta_end={self.beta_end}"

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """Validate integer-valued steps ``t`` in 1..T (int or float tensor) -> long indices ``t - 1``."""
        t_long = t.round().long()
        if t.is_floating_point() and not torch.equal(t_long.to(t.dtype), t):
            raise ValueError(f"DDPM timesteps must be integers, got {t.tolist()}")
        if bool(((t_long < 1) | (t_long > self.timesteps)).any()):
            raise ValueError(f"DDPM timesteps must be in 1..{self.timesteps}, got {t_long.tolist()}")
        return t_long - 1

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Constant ``name`` at steps ``t`` (N,), shaped (N, 1, ..., 1) to broadcast against ``like``."""
        values = getattr(self, name).to(t.device)[self.index(t)]  # index where t lives: no device sync
        return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``; x0, noise (N, C, H, W), t (N,) in 1..T."""
        return self.gather("sqrt_alphas_bar", t, x0) * x0 + self.gather("sqrt_one_minus_alphas_bar", t, x0) * noise

    def equivalent_sigma(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """EDM-style noise level of step t, ``sqrt(1 - ab_t) / sqrt(ab_t)`` (x_t / sqrt(ab_t) = x0 + sigma eps).

        Lets DDPM and EDM feature levels be compared on one axis (t=11 -> sigma ~ 0.047).
        """
        t = torch.as_tensor(t, device=self.betas.device)
        idx = self.index(t)
        return (self.sqrt_one_minus_alphas_bar[idx].double() / self.sqrt_alphas_bar[idx].double())


class PixelDenoiser(nn.Module):
    """What every denoiser around a network ``self.unet`` that diffuses pixels shares: its space and its spec."""

    unet: nn.Module

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """The space the diffusion runs in: pixels, so clean images as they are (a latent model encodes)."""
        return x0

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, size) of the images it denoises."""
        return self.unet.input_shape

    def spec(self) -> dict:
        """What rebuilds the network without its weights (``network.json``): its kind and configuration."""
        return self.unet.spec()


class DDPMDenoiser(PixelDenoiser):
    """eps-prediction wrapper: ``denoiser(x_t, t) -> eps_hat``, with the schedule alongside the UNet.

    The label the network reads, by ``noise_label``: ``"scaled"`` ``1000 * t / T`` (ours by default; = t
    for T=1000), ``"fraction"`` ``t / T`` in (0, 1] (the official DDAE code: the paper's profiles), or
    ``"index"`` ``t - 1`` (networks trained elsewhere count steps from 0: Ho et al., diffusers, DiT).
    The scale only changes which sinusoid frequencies resolve single steps; the network must be read
    with the label it was trained with.
    """

    def __init__(self, unet: nn.Module, schedule: DDPMSchedule | None = None,
                 noise_label: NoiseLabel = "scaled") -> None:
        super().__init__()
        if noise_label not in NOISE_LABELS:
            raise ValueError(f"noise_label: {noise_label!r} is not one of {', '.join(NOISE_LABELS)}")
        self.unet = unet
        self.schedule = schedule if schedule is not None else DDPMSchedule()
        self.label_kind = noise_label

    def extra_repr(self) -> str:
        return f"noise_label={self.label_kind}"

    def noise_label(self, t: torch.Tensor) -> torch.Tensor:
        """Float (N,) label given to the UNet for steps t (N,) in 1..T."""
        if self.label_kind == "index":
            return t.float() - 1.0
        if self.label_kind == "fraction":
            return t.float() / self.schedule.timesteps
        return NOISE_LABEL_SCALE * t.float() / self.schedule.timesteps

    def spec(self) -> dict:
        """What rebuilds the network without its weights (``network.json``): its kind, configuration and label."""
        return {**super().spec(), "noise_label": self.label_kind}

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor | float | int, noise: torch.Tensor) -> torch.Tensor:
        """x_t for clean x0 (N, C, H, W) in [-1, 1] at steps t (N,) in 1..T with noise eps ~ N(0, 1)."""
        return self.schedule.add_noise(x0, per_example(t, x0), noise)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        """eps_hat (N, C, H, W) for noisy x_t (N, C, H, W) at steps t (N,) in 1..T."""
        t = per_example(t, x_t)
        self.schedule.index(t)  # validate: a wrong level must fail loudly, not embed silently
        return self.unet(x_t, self.noise_label(t))


def draw_timesteps(n: int, timesteps: int, power: float, generator: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """(n,) training steps in 1..T: uniform for ``power`` 1 (the paper's), else ``ceil(T u**power)``, u ~ U(0, 1).

    A power above 1 draws the small t that the features are read at more often (P(t <= s) = (s/T)**(1/power)),
    while every t keeps a non-zero chance; it is a sampling form of weighting the loss toward them.
    """
    if power == 1:
        return torch.randint(1, timesteps + 1, (n,), generator=generator, device=device)
    u = torch.rand((n,), generator=generator, device=device, dtype=torch.float64)
    return (u.pow(power) * timesteps).ceil().clamp(1, timesteps).long()


class DDPMLoss:
    """Simple DDPM loss: ``|| eps - net(x_t, t) ||^2`` per example, t ~ ``draw_timesteps``, eps ~ N(0, 1).

    Holds its own schedule, so ``net`` only needs to be callable (a DDP/Accelerate wrapper is fine).
    Draw order from ``generator``: t first, then eps.
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 t_power: float = 1.0) -> None:
        if not (t_power > 0 and math.isfinite(t_power)):
            raise ValueError(f"t_power: must be a finite number > 0, got {t_power}")
        self.schedule = DDPMSchedule(timesteps, beta_start, beta_end)
        self.t_power = t_power

    def __call__(self, net: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N,) per-example MSE (mean over C, H, W) for clean x0 (N, C, H, W) in [-1, 1]."""
        device = draw_device(generator, x0)
        n = x0.shape[0]
        t = draw_timesteps(n, self.schedule.timesteps, self.t_power, generator, device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x_t = self.schedule.add_noise(x0, t, noise)
        eps_hat = net(x_t, t.to(x0.device))
        return (eps_hat.float() - noise.float()).square().flatten(1).mean(dim=1)


def _predict_x0_eps(
    net: DDPMDenoiser, x: torch.Tensor, t: torch.Tensor, clip_x0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps predictions at step t; with clipping, eps is recomputed from the clipped x0."""
    schedule = net.schedule
    eps = net(x, t).to(x.dtype)
    sqrt_ab = schedule.gather("sqrt_alphas_bar", t, x)
    sqrt_1m_ab = schedule.gather("sqrt_one_minus_alphas_bar", t, x)
    x0 = (x - sqrt_1m_ab * eps) / sqrt_ab
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - sqrt_ab * x0) / sqrt_1m_ab
    return x0, eps


@torch.no_grad()
def ddpm_sampler(
    net: DDPMDenoiser,
    latents: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    variance: Variance = "small",
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over all T steps from x_T = latents (N, C, H, W) ~ N(0, 1); -> images in [-1, 1].

    Each step draws x_{t-1} around the posterior mean of q(x_{t-1} | x_t, x0_hat) with variance
    ``"small"`` beta_tilde_t (the posterior's own, ours by default) or ``"large"`` beta_t (Ho et al.'s
    other choice, the official DDAE code's); the last step (t=1) adds no noise and returns x0_hat.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance: {variance!r} is not one of {', '.join(VARIANCES)}")
    step_variance = "posterior_variance" if variance == "small" else "betas"
    schedule = net.schedule
    x = latents
    device = draw_device(generator, x)
    for step in tqdm(range(schedule.timesteps, 0, -1), desc="ddpm", disable=not progress):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, _ = _predict_x0_eps(net, x, t, clip_x0)
        mean = schedule.gather("posterior_coef_x0", t, x) * x0 + schedule.gather("posterior_coef_xt", t, x) * x
        if step > 1:
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
            x = mean + schedule.gather(step_variance, t, x).sqrt() * noise
        else:
            x = mean
    return x.clamp(-1.0, 1.0)


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` distinct integer steps from T down to 1, evenly spaced (T=1000, 100 -> 1000, 990, ..., 1)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in 1..{timesteps}, got {steps}")
    return [int(v) for v in torch.linspace(timesteps, 1, steps, dtype=torch.float64).round().tolist()]


@torch.no_grad()
def ddim_sampler(
    net: DDPMDenoiser,
    latents: torch.Tensor,
    *,
    steps: int = 100,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from x_T = latents (N, C, H, W) ~ N(0, 1) in ``steps`` steps; -> [-1, 1].

    ``eta = 0`` is deterministic (the generator is not used); ``eta = 1`` matches DDPM's variance.
    The final step goes to t = 0 (alpha_bar = 1), i.e. returns the last x0 prediction.
    """
    schedule = net.schedule
    x = latents
    device = draw_device(generator, x)
    sequence = ddim_timesteps(schedule.timesteps, steps)
    for i, step in enumerate(tqdm(sequence, desc="ddim", disable=not progress)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, eps = _predict_x0_eps(net, x, t, clip_x0)
        if i + 1 == len(sequence):
            x = x0
            break
        t_prev = torch.full_like(t, sequence[i + 1])
        ab = schedule.gather("alphas_bar", t, x)
        ab_prev = schedule.gather("alphas_bar", t_prev, x)
        one_minus_ab = schedule.gather("one_minus_alphas_bar", t, x)
        one_minus_ab_prev = schedule.gather("one_minus_alphas_bar", t_prev, x)
        sigma = eta * (one_minus_ab_prev / one_minus_ab * (1.0 - ab / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt() * x0 + (one_minus_ab_prev - sigma.square()).clamp(min=0).sqrt() * eps
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
            x = x + sigma * noise
    return x.clamp(-1.0, 1.0)
