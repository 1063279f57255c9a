"""Class-balanced, seeded row subsets: the one sampler behind every "take n rows of this split".

Used by prepare (``max_train`` / ``max_test``), probe screening, the label-efficiency fractions, the
kNN queries, the diagnostics pairs, fine-tuning's val/test rows and the online probe's caps.

The rule: per-class quotas are max-min fair (equal shares, a class that runs out hands the rest of
its share to the others, repeated); the last rows, fewer than the classes still open, go one each to
a seeded choice of classes. Per class the rows come in one seeded order and the first ``quota`` are
taken. ``nested_subset`` fixes the class ranking before anything else is drawn, so for one seed a
smaller subset lies inside a larger one (a curve over label fractions measures labels, not luck).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

_NESTED_STREAM = 0x1ABE1  # the label-efficiency stream: default_rng([seed, _NESTED_STREAM])


def class_quotas(counts: np.ndarray, size: int, rng: np.random.Generator, *,
                 order: np.ndarray | None = None) -> np.ndarray:
    """Rows per class (int64 (K,)) summing to ``min(size, counts.sum())``, each at most ``counts[c]``.

    Water-filling: every open class gets an equal share, capped by what it has left, until fewer rows
    remain than open classes; those go one each to the first open classes of ``order`` (a ranking of
    all K classes) or, without one, of ``rng.permutation(open classes)``, drawn only then.
    """
    counts = np.asarray(counts, dtype=np.int64)
    quotas = np.zeros(len(counts), np.int64)
    remaining = min(int(size), int(counts.sum()))
    while remaining > 0:
        open_classes = np.flatnonzero(quotas < counts)
        share = remaining // len(open_classes)
        if share == 0:
            ranked = order[np.isin(order, open_classes)] if order is not None else rng.permutation(open_classes)
            quotas[ranked[:remaining]] += 1
            break
        given = np.minimum(counts[open_classes] - quotas[open_classes], share)
        quotas[open_classes] += given
        remaining -= int(given.sum())
    return quotas


def balanced_subset(labels: np.ndarray, size: int, rng: np.random.Generator, *,
                    order: np.ndarray | None = None) -> np.ndarray:
    """Sorted int64 indices of ``min(size, len(labels))`` rows of ``labels`` (N,), class-balanced.

    Quotas from ``class_quotas``; then, class by class in sorted label order, ``rng.permutation`` of
    that class's rows, the first ``quota`` kept. ``order`` ranks the classes (by position in
    ``np.unique(labels)``) for the remainder; see ``nested_subset``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if size < 0:
        raise ValueError(f"subset size must be >= 0, got {size}")
    classes, inverse = np.unique(labels, return_inverse=True)
    quotas = class_quotas(np.bincount(inverse, minlength=len(classes)), size, rng, order=order)
    chosen = [rng.permutation(np.flatnonzero(inverse == c))[: quotas[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(chosen)).astype(np.int64, copy=False) if chosen else np.zeros(0, np.int64)


def nested_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``balanced_subset`` of exactly ``size`` rows whose results nest: for one seed, size a <= b gives
    rows(a) within rows(b). The class ranking is drawn first from ``default_rng([seed, 0x1ABE1])``,
    so no later draw depends on ``size``.
    """
    labels = np.asarray(labels)
    if not 0 <= size <= len(labels):
        raise ValueError(f"subset size must be in [0, {len(labels)}], got {size}")
    rng = np.random.default_rng([seed, _NESTED_STREAM])
    order = rng.permutation(len(np.unique(labels)))
    return balanced_subset(labels, size, rng, order=order)


def capped_subset(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of a nested class-balanced subset of at most ``cap`` rows (``cap`` 0 = every row)."""
    labels = np.asarray(labels)
    return nested_subset(labels, min(cap or len(labels), len(labels)), seed)


def subset_size(total: int, fraction: float, num_classes: int) -> int:
    """Rows for ``fraction`` of ``total`` labels: rounded, at least one per class, at most ``total``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return min(total, max(num_classes, int(round(fraction * total))))


def too_few_labels(fractions: Sequence[float], labels: np.ndarray) -> dict[float, int]:
    """The fractions (below 1) that would hold fewer labels than there are classes, with that count:
    under one image per class a fraction no longer means its share, so it is skipped, not padded."""
    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    counts = {float(f): int(round(float(f) * len(labels))) for f in fractions if float(f) < 1.0}
    return {f: n for f, n in counts.items() if n < num_classes}


def label_subsets(labels: np.ndarray, fractions: Sequence[float], seed: int) -> dict[float, np.ndarray]:
    """``{fraction: sorted row indices}`` for each fraction of the labelled rows, nested and seeded;
    fractions in ``too_few_labels`` are left out, each with a warning.

    Every model of a label-efficiency comparison (probe, raw pixels, fine-tune, from scratch) gets
    these same rows.
    """
    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    skipped = too_few_labels(fractions, labels)
    for fraction, count in skipped.items():
        log.warning("label efficiency: skipping %s: %d labels for %d classes is under one image per class",
                    fraction_label(fraction), count, num_classes)
    return {float(f): nested_subset(labels, subset_size(len(labels), float(f), num_classes), seed)
            for f in fractions if float(f) not in skipped}


def fraction_label(fraction: float) -> str:
    """``0.01 -> "1%"``: how a fraction is shown in tables and metric names."""
    return f"{100 * fraction:g}%"


__all__ = ["balanced_subset", "capped_subset", "class_quotas", "fraction_label", "label_subsets",
           "nested_subset", "subset_size", "too_few_labels"]
