"""The one class-balanced sampler: default-run subsets frozen, balance, seeding, nesting, sizes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ddae_core.sampling import (
    balanced_subset,
    capped_subset,
    class_quotas,
    fraction_label,
    label_subsets,
    nested_subset,
    subset_size,
)


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    """Shuffled labels with ``counts[c]`` rows of class c."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


# ----------------------------------------------------------------------------- the default run

# Synthetic labels with the default run's class counts (Fashion-MNIST): the source's train split
# (6,000 per class, what prepare's max_train subsets), and after plan_splits train 5,400, val 600
# and test 1,000 per class.
SOURCE_TRAIN = _labels([6000] * 10, seed=4)
TRAIN = _labels([5400] * 10, seed=1)
VAL = _labels([600] * 10, seed=2)
TEST = _labels([1000] * 10, seed=3)

# Every subset the default run (and the e2e run's prepare) draws, as the callers draw it.
DEFAULT_RUN_SUBSETS = {
    "probe screening 5000, seed 0": lambda: balanced_subset(TRAIN, 5000, np.random.default_rng(0)),
    "label fraction 1% (540)": lambda: label_subsets(TRAIN, [0.01, 0.1, 1.0], 0)[0.01],
    "label fraction 10% (5,400)": lambda: label_subsets(TRAIN, [0.01, 0.1, 1.0], 0)[0.1],
    "label fraction 100% (54,000)": lambda: label_subsets(TRAIN, [0.01, 0.1, 1.0], 0)[1.0],
    "kNN queries 2000 (and finetune test_max 2000)": lambda: capped_subset(TEST, 2000, 0),
    "diagnostics pairs 256": lambda: nested_subset(TRAIN, 256, 0),
    "finetune val_max 500": lambda: capped_subset(VAL, 500, 0),
    "prepare max_train 600": lambda: balanced_subset(SOURCE_TRAIN, 600, np.random.default_rng([0, 2])),
    "prepare max_test 200": lambda: balanced_subset(TEST, 200, np.random.default_rng([0, 3])),
}

# sha256 of each subset as little-endian int64 (PCG64 streams are the same on every platform). Taken
# when this sampler replaced prepare's, the probe's and label_efficiency's own samplers, in the run
# that showed it draws exactly their rows for every call above.
FROZEN_SHA256 = {
    "diagnostics pairs 256": "3a72a78f1918b461cd6661848fcdf7f84f0c50d10e60cc21f54ab4092e342f9e",
    "finetune val_max 500": "e1864a757089789a2eb8a570c9e932c2c68247fd093c214caecbbc91399fa18a",
    "kNN queries 2000 (and finetune test_max 2000)": "00d8f371ff3750543595349e1dd30a96eaa187446b8f0df5d9c6797533693f1a",
    "label fraction 1% (540)": "a628da00eca9fb68100f583f7da5203b0d7bfa13d84df1e12067a185a838c1e0",
    "label fraction 10% (5,400)": "ceb7a509e61671729f511c0f15471a9965c255d0e08b6c05bbf2fd3df6393ad1",
    "label fraction 100% (54,000)": "8b38bdb601be8e727cdf0718da75ed6ccb682f9f06605cd7ce4452e5f4382c74",
    "prepare max_test 200": "456f6672e2d6a73493212569955d082bd77dccf6a90f65080d5b197fd6805929",
    "prepare max_train 600": "44d65a5698a055a1b6cc18469698f672b42691ff5b81af02b8e357228d26a929",
    "probe screening 5000, seed 0": "a0de0083d577fd61a38cdf2b9894f59628209cdf11a6e8e8e55ae7457808ec66",
}


def _sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(DEFAULT_RUN_SUBSETS))
def test_default_run_subsets_are_frozen(name):
    """The exact rows the default run always drew, so a change of the rule cannot pass unnoticed."""
    indices = DEFAULT_RUN_SUBSETS[name]()
    assert _sha256(indices) == FROZEN_SHA256[name]


def test_default_run_subsets_have_the_sizes_and_balance_the_callers_expect():
    sources = {"probe screening 5000, seed 0": TRAIN, "label fraction 1% (540)": TRAIN,
               "label fraction 10% (5,400)": TRAIN, "label fraction 100% (54,000)": TRAIN,
               "kNN queries 2000 (and finetune test_max 2000)": TEST, "diagnostics pairs 256": TRAIN,
               "finetune val_max 500": VAL, "prepare max_train 600": SOURCE_TRAIN, "prepare max_test 200": TEST}
    sizes = {}
    for name, labels in sources.items():
        rows = DEFAULT_RUN_SUBSETS[name]()
        counts = np.bincount(labels[rows], minlength=10)
        assert counts.max() - counts.min() <= 1, name  # 256 rows: six classes of 26, four of 25
        sizes[name] = len(rows)
    assert sizes == {"probe screening 5000, seed 0": 5000, "label fraction 1% (540)": 540,
                     "label fraction 10% (5,400)": 5400, "label fraction 100% (54,000)": 54000,
                     "kNN queries 2000 (and finetune test_max 2000)": 2000, "diagnostics pairs 256": 256,
                     "finetune val_max 500": 500, "prepare max_train 600": 600, "prepare max_test 200": 200}


# ----------------------------------------------------------------------------- balance and seeding


def test_subset_has_equal_counts_per_class():
    labels = _labels([100] * 10)
    rows = nested_subset(labels, 50, seed=0)
    assert len(rows) == 50 and len(np.unique(rows)) == 50
    assert np.bincount(labels[rows], minlength=10).tolist() == [5] * 10


def test_balanced_subset_is_balanced_seeded_and_sorted():
    labels = np.repeat(np.arange(4), [50, 30, 40, 80])
    idx = balanced_subset(labels, 40, np.random.default_rng(1))
    assert len(idx) == 40 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 10, 10, 10]
    assert np.array_equal(idx, balanced_subset(labels, 40, np.random.default_rng(1)))
    assert not np.array_equal(idx, balanced_subset(labels, 40, np.random.default_rng(2)))


def test_remainder_spreads_one_extra_row_over_classes():
    labels = _labels([30] * 4)
    counts = np.bincount(labels[nested_subset(labels, 10, seed=3)], minlength=4)
    assert counts.sum() == 10 and counts.max() - counts.min() == 1
    rng_counts = np.bincount(np.repeat([0, 1, 2], 10)[balanced_subset(np.repeat([0, 1, 2], 10), 7,
                                                                        np.random.default_rng(0))])
    assert sorted(rng_counts.tolist()) == [2, 2, 3]


def test_small_class_gives_its_share_to_the_others():
    labels = _labels([2, 40, 40])
    counts = np.bincount(labels[nested_subset(labels, 30, seed=0)], minlength=3)
    assert counts.tolist() == [2, 14, 14]


def test_quotas_are_max_min_fair_whatever_the_ranking():
    """Equal shares first, caps respected, leftovers one each: [4, 10, 9] -> 20 rows is [4, 8, 8]."""
    counts, rng = np.array([4, 10, 9]), np.random.default_rng(0)
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        assert class_quotas(counts, 20, rng, order=np.array(order)).tolist() == [4, 8, 8]
    assert class_quotas(counts, 17, rng, order=np.array([2, 0, 1])).tolist() == [4, 6, 7]
    assert class_quotas(counts, 99, rng).tolist() == [4, 10, 9]  # all of every class, no draw needed
    assert class_quotas(np.array([5, 0, 5]), 4, rng, order=np.array([1, 2, 0])).tolist() == [2, 0, 2]


def test_quotas_are_fair_on_random_counts():
    """Right total, within each class's count, and no class more than one row below another unless
    it is exhausted."""
    gen = np.random.default_rng(11)
    for _ in range(300):
        counts = gen.integers(0, 12, size=gen.integers(1, 6))
        size = int(gen.integers(0, counts.sum() + 3))
        quotas = class_quotas(counts, size, np.random.default_rng(0))
        assert quotas.sum() == min(size, counts.sum()) and np.all(quotas <= counts) and np.all(quotas >= 0)
        for a in range(len(counts)):
            for b in range(len(counts)):
                assert quotas[a] == counts[a] or quotas[a] >= quotas[b] - 1, (counts, size, quotas)


def test_same_seed_same_rows_other_seed_other_rows():
    labels = _labels([200] * 10)
    first = nested_subset(labels, 100, seed=7)
    assert np.array_equal(first, nested_subset(labels, 100, seed=7))
    assert not np.array_equal(first, nested_subset(labels, 100, seed=8))


def test_whole_and_empty_subsets():
    labels = _labels([3, 5, 2])
    assert np.array_equal(balanced_subset(labels, 10, np.random.default_rng(0)), np.arange(10))
    assert np.array_equal(balanced_subset(labels, 25, np.random.default_rng(0)), np.arange(10))  # capped
    assert balanced_subset(labels, 0, np.random.default_rng(0)).tolist() == []
    empty = balanced_subset(np.zeros(0, np.int64), 5, np.random.default_rng(0))
    assert empty.dtype == np.int64 and len(empty) == 0
    assert balanced_subset(labels, 4, np.random.default_rng(0)).dtype == np.int64


# ----------------------------------------------------------------------------- nesting


def test_nested_subsets_nest_for_every_size():
    gen = np.random.default_rng(5)
    for trial in range(40):
        labels = _labels(list(gen.integers(1, 15, size=gen.integers(1, 6))), seed=trial)
        previous: set[int] = set()
        for size in range(len(labels) + 1):
            rows = set(nested_subset(labels, size, seed=trial).tolist())
            assert len(rows) == size and previous <= rows, (labels, size)
            previous = rows


def test_fractions_are_nested_and_full_fraction_is_everything():
    labels = _labels([60, 50, 90, 40])
    subsets = label_subsets(labels, [0.05, 0.3, 1.0], seed=1)
    small, medium, full = subsets[0.05], subsets[0.3], subsets[1.0]
    assert set(small) <= set(medium) <= set(full)
    assert np.array_equal(full, np.arange(len(labels)))
    assert len(small) == round(0.05 * 240) and len(medium) == round(0.3 * 240)


def test_capped_subset_zero_means_every_row():
    labels = _labels([7, 9])
    assert np.array_equal(capped_subset(labels, 0, seed=0), np.arange(16))
    assert np.array_equal(capped_subset(labels, 100, seed=0), np.arange(16))
    assert np.array_equal(capped_subset(labels, 6, seed=0), nested_subset(labels, 6, seed=0))


# ----------------------------------------------------------------------------- sizes and errors


def test_subset_size_keeps_one_row_per_class_and_rejects_bad_fractions():
    assert subset_size(54000, 0.01, 10) == 540
    assert subset_size(100, 0.01, 10) == 10  # never fewer rows than classes
    assert subset_size(100, 1.0, 10) == 100
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subset_size(100, bad, 10)
    with pytest.raises(ValueError, match="subset size"):
        nested_subset(_labels([5, 5]), 11, seed=0)
    with pytest.raises(ValueError, match="subset size"):
        balanced_subset(_labels([5, 5]), -1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        balanced_subset(np.zeros((2, 2)), 1, np.random.default_rng(0))


def test_fraction_label():
    assert [fraction_label(f) for f in (0.01, 0.1, 1.0)] == ["1%", "10%", "100%"]
