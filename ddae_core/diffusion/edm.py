"""EDM (Karras et al. 2022) as used by DDAE: preconditioning, weighted loss, Karras sigmas, Heun sampler.

Noise levels are sigmas (x = x0 + sigma * n). The official DDAE EDM feature "timestep" is an index
into the reversed 18-step schedule with its trailing 0 first; ``sigma_from_index`` converts it.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ddae_core.diffusion.ddpm import PixelDenoiser, draw_device, per_example

logger = logging.getLogger(__name__)


class EDMPrecond(PixelDenoiser):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise): the EDM denoiser around a raw UNet F."""

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.unet = unet
        self.sigma_data = sigma_data

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}"

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma > 0, each shaped like sigma (Karras et al. Table 1)."""
        sd2 = self.sigma_data**2
        total = sigma.square() + sd2
        c_skip = sd2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        c_in = 1.0 / total.sqrt()
        c_noise = sigma.log() / 4.0
        return c_skip, c_out, c_in, c_noise

    def add_noise(self, x0: torch.Tensor, sigma: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
        """x0 + sigma * noise; x0, noise (N, C, H, W), sigma (N,) > 0."""
        sigma = per_example(sigma, x0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return x0 + sigma * noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Denoised D(x) (N, C, H, W), estimating x0 in [-1, 1], for noisy x at levels sigma (N,) > 0."""
        sigma = per_example(sigma, x).float()  # (N,)
        c_skip, c_out, c_in, c_noise = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(sigma))
        x = x.float()
        f_x = self.unet(c_in * x, c_noise.flatten())
        return c_skip * x + c_out * f_x.float()


class EDMLoss:
    """Weighted denoising loss: ln sigma ~ N(p_mean, p_std^2), weight (s^2 + sd^2) / (s sd)^2.

    ``net`` only needs to be callable as ``net(x, sigma) -> D(x)`` (a DDP wrapper is fine).
    Draw order from ``generator``: the (N,) normals for ln sigma first, then the noise.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, shaped like sigma."""
        return (sigma.square() + self.sigma_data**2) / (sigma * self.sigma_data).square()

    def __call__(self, net: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N,) per-example weighted MSE (mean over C, H, W) for clean x0 (N, C, H, W) in [-1, 1]."""
        device = draw_device(generator, x0)
        n = x0.shape[0]
        normal = torch.randn((n,), generator=generator, device=device).to(x0.device)
        sigma = (normal * self.p_std + self.p_mean).exp()  # (N,)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x = x0 + sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))) * noise
        denoised = net(x, sigma)
        mse = (denoised.float() - x0.float()).square().flatten(1).mean(dim=1)
        return self.loss_weight(sigma) * mse


def karras_sigmas(
    steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """Karras et al. eq. 5: ``steps`` sigmas descending from sigma_max to sigma_min, float64.

    The final 0 is NOT appended (samplers append it themselves).
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_from_index(
    index: int, steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> float:
    """The official DDAE EDM feature level: entry ``index`` of [0, sigma_min, ..., sigma_max].

    That is the 18-step Karras schedule with its trailing 0, reversed: 3 -> 0.023, 4 -> 0.060,
    5 -> 0.140. Valid indices are 1..steps (index 0 would be sigma = 0, no noise and no c_noise).
    """
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= steps:
        raise ValueError(f"sigma index must be an integer in 1..{steps}, got {index!r}")
    ascending = karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0)  # sigma_min ... sigma_max
    return float(ascending[index - 1])


@torch.no_grad()
def edm_sampler(
    net: nn.Module,
    latents: torch.Tensor,
    *,
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Heun 2nd-order sampler (Karras et al. Alg. 2) from latents (N, C, H, W) ~ N(0, 1); -> [-1, 1].

    Latents are scaled by sigma_max inside. With ``s_churn = 0`` (default) it is deterministic and
    uses 2 * steps - 1 network calls; the generator is only used for churn noise.
    """
    device = draw_device(generator, latents)
    sigmas = torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    sigmas = sigmas.tolist()
    gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    x = latents.double() * sigmas[0]

    def slope(x_cur: torch.Tensor, sigma: float) -> torch.Tensor:
        denoised = net(x_cur.float(), torch.full((x_cur.shape[0],), sigma, device=x_cur.device)).double()
        return (x_cur - denoised) / sigma

    for i in tqdm(range(steps), desc="edm", disable=not progress):
        sigma_cur, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = gamma_max if s_tmin <= sigma_cur <= s_tmax else 0.0
        sigma_hat = sigma_cur * (1.0 + gamma)
        if gamma > 0:
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
            x = x + math.sqrt(sigma_hat**2 - sigma_cur**2) * s_noise * noise
        d_cur = slope(x, sigma_hat)
        x_next = x + (sigma_next - sigma_hat) * d_cur
        if sigma_next > 0:
            d_next = slope(x_next, sigma_next)
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (d_cur + d_next)
        x = x_next
    return x.to(latents.dtype).clamp(-1.0, 1.0)
