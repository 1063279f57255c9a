"""Params profiles: the paper's CIFAR-10 and Tiny-ImageNet settings, layered over params.yaml."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_training import _fresh_accelerate_state  # noqa: F401 (autouse fixture)

from ddae_core.config import ConfigError
from ddae_core.diffusion import build_denoiser, build_loss, feature_levels
from ddae_core.nn import build_unet, count_parameters
from ddae_core.training import train
from ddae_core.readout import resolve_taps
from ddae_core.nn.unet import network_config, paper_aliases, tap_names
from tasks.common import load_params
from tasks.params_overrides import overridden_params

REPO = Path(__file__).resolve().parents[1]


def project(tmp_path: Path, profile: str | None) -> Path:
    """params.yaml and profiles/ copied into ``tmp_path``, with ``profile`` selected."""
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    if profile is not None:
        data["profile"] = profile
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path / "params.yaml"


# (network, framework, data, global batch, lr, warm-up steps, EMA, paper tap, level value)
PAPER = {
    "cifar10-ddpm": ("ddpm-35m", "ddpm", ("cifar10", 32, 3), 512, 4e-4, 1143, 0.9999, "dec.8x8.res2", 11.0),
    "cifar10-edm": ("ddpmpp-56m", "edm", ("cifar10", 32, 3), 256, 4e-4, 35156, 0.9993, "dec.16x16.res1", 0.0604),
    "tiny-imagenet-edm": ("ddpmpp-64", "edm", ("imagefolder", 64, 3), 768, 6e-4, 23438, 0.9993, "dec.16x16.res1", 0.0604),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_profile_validates_and_holds_the_papers_settings(tmp_path, name):
    network, framework, data, batch, lr, warmup, ema, tap, level = PAPER[name]
    config = load_params(project(tmp_path, name))
    assert config.profile == name
    assert (config.data.dataset, config.data.image_size, config.data.channels) == data
    assert (config.pretrain.network.name, config.pretrain.diffusion.framework) == (network, framework)
    train_cfg = config.pretrain.train
    assert (train_cfg.batch_size, train_cfg.lr, train_cfg.warmup_steps, train_cfg.ema_decay) == (batch, lr, warmup, ema)
    unet = network_config(network, data[2], data[1])
    taps = resolve_taps(config.extract.taps, tap_names(unet), paper_aliases(unet), "extract.taps")
    assert tap in taps
    levels = feature_levels(config.pretrain.diffusion, config.extract.levels, config.extract.sigma_indices)
    assert any(abs(v - level) < 1e-3 for v in levels)
    base = load_params(project(tmp_path / "base", None))
    assert base.profile == "base" and base.pretrain.network.name == "ddpm-cpu"  # params.yaml as written


def test_cifar10_ddpm_profile_builds_35746307_parameters_and_trains_two_steps(tmp_path):
    config = load_params(project(tmp_path, "cifar10-ddpm"))
    unet = build_unet(config.pretrain.network.name, config.data.channels, config.data.image_size)
    assert count_parameters(unet) == 35_746_307
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)  # random 32x32x3
    smoke = dataclasses.replace(config.pretrain.train, steps=2, batch_size=4, checkpoint_every=2, log_every=1)
    result = train(build_denoiser(config.pretrain.diffusion, unet), build_loss(config.pretrain.diffusion), images,
                   smoke, out_dir=tmp_path / "run", progress=False)  # fmt: skip
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert count_parameters(result.ema_denoiser.unet) == 35_746_307


def test_unknown_profile_and_bad_profile_keys_fail_naming_them(tmp_path):
    with pytest.raises(ConfigError, match=r"profile: 'cifar100' not found .*cifar10-ddpm"):
        load_params(project(tmp_path / "a", "cifar100"))
    params = project(tmp_path / "b", "cifar10-ddpm")
    (tmp_path / "b" / "profiles" / "cifar10-ddpm.yaml").write_text("pretrain:\n  train:\n    stpes: 10\n")
    with pytest.raises(ConfigError, match=r"profiles/cifar10-ddpm.yaml: pretrain.train.stpes: unknown key"):
        load_params(params)


def test_overrides_select_a_profile_but_cannot_shadow_its_keys(tmp_path):
    params = project(tmp_path, None)
    data, config = overridden_params(params, {"profile": "cifar10-edm"})
    assert config.pretrain.diffusion.framework == "edm" and data["profile"] == "cifar10-edm"
    assert data["pretrain"]["diffusion"]["framework"] == "ddpm"  # params.yaml itself keeps its own values
    with pytest.raises(ConfigError, match=r"pretrain.train.steps: set by profile 'cifar10-edm'"):
        overridden_params(params, {"profile": "cifar10-edm", "pretrain.train.steps": 10})
    _, config = overridden_params(params, {"profile": "cifar10-edm", "data.max_train": 1000})  # not in the profile
    assert config.data.max_train == 1000
