"""Selective classification: the coverage/accuracy curve and the suggested review threshold."""

import numpy as np
import pytest

from ddae_core.heads.selective import at_threshold, review_reason, selective_curve, suggest_threshold


def test_curve_points_accept_whole_ties_and_count_hits():
    confidence = np.array([0.9, 0.8, 0.8, 0.6, 0.4])
    correct = np.array([True, True, False, True, False])
    curve = selective_curve(confidence, correct)
    assert curve.threshold.tolist() == [0.9, 0.8, 0.6, 0.4]  # the 0.8 tie is one point
    assert curve.coverage.tolist() == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert curve.accuracy.tolist() == pytest.approx([1.0, 2 / 3, 3 / 4, 3 / 5])


def test_suggested_threshold_has_most_coverage_reaching_target():
    confidence = np.array([0.9, 0.8, 0.8, 0.6, 0.4])
    correct = np.array([True, True, False, True, False])
    curve = selective_curve(confidence, correct)
    assert suggest_threshold(curve, 0.75) == 0.6  # accuracy 3/4 at 80% coverage (not monotone)
    assert suggest_threshold(curve, 0.6) == 0.4  # everything accepted
    assert suggest_threshold(curve, 1.0) == 0.9
    assert suggest_threshold(selective_curve(np.array([0.9]), np.array([False])), 0.5) is None
    assert at_threshold(confidence, correct, 0.6) == pytest.approx((0.8, 0.75))
    coverage, accuracy = at_threshold(confidence, correct, 0.95)
    assert coverage == 0.0 and np.isnan(accuracy)


def test_selective_accuracy_rises_for_informative_confidence():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence  # calibrated: right with probability = confidence
    curve = selective_curve(confidence, correct)
    assert curve.coverage[-1] == 1.0 and np.all(np.diff(curve.coverage) > 0)
    top_fifth = curve.accuracy[np.searchsorted(curve.coverage, 0.2)]
    assert top_fifth > curve.accuracy[-1] + 0.1
    with pytest.raises(ValueError, match="1-d"):
        selective_curve(np.zeros(3), np.zeros(2, dtype=bool))


@pytest.mark.parametrize("confidence, novelty, novelty_threshold, expected", [
    (0.9, 1.0, 2.0, ""),
    (0.4, 1.0, 2.0, "low_confidence"),
    (0.5, 1.0, 2.0, ""),  # at the threshold is accepted, as in at_threshold
    (0.9, 3.0, 2.0, "novel"),
    (0.9, 2.0, 2.0, ""),  # novel means above the calibrated threshold
    (0.4, 3.0, 2.0, "low_confidence+novel"),
    (0.9, float("nan"), 2.0, ""),  # a model without a novelty score
    (0.9, 3.0, None, ""),
    (0.4, None, None, "low_confidence"),
    (None, None, 2.0, "unreadable"),
])
def test_review_reason_is_low_confidence_or_novelty(confidence, novelty, novelty_threshold, expected):
    assert review_reason(confidence, novelty, 0.5, novelty_threshold) == expected
