"""Feature taps, per-sample noise, augmentation and the streaming extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddae_core.features import capture, extract, extract_all, extract_batch, feature_dims, pool
from ddae_core.noise import augment, copy_seed, sample_noise

TAPS = ("enc.conv", "mid.res0", "dec.up")


class _Pair(nn.Module):
    """A block returning a tuple, as some attention blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), x.sum()


class _TinyUNet(nn.Module):
    """Stand-in UNet with named enc/mid/dec blocks, dropout, and a forward-ordered tap list."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3, padding=1), "down": nn.Conv2d(4, 4, 3, stride=2, padding=1)})
        self.mid = nn.ModuleDict({"res0": nn.Conv2d(4, 8, 3, padding=1), "drop": nn.Dropout(0.5), "pair": _Pair()})
        self.dec = nn.ModuleDict({"up": nn.ConvTranspose2d(8, 4, 2, stride=2), "out": nn.Conv2d(4, 1, 3, padding=1)})
        self.out_calls = 0

    def tap_names(self) -> list[str]:
        return ["enc.conv", "enc.down", "mid.res0", "mid.pair", "dec.up", "dec.out"]

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.enc["conv"](x) + 0.01 * label.view(-1, 1, 1, 1)  # (N, 4, H, W)
        h = self.enc["down"](h)  # (N, 4, H/2, W/2)
        h = self.mid["pair"](h)[0]
        h = self.mid["drop"](self.mid["res0"](h))  # (N, 8, H/2, W/2)
        h = self.dec["up"](h)  # (N, 4, H, W)
        self.out_calls += 1
        return self.dec["out"](h)


class _NoTapNames(_TinyUNet):
    """The same network without a forward-ordered tap list: no early stop possible."""

    tap_names = None  # type: ignore[assignment]


class _StandInDenoiser(nn.Module):
    """DDPM-like stand-in: add_noise(x0, t, eps) = sqrt(ab) x0 + sqrt(1 - ab) eps, label 1000 t / T."""

    def __init__(self, unet: nn.Module, timesteps: int = 1000) -> None:
        super().__init__()
        self.unet = unet
        self.timesteps = timesteps
        betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
        self.register_buffer("alphas_bar", torch.cumprod(1 - betas, 0).float())

    def encode(self, x0: torch.Tensor) -> torch.Tensor:  # pixel space, as every DDPMDenoiser
        return x0

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_bar[t.long() - 1].view(-1, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, 1000 * t / self.timesteps)


def _denoiser(unet_cls: type = _TinyUNet) -> _StandInDenoiser:
    torch.manual_seed(0)
    return _StandInDenoiser(unet_cls())


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks for m in module.modules())


def _images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)


# ---- capture ----------------------------------------------------------------------------------


def test_capture_returns_block_outputs_and_removes_hooks() -> None:
    net = _TinyUNet().eval()
    x = torch.randn(2, 1, 8, 8)
    with capture(net, ["enc.conv", "mid.pair"]) as got:
        assert not _no_hooks(net)
        net(x, torch.zeros(2))
    assert _no_hooks(net)
    torch.testing.assert_close(got["enc.conv"], net.enc["conv"](x))
    assert isinstance(got["mid.pair"], torch.Tensor) and got["mid.pair"].shape == (2, 4, 4, 4)  # tuple -> first


def test_capture_removes_hooks_when_body_raises() -> None:
    net = _TinyUNet()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(net, TAPS):
            net(torch.randn(1, 1, 8, 8), torch.zeros(1))
            raise RuntimeError("boom")
    assert _no_hooks(net)


def test_capture_unknown_name_raises_keyerror_naming_it() -> None:
    net = _TinyUNet()
    with pytest.raises(KeyError, match="dec.nope") as info:
        with capture(net, ["enc.conv", "dec.nope"]):
            pass
    assert "mid.res0" in str(info.value)  # lists known blocks
    assert _no_hooks(net)


# ---- noise and augmentation --------------------------------------------------------------------


def test_sample_noise_depends_only_on_seed_id_level() -> None:
    ids = np.array([5, 9, 2, 100_000], dtype=np.int64)
    noise = sample_noise(0, ids, 11.0, (1, 4, 4))
    assert noise.shape == (4, 1, 4, 4) and noise.dtype == torch.float32
    reordered = sample_noise(0, torch.tensor([2, 100_000, 5]), 11, (1, 4, 4))
    torch.testing.assert_close(reordered, noise[[2, 3, 0]], rtol=0, atol=0)
    assert not torch.equal(sample_noise(1, ids, 11.0, (1, 4, 4)), noise)
    assert not torch.equal(sample_noise(0, ids, 21.0, (1, 4, 4)), noise)
    assert not torch.equal(noise[0], noise[1])
    assert copy_seed(3, 0) == 3 and copy_seed(3, 1) != copy_seed(3, 2)


def test_augment_copy0_identity_and_copies_deterministic_and_distinct() -> None:
    images = torch.randn(16, 1, 8, 8)
    ids = np.arange(16) * 7
    assert torch.equal(augment(images, ids, 0, seed=0), images)
    first = augment(images, ids, 1, seed=0)
    assert torch.equal(first, augment(images, ids, 1, seed=0))
    torch.testing.assert_close(augment(images[[3, 1]], ids[[3, 1]], 1, seed=0), first[[3, 1]], rtol=0, atol=0)
    second = augment(images, ids, 2, seed=0)
    differs = [not torch.equal(first[i], second[i]) for i in range(16)]
    assert any(differs)
    assert not torch.equal(first, images)


def test_augment_is_flip_plus_shift() -> None:
    # A horizontal ramp: any crop is a shifted ramp; a flip reverses its direction.
    ramp = torch.arange(16.0).repeat(16, 1).view(1, 1, 16, 16).repeat(32, 1, 1, 1)
    out = augment(ramp, np.arange(32), 1, seed=0, pad=2)
    centre = out[:, 0, 8, 4:12]  # away from reflected borders
    steps = centre[:, 1:] - centre[:, :-1]
    assert bool(((steps == 1).all(1) | (steps == -1).all(1)).all())
    assert bool((steps == -1).all(1).any()) and bool((steps == 1).all(1).any())  # both flipped and not


# ---- pooling ----------------------------------------------------------------------------------


def test_pool_gap_and_grid() -> None:
    feature = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(pool(feature, 1), feature.mean(dim=(2, 3)))
    quadrants = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)  # (4, 4)
    feature = torch.stack([quadrants, 10 * quadrants]).unsqueeze(0)  # (1, 2, 4, 4)
    assert pool(feature, 2).tolist() == [[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0]]
    flat = torch.randn(3, 7)
    assert pool(flat, 2) is flat


# ---- extract_batch / extract ------------------------------------------------------------------


def test_features_invariant_to_batch_size_and_order() -> None:
    denoiser = _denoiser()
    images = _images(10)
    ids = np.arange(100, 110)
    kwargs = dict(taps=TAPS, levels=(11.0, 200.0), pools=(1, 2), seed=3, progress=False)
    by3 = extract_all(denoiser, images, ids, batch_size=3, **kwargs)
    by7 = extract_all(denoiser, images, ids, batch_size=7, **kwargs)
    perm = np.random.default_rng(1).permutation(10)
    shuffled = extract_all(denoiser, images[perm], ids[perm], batch_size=4, **kwargs)
    assert set(by3) == {(t, lv, p) for t in TAPS for lv in (11.0, 200.0) for p in (1, 2)}
    for key in by3:
        np.testing.assert_allclose(by7[key], by3[key], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(shuffled[key], by3[key][perm], rtol=1e-5, atol=1e-6)
    assert by3[("dec.up", 11.0, 2)].shape == (10, 4 * 2 * 2) and by3[("dec.up", 11.0, 2)].dtype == np.float32
    other_seed = extract_all(denoiser, images, ids, batch_size=5, **{**kwargs, "seed": 4})
    assert not np.allclose(other_seed[("enc.conv", 11.0, 1)], by3[("enc.conv", 11.0, 1)])
    assert not np.allclose(by3[("enc.conv", 11.0, 1)], by3[("enc.conv", 200.0, 1)])


def test_extract_batch_uses_eval_mode_and_restores_states() -> None:
    denoiser = _denoiser().train()
    denoiser.unet.enc.eval()  # a mixed state must come back exactly
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    kwargs = dict(taps=("mid.res0", "dec.up"), levels=(11.0,), pools=(1,), seed=0)
    first = extract_batch(denoiser, x0, [0, 1, 2, 3], **kwargs)
    second = extract_batch(denoiser, x0, [0, 1, 2, 3], **kwargs)
    np.testing.assert_array_equal(first[("dec.up", 11.0, 1)], second[("dec.up", 11.0, 1)])  # dropout off
    assert denoiser.training and denoiser.unet.mid["drop"].training
    assert not denoiser.unet.enc.training and not denoiser.unet.enc["conv"].training
    assert _no_hooks(denoiser)


def test_extract_batch_matches_manual_path_and_stops_early() -> None:
    denoiser, plain = _denoiser(), _denoiser(_NoTapNames)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    ids = [4, 8, 15]
    kwargs = dict(taps=("mid.res0",), levels=(11.0,), pools=(1,), seed=0)
    early = extract_batch(denoiser, x0, ids, **kwargs)[("mid.res0", 11.0, 1)]
    assert denoiser.unet.out_calls == 0  # stopped after the deepest tap
    full = extract_batch(plain, x0, ids, **kwargs)[("mid.res0", 11.0, 1)]
    assert plain.unet.out_calls == 1
    # The same features by hand: keyed noise, add_noise, forward, GAP.
    level = torch.full((3,), 11.0)
    x = plain.add_noise(x0, level, sample_noise(0, ids, 11.0, (1, 8, 8)))
    with capture(plain.unet, ["mid.res0"]) as got, torch.no_grad():
        plain.eval()(x, level)
    np.testing.assert_allclose(early, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full, got["mid.res0"].mean(dim=(2, 3)).numpy(), rtol=1e-6, atol=1e-6)


def test_feature_dims_match_extracted_shapes() -> None:
    denoiser = _denoiser()
    dims = feature_dims(denoiser, TAPS, (1, 2), (1, 8, 8))
    assert dims == {("enc.conv", 1): 4, ("enc.conv", 2): 16, ("mid.res0", 1): 8, ("mid.res0", 2): 32,
                    ("dec.up", 1): 4, ("dec.up", 2): 16}


def test_extract_streams_a_memmap_and_augments_copies(tmp_path) -> None:
    images = _images(6)
    stored = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    stored[:] = images
    stored.flush()
    readonly = np.load(tmp_path / "x.npy", mmap_mode="r")
    denoiser = _denoiser()
    ids = np.arange(6)
    kwargs = dict(taps=("dec.up",), levels=(11.0,), pools=(1,), seed=0, batch_size=4, progress=False)
    batches = list(extract(denoiser, readonly, ids, **kwargs))
    assert [(a, b) for a, b, _ in batches] == [(0, 4), (4, 6)]
    plain = np.concatenate([f[("dec.up", 11.0, 1)] for _, _, f in batches])
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    direct = extract_batch(denoiser, x0, ids, taps=("dec.up",), levels=(11.0,), pools=(1,), seed=0)
    np.testing.assert_allclose(plain, direct[("dec.up", 11.0, 1)], rtol=1e-5, atol=1e-6)
    copy1 = extract_all(denoiser, readonly, ids, copy=1, **kwargs)[("dec.up", 11.0, 1)]
    assert not np.allclose(copy1, plain)
    np.testing.assert_array_equal(copy1, extract_all(denoiser, readonly, ids, copy=1, **kwargs)[("dec.up", 11.0, 1)])


# ---- the real network ----------------------------------------------------------------------------


def test_real_unet_and_denoisers() -> None:
    from ddae_core.config import DiffusionConfig
    from ddae_core.diffusion import build_denoiser
    from ddae_core.nn import build_unet

    torch.manual_seed(0)
    for framework, level in (("ddpm", 11.0), ("edm", 0.06)):
        unet = build_unet("ddpm-tiny", in_channels=1, resolution=16)
        denoiser = build_denoiser(DiffusionConfig(framework=framework), unet)
        names = unet.tap_names()
        taps = (names[len(names) // 2], names[-1])
        images = _images(5, size=16)
        kwargs = dict(taps=taps, levels=(level,), pools=(1, 2), seed=0, progress=False)
        by2 = extract_all(denoiser, images, np.arange(5), batch_size=2, **kwargs)
        by5 = extract_all(denoiser, images, np.arange(5), batch_size=5, **kwargs)
        dims = feature_dims(denoiser, taps, (1, 2), (1, 16, 16))
        for (tap, lv, grid), value in by2.items():
            assert value.shape == (5, dims[(tap, grid)]) and np.isfinite(value).all()
            np.testing.assert_allclose(value, by5[(tap, lv, grid)], rtol=1e-4, atol=1e-5)
        assert _no_hooks(denoiser)


def test_bf16_reads_the_network_under_autocast_and_stays_close_to_fp32() -> None:
    from ddae_core.features import live_features
    from ddae_core.readout import Readout

    den = _denoiser()
    x0 = torch.from_numpy(_images(6)).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = np.arange(6)
    kwargs = {"taps": ["mid.res0", "dec.up"], "levels": [11.0], "pools": [1, 2], "seed": 0}
    fp32 = extract_batch(den, x0, ids, **kwargs)
    bf16 = extract_batch(den, x0, ids, precision="bf16", **kwargs)
    seen = []
    handle = den.unet.mid["res0"].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    extract_batch(den, x0, ids, precision="bf16", **kwargs)
    live = live_features(den, x0, ids, Readout(("mid.res0", "dec.up"), 11.0, 2, 0, "bf16"))
    handle.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]  # extract_batch, then live_features: both under autocast
    assert live.dtype == torch.float32  # pooled features come back in fp32 either way
    for key, value in fp32.items():
        assert bf16[key].dtype == np.float32
        assert not np.array_equal(bf16[key], value)  # really computed in bf16 ...
        np.testing.assert_allclose(bf16[key], value, atol=0.05 * np.abs(value).max())  # ... and close to fp32
    with pytest.raises(ValueError, match="precision.*fp16"):
        extract_batch(den, x0, ids, precision="fp16", **kwargs)
