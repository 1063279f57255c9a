"""Label efficiency: which train rows a "1% / 10% / 100% of the labels" run may see.

Subsets are class-balanced (equal counts per class, as far as each class allows), seeded, and nested
(the 1% rows are among the 10% rows), so a curve over fractions measures labels, not luck. Every
model of a comparison (probe, raw pixels, fine-tune, from scratch) gets the same rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def subset_size(total: int, fraction: float, num_classes: int) -> int:
    """Rows for ``fraction`` of ``total`` labels: rounded, at least one per class, at most ``total``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return min(total, max(num_classes, int(round(fraction * total))))


def _quotas(counts: np.ndarray, size: int, order: np.ndarray) -> np.ndarray:
    """Per-class row counts summing to ``size``: as equal as possible, capped by ``counts``.

    Classes that run out hand their share to the others; remainders go to classes in ``order``
    (a seeded ranking), so quotas only grow with ``size`` and the subsets nest.
    """
    quotas = np.zeros_like(counts)
    remaining = size
    open_classes = [c for c in order if counts[c] > 0]
    while remaining > 0 and open_classes:
        share, extra = divmod(remaining, len(open_classes))
        for rank, c in enumerate(open_classes):
            quotas[c] += min(share + (1 if rank < extra else 0), counts[c] - quotas[c])
        remaining = size - int(quotas.sum())
        open_classes = [c for c in open_classes if quotas[c] < counts[c]]
    return quotas


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset of ``size`` rows of ``labels`` (int (N,)).

    Per class, rows come in one seeded order, the first ``quota`` of them taken; so for one seed a
    smaller subset is contained in a larger one.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 <= size <= len(labels):
        raise ValueError(f"subset size must be in [0, {len(labels)}], got {size}")
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    rng = np.random.default_rng([seed, 0x1ABE1])
    order = rng.permutation(len(classes))
    quotas = _quotas(counts, size, order)
    chosen = [rng.permutation(np.flatnonzero(inverse == c))[: quotas[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def capped_subset(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset of at most ``cap`` rows (``cap`` 0 = every row)."""
    labels = np.asarray(labels)
    return balanced_subset(labels, min(cap or len(labels), len(labels)), seed)


def label_subsets(labels: np.ndarray, fractions: Sequence[float], seed: int) -> dict[float, np.ndarray]:
    """``{fraction: sorted row indices}`` for each fraction of the labelled rows, nested and seeded."""
    labels = np.asarray(labels)
    num_classes = len(np.unique(labels))
    return {float(f): balanced_subset(labels, subset_size(len(labels), float(f), num_classes), seed)
            for f in fractions}


def fraction_label(fraction: float) -> str:
    """``0.01 -> "1%"``: how a fraction is shown in tables and metric names."""
    return f"{100 * fraction:g}%"
