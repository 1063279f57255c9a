"""Per-class scores: the confusion matrix, balanced accuracy on uneven classes, and label fractions
too small to hold one image per class."""

from __future__ import annotations

import numpy as np
import pytest

from ddae_core.heads.metrics import balanced_accuracy, confusion_matrix, per_class
from ddae_core.sampling import label_subsets, too_few_labels


def test_balanced_accuracy_sees_the_rare_class_that_accuracy_hides():
    y_true = np.array([0] * 8 + [1] * 2 + [2] * 2)
    y_pred = np.array([0] * 8 + [0, 0] + [2, 1])  # class 1 always wrong, class 2 half right
    confusion = confusion_matrix(y_true, y_pred, 3)
    assert confusion.tolist() == [[8, 0, 0], [2, 0, 0], [0, 1, 1]]
    assert np.mean(y_true == y_pred) == pytest.approx(9 / 12)
    assert balanced_accuracy(confusion) == pytest.approx((1 + 0 + 0.5) / 3)
    assert per_class(confusion, ["a", "b", "c"]) == {"a": {"images": 8, "recall": 1.0},
                                                     "b": {"images": 2, "recall": 0.0},
                                                     "c": {"images": 2, "recall": 0.5}}


def test_a_class_absent_from_the_split_does_not_count_in_balanced_accuracy():
    confusion = confusion_matrix(np.array([0, 0, 2]), np.array([0, 1, 2]), 3)
    assert confusion[1].sum() == 0 and confusion[:, 1].sum() == 1  # predicted, never true
    assert balanced_accuracy(confusion) == pytest.approx((0.5 + 1.0) / 2)
    assert per_class(confusion, ["a", "b", "c"])["b"] == {"images": 0, "recall": None}


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 2\)"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)


def test_fractions_under_one_label_per_class_are_skipped_not_padded(caplog):
    labels = np.repeat(np.arange(10), 10)  # 100 labels, 10 classes
    assert too_few_labels([0.01, 0.05, 0.1, 1.0], labels) == {0.01: 1, 0.05: 5}
    with caplog.at_level("WARNING", logger="ddae_core.sampling"):
        subsets = label_subsets(labels, [0.01, 0.05, 0.1, 1.0], seed=0)
    assert [r.getMessage() for r in caplog.records] == [
        "label efficiency: skipping 1%: 1 labels for 10 classes is under one image per class",
        "label efficiency: skipping 5%: 5 labels for 10 classes is under one image per class"]
    assert sorted(subsets) == [0.1, 1.0] and len(subsets[0.1]) == 10
    assert too_few_labels([0.01], np.repeat(np.arange(2), 200)) == {}  # 4 labels for 2 classes: kept
