"""Params profiles: the paper's CIFAR-10 and Tiny-ImageNet settings, written into params.yaml."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddae_core.config import ConfigError
from ddae_core.diffusion import build_denoiser, build_loss, feature_levels
from ddae_core.nn import build_unet, count_parameters
from ddae_core.nn.unet import network_config, tap_names, tap_selectors
from ddae_core.readout import resolve_taps
from ddae_core.training.loop import train
from tasks.services.params.editing import flatten
from tasks.services.params.loading import load_params
from tasks.services.params.overrides import apply_overrides, overridden_params
from tasks.services.params.profiles import apply_profile, available_profiles

from toy_training import _fresh_accelerate_state  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[2]


def project(tmp_path: Path, profile: str | None = None) -> Path:
    """params.yaml and profiles/ copied into ``tmp_path``, with ``profile`` applied (ddae profile)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    if profile is not None:
        apply_profile(tmp_path / "params.yaml", profile)
    return tmp_path / "params.yaml"


# (network, framework, data, global batch, lr, warm-up steps, EMA, paper tap, level value)
PAPER = {
    "cifar10-ddpm": ("ddpm-35m", "ddpm", ("cifar10", 32, 3), 512, 4e-4, 1270, 0.9999, "dec.8x8.res2", 11.0),
    "cifar10-edm": ("ddpmpp-56m", "edm", ("cifar10", 32, 3), 256, 4e-4, 39063, 0.9993, "dec.16x16.res1", 0.0604),
    "tiny-imagenet-edm": ("ddpmpp-64", "edm", ("imagefolder", 64, 3), 768, 6e-4, 26042, 0.9993, "dec.16x16.res1", 0.0604),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_profile_validates_and_holds_the_papers_settings(tmp_path, name):
    network, framework, data, batch, lr, warmup, ema, tap, level = PAPER[name]
    config = load_params(project(tmp_path, name))  # what the stages read: params.yaml alone
    assert (config.data.dataset, config.data.image_size, config.data.channels) == data
    assert (config.pretrain.network.name, config.pretrain.diffusion.framework) == (network, framework)
    train_cfg = config.pretrain.train
    assert (train_cfg.batch_size, train_cfg.lr, train_cfg.warmup_steps, train_cfg.ema_decay) == (batch, lr, warmup, ema)
    unet = network_config(network, data[2], data[1])
    taps = resolve_taps(config.extract.taps, tap_names(unet), tap_selectors(unet), "extract.taps")
    assert tap in taps
    levels = feature_levels(config.pretrain.diffusion, config.extract.levels, config.extract.sigma_indices)
    assert any(abs(v - level) < 1e-3 for v in levels)
    # the official networks: t/T into the DDPM network (EDM's reads ln(sigma)/4), GroupNorm(8) in the head
    assert config.pretrain.diffusion.noise_label == ("fraction" if framework == "ddpm" else "scaled")
    if framework == "ddpm":  # the official code trains on t uniform over 1..T (the default run skews it)
        assert config.pretrain.diffusion.t_power == 1.0
    assert unet.head_norm_groups == 8 and unet.freq_shift == 1.0
    # the grid samples as the paper reports (DDIM for DDPM, Heun for EDM); large variance is the ancestral sampler's
    assert (config.pretrain.samples.sampler, config.pretrain.samples.variance) == ("auto", "small")


def test_cifar10_ddpm_profile_builds_35746307_parameters_and_trains_two_steps(tmp_path):
    config = load_params(project(tmp_path, "cifar10-ddpm"))
    unet = build_unet(config.pretrain.network.name, config.data.channels, config.data.image_size)
    assert count_parameters(unet) == 35_746_307
    assert unet.head[0].num_groups == 8
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)  # random 32x32x3
    smoke = dataclasses.replace(config.pretrain.train, steps=2, batch_size=4, checkpoint_every=2, log_every=1)
    result = train(build_denoiser(config.pretrain.diffusion, unet), build_loss(config.pretrain.diffusion), images,
                   smoke, out_dir=tmp_path / "run", progress=False)  # fmt: skip
    assert [h["step"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in result.history)
    assert count_parameters(result.ema_denoiser.unet) == 35_746_307
    assert result.ema_denoiser.label_kind == "fraction"


def test_a_profile_is_written_into_params_yaml_with_its_comments(tmp_path):
    params = project(tmp_path)
    original = params.read_text()
    apply_profile(params, "cifar10-ddpm")
    written = params.read_text()
    data = yaml.safe_load(written)
    profile = flatten(yaml.safe_load((tmp_path / "profiles" / "cifar10-ddpm.yaml").read_text()))
    assert {key: flatten(data)[key] for key in profile} == profile  # every key of the profile, as written
    assert "profile" not in data
    assert "    steps: 78125             # 800 epochs\n" in written  # the profile's own comment on its key
    # keys the profile does not set keep their line, comment and place; sections keep their order
    kept = [line for line in original.splitlines() if not line.lstrip().startswith("- ")  # items of probe.concat
            and line.split(":")[0].strip() not in {key.split(".")[-1] for key in profile}]
    assert [line for line in written.splitlines() if line in kept] == kept
    assert list(data) == list(yaml.safe_load(original))


def test_profiles_applied_one_after_another_equal_the_last_one_alone(tmp_path):
    """Every profile sets the same keys, so none leaves a value behind for the next (dropout, source)."""
    names = available_profiles(REPO)
    assert len(names) >= 3
    alone = {name: yaml.safe_load(project(tmp_path / name, name).read_text()) for name in names}
    for first, second in itertools.permutations(names, 2):
        params = project(tmp_path / f"{first}-then-{second}", first)
        apply_profile(params, second)
        assert yaml.safe_load(params.read_text()) == alone[second], (first, second)


def test_unknown_profile_and_bad_profile_keys_fail_naming_them_and_change_nothing(tmp_path):
    params = project(tmp_path / "a")
    before = params.read_bytes()
    with pytest.raises(ConfigError, match=r"profile: 'cifar100' not found .*cifar10-ddpm"):
        apply_profile(params, "cifar100")
    params = project(tmp_path / "b")
    (tmp_path / "b" / "profiles" / "cifar10-ddpm.yaml").write_text("pretrain:\n  train:\n    stpes: 10\n")
    with pytest.raises(ConfigError, match=r"profiles/cifar10-ddpm.yaml: pretrain.train.stpes: unknown key"):
        apply_profile(params, "cifar10-ddpm")
    with pytest.raises(ConfigError, match=r"pretrain.train.stpes: unknown key"):
        apply_overrides(params, {"profile": "cifar10-ddpm"})
    assert params.read_bytes() == before


def test_a_profile_key_in_params_yaml_is_refused_saying_how_to_apply_one(tmp_path):
    """What `dvc exp run -S +profile=NAME` leaves: refused by every stage, with the way that works."""
    params = project(tmp_path)
    params.write_text(params.read_text() + "profile: cifar10-ddpm\n")
    with pytest.raises(ConfigError, match=r"params.yaml: profile: 'cifar10-ddpm': .*`ddae profile cifar10-ddpm`.*"
                                          r"then `dvc exp run`"):
        load_params(params)
    apply_profile(params, "cifar10-ddpm")  # the advice works: the key goes, the values come
    assert "profile" not in yaml.safe_load(params.read_text())
    assert load_params(params).pretrain.network.name == "ddpm-35m"


def test_the_profile_override_comes_first_then_the_other_keys(tmp_path):
    params = project(tmp_path)
    before = params.read_bytes()
    data, config = overridden_params(params, {"profile": "cifar10-edm", "pretrain.train.steps": 10})
    assert config.pretrain.diffusion.framework == "edm" and config.pretrain.train.steps == 10  # the override wins
    assert data["pretrain"]["train"]["steps"] == 10 and "profile" not in data
    assert params.read_bytes() == before  # only validated
    apply_overrides(params, {"profile": "cifar10-edm", "data.max_train": 1000})
    config = load_params(params)
    assert (config.pretrain.network.name, config.data.max_train) == ("ddpmpp-56m", 1000)


@pytest.mark.parametrize("name", ["cifar10-ddpm", "cifar10-edm"])
def test_the_cifar10_profiles_pretrain_on_all_50000_images_and_the_probe_splits_stay(tmp_path, name):
    from types import SimpleNamespace

    from tasks.pretrain import pretraining_count, pretraining_images

    sizes = {"train": 45_000, "val": 5_000, "test": 10_000}  # CIFAR-10 as prepare splits it (10% validation)
    splits = {split: SimpleNamespace(images=np.full((n, 2, 2, 3), i, np.uint8)) for i, (split, n) in
              enumerate(sizes.items())}
    config = load_params(project(tmp_path, name))
    images = pretraining_images(config, splits)
    assert len(images) == 50_000 == pretraining_count(config, {"splits": sizes})
    assert (images[:45_000] == 0).all() and (images[45_000:] == 1).all()  # train, then validation; never test
    assert {split: len(s.images) for split, s in splits.items()} == sizes  # what the probe fits and selects on
    default = load_params(project(tmp_path / "default"))
    assert pretraining_images(default, splits) is splits["train"].images  # one split: no copy


def test_pretraining_splits_must_include_train_and_name_only_train_and_val():
    from ddae_core.config import TrainConfig

    for bad in (("val",), ("train", "test"), ("train", "train")):
        with pytest.raises(ConfigError, match=r"splits: must be \[train\] or \[train, val\]"):
            TrainConfig(splits=bad)
