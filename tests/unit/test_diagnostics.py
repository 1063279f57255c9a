"""Alignment and uniformity (Wang & Isola 2020) on hand-computed examples; the kNN probe."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddae_core.heads.diagnostics import alignment, knn_accuracy, knn_predict, uniformity


def test_alignment_by_hand():
    # normalised: a = [(1, 0), (0, 1)], b = [(0, 1), (0, 1)]; squared distances 2 and 0
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[0.0, 1.0], [0.0, 3.0]])
    assert alignment(a, b) == pytest.approx(1.0)
    assert alignment(a, b, alpha=1.0) == pytest.approx(math.sqrt(2) / 2)
    assert alignment(a, a * 5.0) == pytest.approx(0.0)  # same directions: perfectly aligned


def test_uniformity_by_hand():
    # three unit vectors: squared distances 2 (e1, e2), 4 (e1, -e1), 2 (e2, -e1)
    x = np.array([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])
    expected = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert uniformity(x) == pytest.approx(expected)
    assert uniformity(x, t=1.0) == pytest.approx(math.log((2 * math.exp(-2) + math.exp(-4)) / 3))
    assert uniformity(np.array([[1.0, 1.0], [2.0, 2.0]])) == pytest.approx(0.0)  # collapsed: the maximum


def test_formulas_reject_bad_shapes():
    with pytest.raises(ValueError, match="one shape"):
        alignment(np.ones((3, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(np.ones((1, 4)))


def test_knn_votes_by_cosine_similarity():
    train = np.array([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    labels = np.array([0, 0, 1, 1])
    query = np.array([[5.0, 0.0], [0.0, 0.2], [0.9, 1.0]])  # scale does not matter, direction does
    assert knn_predict(train, labels, query, num_classes=2, k=2).tolist() == [0, 1, 1]
    assert knn_accuracy(train, labels, query, np.array([0, 1, 0]), num_classes=2, k=2) == pytest.approx(2 / 3)
    # with k=1 a single nearest neighbour decides, even when the others disagree
    assert knn_predict(train, labels, np.array([[1.0, 0.12]]), num_classes=2, k=1).tolist() == [0]
