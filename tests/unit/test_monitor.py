"""The probe monitor: when it scores, what it scores, and which checkpoint a run carries forward."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from ddae_core.diffusion import build_loss
from ddae_core.training.loop import MONITOR_FILE, Monitor, train
from ddae_core.training.monitor import LabelledImages, ProbeMonitor, best_point
from ddae_core.training.schedules import monitor_steps

from toy_images import brightness_split, random_tiny_denoiser
from toy_training import (  # noqa: F401 (the autouse fixture)
    DIFFUSION,
    _fresh_accelerate_state,
    make_denoiser,
    make_images,
    resume_config,
)


def test_monitor_steps_spread_evenly_or_every_n() -> None:
    assert monitor_steps(800, points=8) == frozenset(range(100, 801, 100))
    assert monitor_steps(10, points=3) == frozenset({4, 7, 10})  # the last step is always scored
    assert monitor_steps(3, points=8) == frozenset({1, 2, 3})  # a short run: every step
    assert monitor_steps(25, points=8, every=10) == frozenset({10, 20, 25})
    assert monitor_steps(25, points=0) == frozenset() and monitor_steps(0, points=8) == frozenset()


def test_best_point_is_the_highest_score_and_the_earliest_of_ties() -> None:
    points = [{"step": 4, "score": 0.9}, {"step": 2, "score": 0.9}, {"step": 6, "score": 0.5}]
    assert best_point(points)["step"] == 2 and best_point([]) is None


class _Curve:
    """A fake monitor: the scores of a curve that peaks early, one per call; records the steps' networks."""

    def __init__(self, scores: list[float]) -> None:
        self.scores, self.calls = list(scores), 0

    def __call__(self, network: torch.nn.Module) -> dict[str, float]:
        assert not network.training  # scored in eval mode
        score = self.scores[self.calls]
        self.calls += 1
        return {"score": score, "linear_val_acc": score, "knn_val_acc": score / 2, "tap_index": 0.0}


def _ema(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "ema.safetensors"))


def test_an_early_peak_is_carried_forward_and_its_checkpoint_kept(tmp_path) -> None:
    images, loss = make_images(32), build_loss(DIFFUSION)
    curve = _Curve([0.5, 0.9, 0.6, 0.4])
    logged = []
    config = resume_config(20)  # checkpoint_every 5, keep_last 2
    result = train(make_denoiser(), loss, images, config, out_dir=tmp_path, progress=False,
                   monitor=Monitor(curve, frozenset({5, 10, 15, 20}), key="k"),
                   callbacks=(lambda step, metrics: logged.append((step, metrics)),))
    assert result.step == 20 and result.chosen_step == 10 and curve.calls == 4
    assert [p["step"] for p in result.monitor] == [5, 10, 15, 20]
    assert [(s, m["monitor.score"]) for s, m in logged if "monitor.score" in m] == [(5, .5), (10, .9), (15, .6), (20, .4)]
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000010", "step-00000015", "step-00000020"]
    carried, at_10, last = result.ema_denoiser.state_dict(), _ema(ckpts / "step-00000010"), _ema(ckpts / "step-00000020")
    assert all(torch.equal(carried[k], at_10[k]) for k in at_10)  # the step-10 EMA network, not the last
    assert any(not torch.equal(at_10[k], last[k]) for k in at_10)
    saved = json.loads((tmp_path / MONITOR_FILE).read_text())
    assert saved["key"] == "k" and [p["score"] for p in saved["points"]] == [0.5, 0.9, 0.6, 0.4]


def test_without_select_the_last_step_is_carried_forward(tmp_path) -> None:
    images, loss = make_images(32), build_loss(DIFFUSION)
    result = train(make_denoiser(), loss, images, resume_config(10), out_dir=tmp_path, progress=False,
                   monitor=Monitor(_Curve([0.9, 0.1]), frozenset({5, 10}), select=False))
    assert result.chosen_step == 10 and len(result.monitor) == 2
    last = _ema(tmp_path / "checkpoints" / "step-00000010")
    assert all(torch.equal(result.ema_denoiser.state_dict()[k], last[k]) for k in last)


def test_a_resumed_run_keeps_its_points_and_scores_only_new_steps(tmp_path) -> None:
    images, loss = make_images(32), build_loss(DIFFUSION)
    first = _Curve([0.5, 0.9])
    train(make_denoiser(), loss, images, resume_config(10), out_dir=tmp_path, progress=False,
          monitor=Monitor(first, frozenset({5, 10}), key="k"))
    steps = frozenset({5, 10, 15, 20})
    second = _Curve([0.6, 0.95])
    result = train(make_denoiser(), loss, images, resume_config(20), out_dir=tmp_path, progress=False,
                   monitor=Monitor(second, steps, key="k"))
    assert second.calls == 2 and [p["score"] for p in result.monitor] == [0.5, 0.9, 0.6, 0.95]
    assert result.chosen_step == 20
    other = _Curve([0.1])
    again = train(make_denoiser(), loss, images, resume_config(20), out_dir=tmp_path, progress=False,
                  monitor=Monitor(other, steps, key="changed settings"))
    assert other.calls == 1 and [p["step"] for p in again.monitor] == [20]  # old points dropped, the last rescored


def test_the_probe_monitor_scores_separable_features() -> None:
    def labelled(split):
        return LabelledImages(images=split.images, labels=split.labels, sample_ids=split.sample_ids)

    monitor = ProbeMonitor(train=labelled(brightness_split(60, 0, 1)), val=labelled(brightness_split(30, 1000, 2)),
                           taps=("mid.res1", "dec.8x8.res0"), level=11.0, num_classes=3, l2_grid=(1e-4, 1e-3),
                           max_iter=50, knn_k=5)
    metrics = monitor(random_tiny_denoiser())
    assert metrics["score"] == metrics["linear_val_acc"] >= 0.9 and metrics["knn_val_acc"] >= 0.9
    assert metrics["tap_index"] in (0.0, 1.0)
    blank = ProbeMonitor(train=labelled(brightness_split(60, 0, 1)), val=LabelledImages(
        images=np.full((30, 16, 16, 1), 128, np.uint8), labels=np.arange(30) % 3, sample_ids=np.arange(30) + 1000),
        taps=("mid.res1",), level=11.0, num_classes=3, l2_grid=(1e-3,), max_iter=50, knn_k=5)
    assert blank(random_tiny_denoiser())["linear_val_acc"] < 0.5  # identical images: no better than chance


def test_monitor_config_defaults_score_the_default_run_eight_times() -> None:
    from ddae_core.config import PipelineConfig
    from ddae_core.training.schedules import planned_steps

    config = PipelineConfig()
    steps = planned_steps(config.pretrain.train, 54000)
    chosen = monitor_steps(steps, points=config.pretrain.monitor.points, every=config.pretrain.monitor.every)
    assert len(chosen) == 8 and max(chosen) == steps
