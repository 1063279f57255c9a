"""AUROC, ROC curve and false alarm at a recall against a direct count and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from ddae_core.heads.anomaly import auroc, false_alarm_at_recall, roc_curve


def pairwise_auroc(scores, anomalous):
    """The definition: over (anomalous, normal) pairs, 1 when the anomaly scores higher, 1/2 on a tie."""
    pos, neg = scores[anomalous], scores[~anomalous]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_a_pairwise_count_and_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    anomalous = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + anomalous, 1)  # rounded: many ties
    assert auroc(scores, anomalous) == pytest.approx(pairwise_auroc(scores, anomalous), abs=1e-12)
    assert auroc(scores, anomalous) == pytest.approx(roc_auc_score(anomalous, scores), abs=1e-12)


def test_auroc_of_perfect_reversed_and_one_sided_scores():
    anomalous = np.array([False, False, True, True])
    assert auroc(np.array([0.0, 1.0, 2.0, 3.0]), anomalous) == 1.0
    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), anomalous) == 0.0
    assert auroc(np.ones(4), anomalous) == 0.5
    assert math.isnan(auroc(np.arange(3.0), np.zeros(3, bool)))
    with pytest.raises(ValueError, match="equal-length"):
        auroc(np.arange(3.0), np.zeros(2, bool))


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(3)
    anomalous = rng.random(200) < 0.4
    scores = np.round(rng.normal(size=200) + 2 * anomalous, 1)
    fpr, tpr, thresholds = roc_curve(scores, anomalous)
    sk_fpr, sk_tpr, _ = sk_roc_curve(anomalous, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, anomalous))
    for f, t, threshold in zip(fpr[1:], tpr[1:], thresholds[1:]):  # each point is flagging score >= threshold
        assert np.mean(scores[~anomalous] >= threshold) == pytest.approx(f)
        assert np.mean(scores[anomalous] >= threshold) == pytest.approx(t)


def test_false_alarm_at_recall_is_the_least_false_alarm_reaching_it():
    normal = np.arange(10.0)  # 0..9
    anomalies = np.array([5.5, 7.5, 8.5, 20.0])
    scores = np.r_[normal, anomalies]
    anomalous = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    # catching 3 of 4 needs threshold 7.5: normal 8 and 9 are flagged
    assert false_alarm_at_recall(scores, anomalous, 0.75) == (0.2, 7.5)
    assert false_alarm_at_recall(scores, anomalous, 0.25) == (0.0, 20.0)
    assert false_alarm_at_recall(scores, anomalous, 1.0) == (0.4, 5.5)
    with pytest.raises(ValueError, match="recall"):
        false_alarm_at_recall(scores, anomalous, 0.0)


def test_one_class_flags_a_different_cluster_and_calibrates_on_normal_val():
    from ddae_core.heads.anomaly import one_class

    rng = np.random.default_rng(4)
    dim = 16
    centre, other = rng.normal(size=dim) * 3, rng.normal(size=dim) * 3
    normal = centre + rng.normal(size=(600, dim))
    anomalies = other + rng.normal(size=(100, dim))
    test = np.r_[normal[400:], anomalies]
    anomalous = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    result = one_class(normal[:300], np.zeros(300, np.int64), normal[300:400], test, anomalous,
                       false_alarm=0.1, recall=0.95)
    report = result.report
    assert report["test_auroc"] > 0.95 and report["test_auroc"] == auroc(result.test_scores, anomalous)
    assert report["val_false_alarm"] <= 0.1 and report["threshold"] == result.model.threshold
    assert report["false_alarm_at_recall"] == false_alarm_at_recall(result.test_scores, anomalous, 0.95)[0]
    assert report["test_recall"] > 0.9 and report["test_false_alarm"] < 0.25
