"""The novelty score against a direct textbook computation, and its calibration to a false-alarm rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from ddae_core.heads import novelty
from ddae_core.heads.novelty import (
    NOVELTY_FILE,
    NoveltyModel,
    calibrate,
    channel_means,
    false_alarm_rate,
    fit_novelty,
    l2_normalise,
    ledoit_wolf,
    novelty_cells,
)


def clusters(rng, n_per_class: int, classes: int = 3, dim: int = 12, spread: float = 0.3):
    """Gaussian classes around random centres (a correlated noise shared by all classes)."""
    centres = rng.normal(size=(classes, dim)) * 2
    mixing = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim)) @ mixing
    return x, labels, centres, mixing


def test_ledoit_wolf_matches_the_reference_implementation_in_any_block_size(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 30)) @ rng.normal(size=(30, 30))  # fewer rows than 2x the dimensions
    x -= x.mean(axis=0)
    expected, expected_shrinkage = sklearn_ledoit_wolf(x, assume_centered=True)
    monkeypatch.setattr(novelty, "_CHUNK", 7)  # blocks that do not divide the rows
    covariance, shrinkage = ledoit_wolf(x)
    assert 0 < shrinkage < 1 and shrinkage == pytest.approx(expected_shrinkage, rel=1e-10)
    np.testing.assert_allclose(covariance, expected, rtol=1e-10, atol=1e-12)


def test_the_score_is_the_smallest_class_mahalanobis_distance_computed_directly():
    rng = np.random.default_rng(1)
    x, labels, *_ = clusters(rng, 30)
    model = fit_novelty(x, labels)
    # the textbook computation: normalise, class means, within-class covariance (Ledoit-Wolf), inverse
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([z[labels == k].mean(axis=0) for k in range(3)])
    covariance, shrinkage = sklearn_ledoit_wolf(z - means[labels], assume_centered=True)
    precision = np.linalg.inv(covariance)
    queries = rng.normal(size=(9, x.shape[1]))
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    direct = np.array([min(float((row - m) @ precision @ (row - m)) for m in means) for row in q])
    assert model.shrinkage == pytest.approx(shrinkage)
    np.testing.assert_allclose(model.score(queries), direct, rtol=1e-4)
    np.testing.assert_allclose(model.means, means, rtol=1e-5, atol=1e-6)
    # scale does not matter (features are normalised first); a wrong dimension is refused
    np.testing.assert_allclose(model.score(5 * queries), model.score(queries), rtol=1e-9)
    with pytest.raises(ValueError, match="11 dimensions, the novelty model 12"):
        model.score(queries[:, :11])


def test_an_unseen_class_scores_higher_than_the_known_ones():
    rng = np.random.default_rng(2)
    x, labels, *_ = clusters(rng, 200, classes=4)
    known = labels < 3  # class 3 is held out of the fit
    model = fit_novelty(x[known][::2], labels[known][::2])
    held_out, unseen_known = model.score(x[~known]), model.score(x[known][1::2])
    assert held_out.mean() > 3 * unseen_known.mean()
    calibrated = model.calibrated(unseen_known, 0.05)
    assert calibrated.is_novel(held_out).mean() > 0.9


def test_calibration_flags_about_the_chosen_share_of_known_images():
    rng = np.random.default_rng(3)
    x, labels, *_ = clusters(rng, 1500)
    train, val, test = (slice(0, None, 3), slice(1, None, 3), slice(2, None, 3))  # 1500 rows each
    model = fit_novelty(x[train], labels[train])
    for rate in (0.01, 0.05, 0.2):
        val_scores = model.score(x[val])
        calibrated = model.calibrated(val_scores, rate)
        assert calibrated.threshold == calibrate(val_scores, rate)
        measured = false_alarm_rate(val_scores, calibrated.threshold)
        assert rate - 1 / 1500 <= measured <= rate  # a quantile at a data point: never above the rate
        # on unseen known images, within 4 standard errors of the rate
        on_test = false_alarm_rate(model.score(x[test]), calibrated.threshold)
        assert abs(on_test - rate) < 4 * math.sqrt(rate * (1 - rate) / 1500)


def test_calibration_rejects_rates_and_scores_it_cannot_use():
    for rate in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="false-alarm rate must be in \\(0, 1\\)"):
            calibrate(np.ones(5), rate)
    with pytest.raises(ValueError, match="non-empty"):
        calibrate(np.zeros(0), 0.05)


def test_an_uncalibrated_model_and_nan_scores_flag_nothing():
    rng = np.random.default_rng(4)
    x, labels, *_ = clusters(rng, 20)
    model = fit_novelty(x, labels)
    assert math.isnan(model.threshold) and not model.is_novel(model.score(x)).any()
    assert not model.calibrated(model.score(x), 0.1).is_novel(np.array([np.nan])).any()


def test_it_saves_as_tensors_and_loads_back_exactly(tmp_path):
    rng = np.random.default_rng(5)
    x, labels, *_ = clusters(rng, 20)
    model = fit_novelty(x, labels)
    model = model.calibrated(model.score(x), 0.1)
    assert NoveltyModel.load(tmp_path) is None  # a probe directory without one (a finetune head)
    path = model.save(tmp_path)
    assert path.name == NOVELTY_FILE and path.read_bytes()[8:9] == b"{"  # safetensors: a JSON header, no pickle
    loaded = NoveltyModel.load(tmp_path)
    assert loaded.threshold == model.threshold and loaded.shrinkage == model.shrinkage
    np.testing.assert_array_equal(loaded.means, model.means)
    np.testing.assert_array_equal(loaded.score(x), model.score(x))


def test_a_wide_readout_is_scored_on_its_channel_means_and_saves_that_choice(tmp_path):
    """Pooled on a 2x2 grid, 4 channels: the model reads each channel's mean over its 4 cells."""
    assert (novelty_cells(2048, pool=4), novelty_cells(6144, pool=4), novelty_cells(6144, pool=1)) == (1, 16, 1)
    rng = np.random.default_rng(6)
    base, labels, *_ = clusters(rng, 40, dim=4)
    cells = rng.normal(scale=0.1, size=(len(base), 4, 4))  # per channel, 4 cell values around its mean
    x = (base[:, :, None] + cells - cells.mean(axis=2, keepdims=True)).reshape(len(base), 16)  # channel-major
    np.testing.assert_allclose(channel_means(x, 4), base, atol=1e-12)
    assert channel_means(x, 1) is x
    with pytest.raises(ValueError, match="do not split into 3 cells"):
        channel_means(x, 3)
    model = fit_novelty(x, labels, cells=4)
    on_means = fit_novelty(base, labels)
    assert model.dim == 4 and model.cells == 4
    np.testing.assert_allclose(model.score(x), on_means.score(base), rtol=1e-6)  # the same model, fitted on the means
    model.calibrated(model.score(x), 0.1).save(tmp_path)
    loaded = NoveltyModel.load(tmp_path)
    assert loaded.cells == 4
    np.testing.assert_array_equal(loaded.score(x), model.score(x))
    old = {k: v for k, v in model.state_dict().items() if k != "cells"}  # a file saved before cells existed
    assert NoveltyModel.from_state_dict(old).cells == 1


def test_l2_normalise_keeps_zero_rows_and_refuses_other_ranks():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        l2_normalise(np.zeros(3))


def test_the_threshold_flags_exactly_the_rate_rounded_down():
    scores = np.random.default_rng(6).permutation(np.arange(100.0))
    for rate, flagged in ((0.05, 5), (0.29, 29), (0.005, 0), (0.999, 99)):
        assert np.sum(scores > calibrate(scores, rate)) == flagged, rate
    assert calibrate(np.array([1.0, 2.0, 2.0, 2.0]), 0.5) == 2.0  # a tie is never split: none above


def test_the_posterior_is_the_gaussian_class_probability_and_picks_the_nearest_mean():
    rng = np.random.default_rng(5)
    x, labels, *_ = clusters(rng, 40)
    model = fit_novelty(x, labels)
    queries = rng.normal(size=(7, x.shape[1]))
    distances = model.distances(queries)
    posterior = model.posterior(queries)
    direct = np.exp(-distances / 2) / np.exp(-distances / 2).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(posterior, direct, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(posterior.argmax(axis=1), distances.argmin(axis=1))
    np.testing.assert_allclose(model.score(queries), distances.min(axis=1))
    one_class = fit_novelty(x[labels == 0], labels[labels == 0])  # good parts only: one normal class
    assert one_class.distances(queries).shape == (7, 1)
    np.testing.assert_array_equal(one_class.posterior(queries), np.ones((7, 1), np.float32))
