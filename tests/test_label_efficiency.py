"""Label sampling for the label-efficiency study: class balance, determinism, nesting, sizes."""

from __future__ import annotations

import numpy as np
import pytest

from ddae_core.label_efficiency import balanced_subset, fraction_label, label_subsets, subset_size


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``counts[c]`` rows of class c."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def test_subset_has_equal_counts_per_class():
    labels = _labels([100] * 10)
    rows = balanced_subset(labels, 50, seed=0)
    assert len(rows) == 50 and len(np.unique(rows)) == 50
    assert np.bincount(labels[rows], minlength=10).tolist() == [5] * 10


def test_remainder_spreads_one_extra_row_over_classes():
    labels = _labels([30] * 4)
    counts = np.bincount(labels[balanced_subset(labels, 10, seed=3)], minlength=4)
    assert counts.sum() == 10 and counts.max() - counts.min() == 1


def test_small_class_gives_its_share_to_the_others():
    labels = _labels([2, 40, 40])
    counts = np.bincount(labels[balanced_subset(labels, 30, seed=0)], minlength=3)
    assert counts.tolist() == [2, 14, 14]


def test_same_seed_same_rows_other_seed_other_rows():
    labels = _labels([200] * 10)
    first = balanced_subset(labels, 100, seed=7)
    assert np.array_equal(first, balanced_subset(labels, 100, seed=7))
    assert not np.array_equal(first, balanced_subset(labels, 100, seed=8))


def test_fractions_are_nested_and_full_fraction_is_everything():
    labels = _labels([60, 50, 90, 40])
    subsets = label_subsets(labels, [0.05, 0.3, 1.0], seed=1)
    small, medium, full = subsets[0.05], subsets[0.3], subsets[1.0]
    assert set(small) <= set(medium) <= set(full)
    assert np.array_equal(full, np.arange(len(labels)))
    assert len(small) == round(0.05 * 240) and len(medium) == round(0.3 * 240)


def test_subset_size_keeps_one_row_per_class_and_rejects_bad_fractions():
    assert subset_size(54000, 0.01, 10) == 540
    assert subset_size(100, 0.01, 10) == 10  # never fewer rows than classes
    assert subset_size(100, 1.0, 10) == 100
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subset_size(100, bad, 10)
    with pytest.raises(ValueError, match="subset size"):
        balanced_subset(_labels([5, 5]), 11, seed=0)


def test_fraction_label():
    assert [fraction_label(f) for f in (0.01, 0.1, 1.0)] == ["1%", "10%", "100%"]
