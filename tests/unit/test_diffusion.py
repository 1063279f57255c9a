"""Diffusion frameworks: schedule and preconditioning constants, losses, samplers, feature levels.

Uses a tiny stand-in UNet (same call signature ``net(x, noise_label)``) and "oracle" networks that
know the clean image, so samplers must recover it exactly unless a sign or coefficient is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddae_core.config import ConfigError, DiffusionConfig, SampleConfig
from ddae_core.diffusion import (
    SAMPLERS,
    DDPMDenoiser,
    DDPMLoss,
    DDPMSchedule,
    EDMLoss,
    EDMPrecond,
    build_denoiser,
    build_loss,
    ddim_sampler,
    ddpm_sampler,
    default_sampler,
    edm_sampler,
    feature_levels,
    grid_sampler,
    karras_sigmas,
    level_kind,
    sigma_from_index,
)
from ddae_core.diffusion.ddpm import ddim_timesteps, draw_timesteps

SHAPE = (2, 3, 8, 8)  # (N, C, H, W)


class TinyNet(nn.Module):
    """Stand-in UNet: two convs and a sinusoidal label embedding; output shaped like x."""

    def __init__(self, channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.embed = nn.Linear(2, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        label = torch.stack([noise_label.sin(), noise_label.cos()], dim=1)  # (N, 2)
        h = self.conv_in(x) + self.embed(label)[:, :, None, None]
        return self.conv_out(torch.nn.functional.silu(h))


class RecordingNet(nn.Module):
    """Returns zeros and remembers the last (input, noise_label) it was given."""

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        self.seen = (x.clone(), noise_label.clone())
        return torch.zeros_like(x)


class DDPMOracle(nn.Module):
    """eps-network that knows x0: returns the true eps implied by (x_t, x0) at the step in its label."""

    def __init__(self, x0: torch.Tensor, schedule: DDPMSchedule) -> None:
        super().__init__()
        self.x0 = x0
        self.schedule = schedule
        self.inputs: dict[int, torch.Tensor] = {}  # x_t seen at each step, to check trajectories

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        t = (noise_label * self.schedule.timesteps / 1000.0).round()
        self.inputs[int(t[0])] = x.clone()
        sqrt_ab = self.schedule.gather("sqrt_alphas_bar", t, x)
        sqrt_1m_ab = self.schedule.gather("sqrt_one_minus_alphas_bar", t, x)
        return (x - sqrt_ab * self.x0) / sqrt_1m_ab


class ConstantEpsNet(nn.Module):
    """eps-network that always answers the same noise: exact along x_t = sqrt(ab) x0 + sqrt(1-ab) eps."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        return self.eps


class EDMOracle(nn.Module):
    """Raw network F chosen so that the preconditioned D(x; sigma) returns x0 exactly."""

    def __init__(self, x0: torch.Tensor, sigma_data: float) -> None:
        super().__init__()
        self.x0 = x0
        self.sigma_data = sigma_data

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = (4.0 * c_noise).exp().view(-1, 1, 1, 1)
        total = sigma.square() + self.sigma_data**2
        x = x_in * total.sqrt()  # undo c_in
        c_skip = self.sigma_data**2 / total
        c_out = sigma * self.sigma_data / total.sqrt()
        return (self.x0 - c_skip * x) / c_out


def clean_images(seed: int = 0) -> torch.Tensor:
    """(N, C, H, W) in [-0.9, 0.9]: inside [-1, 1] so clipping cannot hide errors."""
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- DDPM schedule and denoiser -------------------------------------------------------------------


def test_ddpm_schedule_endpoints_and_monotone() -> None:
    s = DDPMSchedule()
    assert s.timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert bool((s.alphas_bar[1:] < s.alphas_bar[:-1]).all())
    assert torch.allclose(s.one_minus_alphas_bar, 1 - s.alphas_bar, atol=1e-6)
    assert s.state_dict() == {}  # derived constants are rebuilt from the config, never checkpointed


def test_add_noise_at_t11_matches_reference() -> None:
    den = DDPMDenoiser(TinyNet())
    ones, zeros = torch.ones(SHAPE), torch.zeros(SHAPE)
    t = torch.full((SHAPE[0],), 11)
    signal = den.add_noise(ones, t, zeros)
    noise = den.add_noise(zeros, t.float(), ones)  # float t works too
    assert signal.flatten()[0].item() == pytest.approx(0.9989, abs=1e-4)
    assert noise.flatten()[0].item() == pytest.approx(0.047, abs=1e-3)
    assert den.schedule.equivalent_sigma(11).item() == pytest.approx(0.0469, abs=2e-4)


@pytest.mark.parametrize("bad", [0, 1001, 1.5])
def test_ddpm_rejects_steps_outside_1_to_T(bad: float) -> None:
    den = DDPMDenoiser(TinyNet())
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="DDPM timesteps"):
        den.add_noise(x, torch.full((SHAPE[0],), bad), x)
    with pytest.raises(ValueError, match="DDPM timesteps"):
        den(x, torch.full((SHAPE[0],), bad))


def test_ddpm_posterior_is_consistent_with_marginals() -> None:
    # x_t ~ q(x_t|x0) then x_{t-1} ~ q(x_{t-1}|x_t, x0) must give q(x_{t-1}|x0): mean and variance.
    s = DDPMSchedule()
    mean = s.posterior_coef_x0 + s.posterior_coef_xt * s.sqrt_alphas_bar
    var = s.posterior_coef_xt.square() * s.one_minus_alphas_bar + s.posterior_variance
    assert torch.allclose(mean, s.alphas_bar_prev.sqrt(), atol=1e-6)
    assert torch.allclose(var, 1 - s.alphas_bar_prev, atol=1e-6)


def test_ddpm_noise_label_is_1000_t_over_T() -> None:
    rec = RecordingNet()
    den = DDPMDenoiser(rec, DDPMSchedule(timesteps=50))
    den(torch.zeros(SHAPE), torch.tensor([10, 50]))
    assert rec.seen[1].tolist() == pytest.approx([200.0, 1000.0])


def test_ddpm_fraction_label_is_t_over_T_as_the_official_code() -> None:
    rec = RecordingNet()
    den = DDPMDenoiser(rec, DDPMSchedule(timesteps=50), noise_label="fraction")
    den(torch.zeros(SHAPE), torch.tensor([10, 50]))
    assert rec.seen[1].tolist() == pytest.approx([0.2, 1.0])
    assert den.label_kind == "fraction"


def test_build_denoiser_reads_the_configs_noise_label_unless_given_one() -> None:
    rec = RecordingNet()
    fraction = build_denoiser(DiffusionConfig(noise_label="fraction", timesteps=100), rec)
    fraction(torch.zeros(SHAPE), torch.tensor([11, 100]))
    assert rec.seen[1].tolist() == pytest.approx([0.11, 1.0])
    build_denoiser(DiffusionConfig(timesteps=100), rec)(torch.zeros(SHAPE), torch.tensor([11, 100]))
    assert rec.seen[1].tolist() == pytest.approx([110.0, 1000.0])  # the default: scaled, as before
    assert build_denoiser(DiffusionConfig(noise_label="fraction"), rec, "index").label_kind == "index"
    with pytest.raises(ConfigError, match=r"noise_label: 'fraction' applies to framework 'ddpm' only"):
        DiffusionConfig(framework="edm", noise_label="fraction")


def test_ddpm_loss_seeded_and_recomputable() -> None:
    torch.manual_seed(0)
    den = DDPMDenoiser(TinyNet())
    x0 = clean_images()
    loss = DDPMLoss()(den, x0, generator=seeded(3))
    assert loss.shape == (SHAPE[0],)
    assert torch.equal(loss, DDPMLoss()(den, x0, generator=seeded(3)))
    gen = seeded(3)  # documented draw order: t, then eps
    t = torch.randint(1, 1001, (SHAPE[0],), generator=gen)
    eps = torch.randn(SHAPE, generator=gen)
    expected = (den(den.add_noise(x0, t, eps), t) - eps).square().mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert not torch.equal(loss, DDPMLoss()(den, x0, generator=seeded(4)))


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_training_steps_follow_the_power_law_over_all_of_1_to_T(power) -> None:
    t = draw_timesteps(400_000, 1000, power, seeded(0), torch.device("cpu"))
    assert t.dtype == torch.int64 and int(t.min()) == 1 and int(t.max()) == 1000
    for s in (1, 11, 100, 500, 999):  # P(t <= s) = P(u <= (s/T) ** (1/power)): the CDF, to sampling error
        assert float((t <= s).double().mean()) == pytest.approx((s / 1000) ** (1 / power), abs=0.004)


def test_a_skewed_ddpm_loss_draws_its_steps_first_then_the_noise() -> None:
    torch.manual_seed(0)
    den = DDPMDenoiser(TinyNet())
    x0 = clean_images()
    loss = DDPMLoss(t_power=2.0)(den, x0, generator=seeded(3))
    gen = seeded(3)
    t = draw_timesteps(SHAPE[0], 1000, 2.0, gen, torch.device("cpu"))
    eps = torch.randn(SHAPE, generator=gen)
    expected = (den(den.add_noise(x0, t, eps), t) - eps).square().mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert not torch.allclose(loss, DDPMLoss(t_power=1.0)(den, x0, generator=seeded(3)))
    assert build_loss(DiffusionConfig(t_power=3.0)).t_power == 3.0
    with pytest.raises(ConfigError, match=r"t_power: must be a finite number > 0, got 0.0"):
        DiffusionConfig(t_power=0.0)
    with pytest.raises(ConfigError, match=r"t_power: must be a finite number > 0, got nan"):
        DiffusionConfig(t_power=float("nan"))


# --- EDM preconditioning and loss -----------------------------------------------------------------


def test_edm_coefficients_limits() -> None:
    pre = EDMPrecond(TinyNet(), sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = pre.coefficients(torch.tensor([1e-6, 0.5, 1e4], dtype=torch.float64))
    assert c_skip[0].item() == pytest.approx(1.0, abs=1e-9)
    assert c_out[0].item() == pytest.approx(0.0, abs=1e-5)
    assert c_skip[1].item() == pytest.approx(0.5)
    assert c_out[1].item() == pytest.approx(0.5 / math.sqrt(2))
    assert c_in[1].item() == pytest.approx(1 / (0.5 * math.sqrt(2)))
    assert c_noise[1].item() == pytest.approx(math.log(0.5) / 4)
    assert c_skip[2].item() == pytest.approx(0.0, abs=1e-8)
    assert c_out[2].item() == pytest.approx(0.5, rel=1e-6)  # large sigma: D ~ sigma_data * F


def test_edm_forward_applies_c_in_and_c_noise() -> None:
    rec = RecordingNet()
    pre = EDMPrecond(rec, sigma_data=0.5)
    x = torch.randn(SHAPE, generator=seeded(0))
    out = pre(x, torch.tensor([0.5, 2.0]))
    seen_x, seen_label = rec.seen
    assert torch.allclose(seen_x[1], x[1] / math.sqrt(4.25))
    assert seen_label.tolist() == pytest.approx([math.log(0.5) / 4, math.log(2.0) / 4])
    assert torch.allclose(out[0], 0.5 * x[0])  # F = 0 leaves c_skip * x
    assert torch.equal(pre.add_noise(x, 2.0, torch.ones(SHAPE)), x + 2.0)


def test_edm_loss_weight_formula() -> None:
    loss = EDMLoss()
    sigma = torch.tensor([0.01, 0.5, 3.0])
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss.loss_weight(sigma), expected)
    assert loss.loss_weight(torch.tensor(0.5)).item() == pytest.approx(8.0)


def test_edm_loss_equals_weighted_mse_by_hand() -> None:
    torch.manual_seed(0)
    pre = EDMPrecond(TinyNet())
    x0 = clean_images()
    loss_fn = EDMLoss(p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    loss = loss_fn(pre, x0, generator=seeded(5))
    gen = seeded(5)  # documented draw order: ln-sigma normals, then noise
    sigma = (torch.randn((SHAPE[0],), generator=gen) * 1.2 - 1.2).exp()
    noise = torch.randn(SHAPE, generator=gen)
    denoised = pre(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * (denoised - x0).square().mean(dim=(1, 2, 3))
    assert loss.shape == (SHAPE[0],)
    assert torch.allclose(loss, expected, rtol=1e-5)


# --- Karras sigmas and the paper's index ----------------------------------------------------------


def test_karras_sigmas_shape_and_ends() -> None:
    sigmas = karras_sigmas(18)
    assert sigmas.shape == (18,)  # no trailing 0
    assert sigmas[0].item() == pytest.approx(80.0)
    assert sigmas[-1].item() == pytest.approx(0.002)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_sigma_from_index_matches_paper() -> None:
    assert sigma_from_index(3) == pytest.approx(0.023, abs=5e-4)
    assert sigma_from_index(4) == pytest.approx(0.060, abs=5e-4)
    assert sigma_from_index(5) == pytest.approx(0.140, abs=5e-4)
    assert sigma_from_index(1) == pytest.approx(0.002)
    assert sigma_from_index(18) == pytest.approx(80.0)
    for bad in (0, 19):
        with pytest.raises(ValueError, match=str(bad)):
            sigma_from_index(bad)


# --- samplers -------------------------------------------------------------------------------------


def test_ddim_timesteps_even_and_distinct() -> None:
    seq = ddim_timesteps(1000, 100)
    assert seq[0] == 1000 and seq[-1] == 1 and len(set(seq)) == 100
    assert all(a > b for a, b in zip(seq, seq[1:]))


def test_ddim_eta0_deterministic_across_generators() -> None:
    torch.manual_seed(0)
    den = DDPMDenoiser(TinyNet()).eval()
    latents = torch.randn(SHAPE, generator=seeded(1))
    a = ddim_sampler(den, latents, steps=10, generator=seeded(1))
    b = ddim_sampler(den, latents, steps=10, generator=seeded(2))
    assert torch.equal(a, b)
    assert a.shape == SHAPE and a.abs().max() <= 1.0


def test_stochastic_samplers_seeded_reproducible() -> None:
    torch.manual_seed(0)
    den = DDPMDenoiser(TinyNet(), DDPMSchedule(timesteps=50)).eval()
    latents = torch.randn(SHAPE, generator=seeded(1))
    for sample in (
        lambda g: ddpm_sampler(den, latents, generator=g),
        lambda g: ddim_sampler(den, latents, steps=10, eta=1.0, generator=g),
    ):
        a, b, c = sample(seeded(7)), sample(seeded(7)), sample(seeded(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # the generator really drives the noise


def test_edm_sampler_seeded_reproducible() -> None:
    torch.manual_seed(0)
    pre = EDMPrecond(TinyNet()).eval()
    latents = torch.randn(SHAPE, generator=seeded(1))
    a = edm_sampler(pre, latents, steps=6, generator=seeded(1))
    b = edm_sampler(pre, latents, steps=6, generator=seeded(2))  # no churn: deterministic
    assert torch.equal(a, b) and a.abs().max() <= 1.0
    churn = [edm_sampler(pre, latents, steps=6, s_churn=10.0, generator=seeded(s)) for s in (3, 3, 4)]
    assert torch.equal(churn[0], churn[1])
    assert not torch.equal(churn[0], churn[2])


def test_samplers_recover_x0_with_oracle() -> None:
    x0 = clean_images()
    latents = torch.randn(SHAPE, generator=seeded(9))
    schedule = DDPMSchedule()
    den = DDPMDenoiser(DDPMOracle(x0, schedule), schedule)
    assert torch.allclose(ddim_sampler(den, latents, steps=100), x0, atol=1e-3)
    assert torch.allclose(ddim_sampler(den, latents, steps=20, clip_x0=False), x0, atol=1e-3)
    assert torch.allclose(ddpm_sampler(den, latents, generator=seeded(0)), x0, atol=1e-3)
    pre = EDMPrecond(EDMOracle(x0, 0.5), sigma_data=0.5)
    assert torch.allclose(edm_sampler(pre, latents, steps=18), x0, atol=1e-3)


def test_ddim_follows_the_noise_trajectory() -> None:
    # With eps fixed, eta=0 DDIM must keep x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps at every step.
    x0, eps = clean_images(), torch.randn(SHAPE, generator=seeded(9))
    schedule = DDPMSchedule()
    x_T = schedule.add_noise(x0, torch.full((SHAPE[0],), 1000), eps)
    out = ddim_sampler(DDPMDenoiser(ConstantEpsNet(eps), schedule), x_T, steps=10)
    assert torch.allclose(out, x0, atol=1e-3)


def test_edm_heun_follows_the_noise_trajectory() -> None:
    # D(x; sigma) = x - sigma * n has the constant slope n: the ODE solution is x0 + sigma * n.
    x0, n = clean_images(), torch.randn(SHAPE, generator=seeded(9))
    out = edm_sampler(lambda x, sigma: x - sigma.view(-1, 1, 1, 1) * n, x0 / 80.0 + n, steps=5)
    assert torch.allclose(out, x0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim-eta1"])
def test_stochastic_sampler_noise_scale_matches_marginals(sampler: str) -> None:
    # With an eps-oracle, every x_t the sampler visits must be distributed as q(x_t | x0).
    shape = (4, 1, 16, 16)
    x0 = torch.rand(shape, generator=seeded(0)) * 1.8 - 0.9
    schedule = DDPMSchedule(timesteps=100)
    oracle = DDPMOracle(x0, schedule)
    den = DDPMDenoiser(oracle, schedule)
    x_T = schedule.add_noise(x0, torch.full((shape[0],), 100), torch.randn(shape, generator=seeded(1)))
    if sampler == "ddpm":
        ddpm_sampler(den, x_T, generator=seeded(2))
    else:
        ddim_sampler(den, x_T, steps=20, eta=1.0, generator=seeded(2))
    assert len(oracle.inputs) == (100 if sampler == "ddpm" else 20)
    for t, x_t in oracle.inputs.items():
        residual = x_t - schedule.sqrt_alphas_bar[t - 1] * x0
        assert residual.std().item() == pytest.approx(schedule.sqrt_one_minus_alphas_bar[t - 1].item(), rel=0.15)


@pytest.mark.parametrize(("variance", "constant"), [("small", "posterior_variance"), ("large", "betas")])
def test_ancestral_step_noise_has_the_chosen_variance(variance: str, constant: str) -> None:
    """One step x_2 -> x_1 with an eps-oracle: x_1 - posterior mean has std sqrt(beta_tilde_2) ("small")
    or sqrt(beta_2) ("large", the official code's); at t=2 the two differ by a factor of about 2."""
    shape = (8, 1, 32, 32)
    x0 = torch.rand(shape, generator=seeded(0)) * 1.8 - 0.9
    schedule = DDPMSchedule(timesteps=100)
    oracle = DDPMOracle(x0, schedule)
    x_T = schedule.add_noise(x0, torch.full((shape[0],), 100), torch.randn(shape, generator=seeded(1)))
    ddpm_sampler(DDPMDenoiser(oracle, schedule), x_T, generator=seeded(2), variance=variance)
    t = torch.full((shape[0],), 2)
    coef_x0, coef_xt = (schedule.gather(name, t, x0) for name in ("posterior_coef_x0", "posterior_coef_xt"))
    mean = coef_x0 * x0 + coef_xt * oracle.inputs[2]
    std = (oracle.inputs[1] - mean).std().item()
    assert std == pytest.approx(getattr(schedule, constant)[1].sqrt().item(), rel=0.05)
    other = "betas" if constant == "posterior_variance" else "posterior_variance"
    assert std != pytest.approx(getattr(schedule, other)[1].sqrt().item(), rel=0.3)


def test_ancestral_sampler_refuses_an_unknown_variance() -> None:
    with pytest.raises(ValueError, match="variance: 'fixed'"):
        ddpm_sampler(DDPMDenoiser(TinyNet()), torch.zeros(SHAPE), variance="fixed")


def test_the_grid_sampler_gives_each_sampler_the_options_it_reads() -> None:
    assert grid_sampler("ddpm", SampleConfig(steps=7)) == (ddim_sampler, {"steps": 7})  # auto: the paper's
    assert grid_sampler("edm", SampleConfig(steps=7)) == (edm_sampler, {"steps": 7})
    assert grid_sampler("ddpm", SampleConfig(sampler="ddpm", variance="large")) == (ddpm_sampler, {"variance": "large"})


@pytest.mark.parametrize("choice", [{}, {"sampler": "ddpm", "variance": "large"}])
def test_the_sample_grid_draws_with_the_configured_sampler(tmp_path, monkeypatch, choice: dict) -> None:
    """``pretrain.samples`` reaches the sampler: auto is DDIM with its steps, ddpm the ancestral one with its variance."""
    from ddae_core.config import PipelineConfig
    from ddae_core.nn import build_unet
    from tasks import pretrain

    calls = []
    monkeypatch.setattr(pretrain, "save_image_grid", lambda images, path, nrow: calls.append(images))
    config = PipelineConfig.from_dict({"pretrain": {"diffusion": {"timesteps": 20},
                                                    "samples": {"count": 4, "steps": 5, "seed": 3, **choice}}})
    torch.manual_seed(0)
    unet = build_unet("ddpm-tiny", in_channels=1, resolution=8, zero_init_output=False)
    den = build_denoiser(config.pretrain.diffusion, unet).eval()
    pretrain.draw_sample_grid(den, config, tmp_path / "samples.png")
    generator = seeded(3)
    latents = torch.randn(4, 1, 8, 8, generator=generator)
    if choice:
        expected = ddpm_sampler(den, latents, generator=generator, variance="large")
    else:
        expected = ddim_sampler(den, latents, steps=5, generator=generator)
    assert torch.equal(torch.from_numpy(calls[0]), torch.from_numpy(pretrain.to_uint8_images(expected)))


# --- factories and feature levels -----------------------------------------------------------------


def test_factories_follow_framework() -> None:
    ddpm, edm = DiffusionConfig(framework="ddpm", timesteps=100), DiffusionConfig(framework="edm", sigma_data=0.4)
    den = build_denoiser(ddpm, TinyNet())
    assert isinstance(den, DDPMDenoiser) and den.schedule.timesteps == 100
    pre = build_denoiser(edm, TinyNet())
    assert isinstance(pre, EDMPrecond) and pre.sigma_data == 0.4
    assert isinstance(build_loss(ddpm), DDPMLoss) and build_loss(ddpm).schedule.timesteps == 100
    assert isinstance(build_loss(edm), EDMLoss) and build_loss(edm).sigma_data == 0.4
    assert set(SAMPLERS) == {"ddpm", "ddim", "edm"}
    assert SAMPLERS[default_sampler("ddpm")] is ddim_sampler
    assert SAMPLERS[default_sampler("edm")] is edm_sampler
    assert (level_kind("ddpm"), level_kind("edm")) == ("t", "sigma")


def test_feature_levels_resolve() -> None:
    assert feature_levels(DiffusionConfig(framework="ddpm"), (1.0, 11.0, 21.0), ()) == (1.0, 11.0, 21.0)
    edm = feature_levels(DiffusionConfig(framework="edm"), (0.5,), (3, 4, 5))
    assert edm[0] == 0.5
    assert edm[1:] == pytest.approx((0.0229, 0.0599, 0.1395), abs=1e-4)


@pytest.mark.parametrize(
    ("framework", "levels", "indices", "message"),
    [
        ("ddpm", (11.5,), (), r"levels\[0\].*11\.5"),
        ("ddpm", (11.0, 1001.0), (), r"levels\[1\].*1001"),
        ("ddpm", (11.0,), (4,), "sigma_indices"),
        ("edm", (-0.1,), (), r"levels\[0\].*-0\.1"),
        ("edm", (), (0,), r"sigma_indices\[0\]"),
    ],
)
def test_feature_levels_errors_name_the_key(framework: str, levels: tuple, indices: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        feature_levels(DiffusionConfig(framework=framework), levels, indices)
