"""The official online linear-probe protocol on a tiny random network and a separable toy problem."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddae_core.config import DiffusionConfig
from ddae_core.distributed import Shard
from ddae_core.features import extract
from ddae_core.heads.probe_online import BLACK, ImageSet, _subset, online_grid, online_probe
from ddae_core.noise import augment, augment_params
from ddae_core.readout import Readout

from toy_images import brightness_split, random_tiny_denoiser

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TAPS = ("mid.res1", "dec.8x8.res0")


@pytest.fixture(scope="module")
def denoiser() -> torch.nn.Module:
    return random_tiny_denoiser()


@pytest.fixture(scope="module")
def splits() -> tuple[ImageSet, ImageSet, ImageSet]:
    return brightness_split(60, 0, 1), brightness_split(30, 1000, 2), brightness_split(24, 2000, 3)


def _run(denoiser, splits, taps=TAPS, seed=5, **overrides):
    kwargs = dict(num_classes=3, epochs=3, batch_size=16, lr=1e-2, progress=False)
    kwargs.update(overrides)
    return online_probe(denoiser, *splits, readout=Readout(tuple(taps), 11.0, 1, seed), **kwargs)


def test_counts_forward_passes_and_learns_brightness(denoiser, splits) -> None:
    result = _run(denoiser, splits)
    assert result.forward_passes == 3 * 60 + 30 + 24
    assert (result.train_images, result.val_images, result.test_images, result.epochs) == (60, 30, 24, 3)
    assert (result.batch_size, result.lr, result.processes) == (16, 1e-2, 1)
    assert len(result.history) == 3 and result.history[-1]["val_acc"] == result.val_acc
    assert result.val_acc >= 0.9 and result.test_acc >= 0.9
    assert result.probe.weight.shape == (3, 32 + 32) and result.wall_s > 0
    # raw features: the returned probe carries no standardisation
    assert not result.probe.mean.any() and (result.probe.std == 1).all()


def test_a_grid_trains_each_readout_as_it_would_alone_from_one_run_per_level(denoiser, splits) -> None:
    """The official --grid: one layer per (block, level), all on the same batches and network runs."""
    grid = [Readout(("mid.res1",), 11.0, 1, 5), Readout(("dec.8x8.res0",), 11.0, 1, 5),
            Readout(("dec.8x8.res0",), 21.0, 2, 5)]
    kwargs = dict(num_classes=3, epochs=2, batch_size=16, lr=1e-2, progress=False)
    results = online_grid(denoiser, *splits, readouts=grid, **kwargs)
    assert list(results) == grid
    for readout in grid:
        alone = online_probe(denoiser, *splits, readout=readout, **kwargs)
        np.testing.assert_allclose(results[readout].probe.weight, alone.probe.weight, rtol=1e-5, atol=1e-6)
        assert (results[readout].val_acc, results[readout].test_acc) == (alone.val_acc, alone.test_acc)
        assert results[readout].forward_passes == 2 * alone.forward_passes  # the grid ran two levels
    with pytest.raises(ValueError, match="one seed and precision"):
        online_grid(denoiser, *splits, readouts=[grid[0], Readout(("mid.res1",), 11.0, 1, 6)], **kwargs)


def test_cosine_is_stepped_per_epoch_as_the_official_scheduler() -> None:
    """CosineAnnealingLR(T_max=epochs) stepped once per epoch: the lr of each epoch, the last at ~1.1% for 15."""
    linear = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(linear.parameters(), lr=4e-3)
    official = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 15)
    expected = []
    for _ in range(15):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        official.step()
    from ddae_core.training.schedules import lr_factor

    ours = [4e-3 * lr_factor(e, warmup_steps=0, total_steps=15) for e in range(15)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)
    assert 0.010 < ours[-1] / 4e-3 < 0.012


def test_epochs_run_at_their_cosine_lr(denoiser, splits) -> None:
    result = _run(denoiser, splits, epochs=3, lr=0.03)
    lrs = [row["lr"] for row in result.history]
    np.testing.assert_allclose(lrs, [0.03 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)], rtol=1e-12)


def test_raw_zero_padded_features_reach_the_linear_layer(denoiser, splits, monkeypatch) -> None:
    """The layer's first input is the first batch's features of augmented copy 1, black-padded, unstandardised."""
    seen = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        if self.out_features == 3:
            seen.append(x.detach().clone())
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    _run(denoiser, splits, epochs=1, batch_size=16)
    train = splits[0]
    rows = np.random.default_rng([5, 3, 0]).permutation(60)[:16]
    features = [batch for _a, _b, batch in extract(denoiser, train.images[rows], train.sample_ids[rows], taps=TAPS,
                                                     levels=[11.0], pools=[1], seed=5, copy=1, progress=False,
                                                     crop_fill=BLACK)]
    readout = Readout(TAPS, 11.0, 1, 5)
    expected = torch.from_numpy(readout.concat(features[0]))
    torch.testing.assert_close(seen[0], expected)
    assert seen[0].mean(0).abs().max() > 0.05  # raw: not centred (a standardised input would be)
    reflected = [batch for _a, _b, batch in extract(denoiser, train.images[rows], train.sample_ids[rows],
                                                      taps=TAPS, levels=[11.0], pools=[1], seed=5, copy=1,
                                                      progress=False)]
    assert not torch.allclose(seen[0], torch.from_numpy(readout.concat(reflected[0])))


def test_black_fill_pads_crops_with_the_darkest_pixel() -> None:
    """A white image cropped at a nonzero offset shows the fill (-1 = pixel 0) along the shifted edge."""
    ids = next(i for i in range(100) if augment_params(0, i, 1, 4)[1] == 0)  # dy = 0: 4 rows padded on top
    white = torch.ones((1, 1, 16, 16))
    out = augment(white, [ids], 1, 0, fill=BLACK)
    assert (out[0, 0, :4] == -1).all() and (out[0, 0, 4:] != -1).any()
    assert (augment(white, [ids], 1, 0)[0] == 1).all()  # the default reflects: no black border


def test_deterministic_given_seed_and_sensitive_to_it(denoiser, splits) -> None:
    a = _run(denoiser, splits, epochs=2)
    b = _run(denoiser, splits, epochs=2)
    np.testing.assert_array_equal(a.probe.weight, b.probe.weight)
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


def test_shard_splits_every_batch_size() -> None:
    for n in (0, 1, 5, 13, 16):
        shares = [Shard(i, 3).bounds(n) for i in range(3)]
        assert [s.stop - s.start for s in shares] == Shard(0, 3).sizes(n)
        assert shares[0].start == 0 and shares[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
    with pytest.raises(ValueError, match="index"):
        Shard(2, 2)


# Run by `accelerate launch`: each process computes its share of every batch; the main one saves the result.
_SCRIPT = """
import sys
import numpy as np
sys.path[:0] = [{tests!r}, {here!r}]
import torch
torch.set_num_threads(1)
from accelerate import PartialState
from ddae_core.heads.probe_online import online_probe
from ddae_core.readout import Readout
from toy_images import brightness_split, random_tiny_denoiser
state = PartialState(cpu=True)  # sets up the gloo group the probe shares its batches over
splits = brightness_split(60, 0, 1), brightness_split(30, 1000, 2), brightness_split(24, 2000, 3)
result = online_probe(random_tiny_denoiser(), *splits, readout=Readout({taps!r}, 11.0, 1, 5), num_classes=3,
                      epochs=2, batch_size=13, lr=1e-2, eval_batch_size=7, progress=False)
np.savez({out!r}.format(state.process_index), weight=result.probe.weight, bias=result.probe.bias,
         lr=[row["lr"] for row in result.history], acc=[result.val_acc, result.test_acc],
         processes=result.processes, batch=result.batch_size)
"""


def test_two_processes_take_the_steps_of_one(denoiser, splits, tmp_path) -> None:
    """Same effective batch and lr with 1 and 2 processes (gloo): the same weights after the same samples."""
    here = Path(__file__).resolve().parent
    script = tmp_path / "online_two.py"
    script.write_text(_SCRIPT.format(tests=str(here.parent), here=str(here), taps=TAPS,
                                     out=str(tmp_path / "rank{}.npz")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = _run(denoiser, splits, epochs=2, batch_size=13, lr=1e-2, eval_batch_size=7)
    ranks = [np.load(tmp_path / f"rank{i}.npz") for i in range(2)]
    for rank in ranks:
        assert int(rank["processes"]) == 2 and int(rank["batch"]) == 13
        np.testing.assert_allclose(rank["lr"], [row["lr"] for row in one.history], rtol=1e-12)
        # batches of 13 split 7 + 6 and the last of 8 split 4 + 4: features differ by float rounding only
        np.testing.assert_allclose(rank["weight"], one.probe.weight, rtol=0, atol=1e-5)
        np.testing.assert_allclose(rank["bias"], one.probe.bias, rtol=0, atol=1e-5)
        np.testing.assert_allclose(rank["acc"], [one.val_acc, one.test_acc])
    np.testing.assert_array_equal(ranks[0]["weight"], ranks[1]["weight"])  # every process took the same steps
    start = _run(denoiser, splits, epochs=1, batch_size=13, lr=1e-12, eval_batch_size=7).probe.weight
    assert np.abs(one.probe.weight - start).max() > 1e-3  # the steps did move the layer


def test_probe_stage_reports_official_beside_cached(denoiser, splits, tmp_path, monkeypatch) -> None:
    """tasks.probe.probe_online: both protocols' accuracy, clearly named, and the forward-pass bookkeeping."""
    import tasks.probe as stage
    from ddae_core.checkpoint import save_network
    from ddae_core.config import PipelineConfig
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
    online = stage.probe_online(paths, config, index, index.readouts[1], 3, {"test_acc": 0.5, "val_acc": 0.25})
    official, cached = online["official_protocol"], online["cached_probe"]
    assert official["forward_passes"] == 2 * 60 + 30 + 24
    assert (official["epochs"], official["batch_size"], official["lr"], official["processes"]) == (2, 16, 4e-3, 1)
    assert cached == {"test_acc": 0.5, "val_acc": 0.25, "forward_passes": 60 * 2 + 30 + 24}
    assert online["extract_forward_passes"] == 2 * (60 * 2 + 30 + 24)
    assert 0 <= official["test_acc"] <= 1 and 0 <= official["val_acc"] <= 1 and official["wall_s"] > 0
    flat = stage.online_metrics(online)
    assert flat["online.official_protocol.test_acc"] == official["test_acc"]
    assert flat["online.cached_probe.test_acc"] == 0.5
