"""The paper's online linear-probe protocol on a tiny random network and a separable toy problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddae_core.config import DiffusionConfig
from ddae_core.heads.probe import Standardizer
from ddae_core.heads.probe_online import ImageSet, _RunningMoments, _subset, online_probe
from ddae_core.readout import Readout

from toy_images import brightness_split, random_tiny_denoiser


@pytest.fixture(scope="module")
def denoiser() -> torch.nn.Module:
    return random_tiny_denoiser()


@pytest.fixture(scope="module")
def splits() -> tuple[ImageSet, ImageSet, ImageSet]:
    return brightness_split(60, 0, 1), brightness_split(30, 1000, 2), brightness_split(24, 2000, 3)


def _run(denoiser, splits, taps=("mid.res1", "dec.8x8.res0"), seed=5, **overrides):
    kwargs = dict(num_classes=3, epochs=3, batch_size=16, lr=1e-2, progress=False)
    kwargs.update(overrides)
    return online_probe(denoiser, *splits, readout=Readout(tuple(taps), 11.0, 1, seed), **kwargs)


def test_counts_forward_passes_and_learns_brightness(denoiser, splits) -> None:
    result = _run(denoiser, splits)
    assert result.forward_passes == 3 * 60 + 30 + 24
    assert (result.train_images, result.val_images, result.test_images, result.epochs) == (60, 30, 24, 3)
    assert len(result.history) == 3 and result.history[-1]["val_acc"] == result.val_acc
    assert result.val_acc >= 0.9 and result.test_acc >= 0.9
    assert result.probe.weight.shape == (3, 32 + 32) and result.wall_s > 0
    # the returned probe (standardisation included) scores copy-0 features like the protocol did
    assert np.isfinite(result.probe.std).all() and (result.probe.std > 0).all()


def test_deterministic_given_seed_and_sensitive_to_it(denoiser, splits) -> None:
    a = _run(denoiser, splits, epochs=2)
    b = _run(denoiser, splits, epochs=2)
    np.testing.assert_array_equal(a.probe.weight, b.probe.weight)
    np.testing.assert_array_equal(a.probe.mean, b.probe.mean)
    assert a.history == b.history
    assert (a.val_acc, a.test_acc) == (b.val_acc, b.test_acc)
    c = _run(denoiser, splits, epochs=2, seed=6)
    assert not np.array_equal(a.probe.weight, c.probe.weight)


def test_limits_and_batching(denoiser, splits) -> None:
    result = _run(denoiser, splits, epochs=1, max_train=20, max_eval=10, batch_size=7)
    assert result.forward_passes == 20 + 10 + 10
    assert (result.train_images, result.val_images, result.test_images) == (20, 10, 10)
    with pytest.raises(ValueError, match="labels"):
        _run(denoiser, splits, num_classes=2, epochs=1)
    with pytest.raises(KeyError):
        _run(denoiser, splits, taps=["no.such.block"], epochs=1)


def test_caps_take_class_balanced_rows_in_order(splits) -> None:
    train = splits[0]
    capped = _subset(train, 20, 5, 0)
    assert sorted(np.bincount(capped.labels, minlength=3).tolist()) == [6, 7, 7]
    assert np.all(np.diff(capped.sample_ids) > 0)  # original order kept
    assert np.array_equal(capped.images, train.images[capped.sample_ids - train.sample_ids[0]])
    assert _subset(train, None, 5, 0).images is train.images  # no cap: the split itself, not a copy


def test_running_moments_give_the_cached_probes_standardizer() -> None:
    """Merged batch by batch, the first epoch's statistics equal Standardizer.fit's on all its rows."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(300, 8)) * rng.uniform(0.1, 5, 8) + rng.uniform(-3, 3, 8)).astype(np.float32)
    x[:, 2] = 4.0  # constant: std 1, the same rule as the cached probe
    moments = _RunningMoments(8)
    for start in range(0, 300, 128):
        moments.update(torch.from_numpy(x[start:start + 128]))
    online, cached = moments.standardizer(), Standardizer.fit(x)
    np.testing.assert_allclose(online.mean, cached.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(online.std, cached.std, rtol=1e-6)
    assert online.std[2] == 1.0 and online.mean.dtype == online.std.dtype == np.float32


def test_probe_stage_reports_online_beside_cached_cost(denoiser, splits, tmp_path, monkeypatch) -> None:
    """tasks.probe.probe_online: the metrics keys and the forward-pass bookkeeping of both probes."""
    import tasks.probe as stage
    from ddae_core.checkpoint import save_network
    from ddae_core.config import PipelineConfig
    from ddae_core.readout import Readout
    from tasks.services.outputs.feature_store import FeatureIndex
    from tasks.services.outputs.paths import Paths

    paths = Paths(tmp_path)
    save_network(paths.network, denoiser, {"diffusion": DiffusionConfig(framework="ddpm")})
    train, val, test = splits
    monkeypatch.setattr(stage, "load_prepared", lambda _root: ({}, {"train": train, "val": val, "test": test}))
    config = PipelineConfig.from_dict({"probe": {"online": True, "online_epochs": 2, "online_batch_size": 16}})
    index = FeatureIndex(readouts=tuple(Readout(("mid.res1",), lv, 1, 0) for lv in (1.0, 11.0)), selectors={},
                         class_names=("a", "b", "c"), splits={"train": 60, "val": 30, "test": 24}, train_copies=2,
                         level_kind="t", data_checksum="d", seed=0, network_hash="h")
    metrics = stage.probe_online(paths, config, index, index.readouts[1], 3)
    assert metrics["online_forward_passes"] == 2 * 60 + 30 + 24
    assert metrics["cached_forward_passes"] == 60 * 2 + 30 + 24
    assert metrics["extract_forward_passes"] == 2 * (60 * 2 + 30 + 24)
    assert 0 <= metrics["online_test_acc"] <= 1 and 0 <= metrics["online_val_acc"] <= 1
    assert metrics["online_wall_s"] > 0
