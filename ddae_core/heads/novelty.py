"""Novelty: how unlike every known class an image's readout features are.

A classifier trained on K classes is confident on an image of none of them; this score is not. The
score is the class-conditional Mahalanobis distance with one shared covariance (Lee et al., 2018):
``min_k (x - mu_k)^T P (x - mu_k)``, on L2-normalised features (Mueller & Hein, 2025: normalising
first makes the Gaussian fit hold better), ``P`` the inverse of the within-class covariance shrunk
towards a scaled identity by the Ledoit-Wolf (2004) rule, so a few hundred rows in thousands of
dimensions still give a usable precision. The model is K means and one D x D matrix: no feature bank.

The threshold is calibrated on known-class images (validation): their ``1 - false_alarm`` quantile,
so that share of them (to within one image) scores above it. Scores above it are novel.

A readout pooled on a k x k grid holds k^2 cells per channel; when that makes it wider than a D x D
precision should be (``novelty_cells``), the model reads each channel's mean over its cells instead:
a fixed map of the same features (nothing to fit or store), so the precision stays small and its fit
fast, and the score keeps every channel of every tap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

NOVELTY_FILE = "novelty.safetensors"  # beside probe.safetensors in a probe directory
METHOD = "mahalanobis"  # class-conditional, shared Ledoit-Wolf covariance, L2-normalised features
_CHUNK = 4096  # rows per block when accumulating or scoring, to bound temporary memory
_EIG_FLOOR = 1e-12  # eigenvalues of the shrunk covariance below this times the largest are raised to it
MAX_DIM = 2048  # wider readouts are scored on their channel means (a 2048 x 2048 precision: 16 MiB, seconds)


def novelty_cells(dim: int, pool: int, max_dim: int = MAX_DIM) -> int:
    """Grid cells per channel the novelty model averages over: 1 (the features as they are) when ``dim``
    fits ``max_dim``, else all ``pool * pool`` of a readout pooled on that grid."""
    return 1 if dim <= max_dim else pool * pool


def channel_means(x: np.ndarray, cells: int) -> np.ndarray:
    """(N, D) readout features -> (N, D / cells): each channel's mean over its ``cells`` grid cells
    (``features.pool`` lays a channel's cells out together, taps one after another); 1: ``x`` itself."""
    if cells == 1:
        return x
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] % cells:
        raise ValueError(f"features of shape {x.shape} do not split into {cells} cells per channel")
    return x.reshape(len(x), -1, cells).mean(axis=2)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows (N, D) scaled to unit L2 norm, float64; an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float64).tiny)


def ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """(covariance (D, D) float64, shrinkage in [0, 1]) of rows (N, D) already centred.

    ``(1 - s) S + s (tr S / D) I`` with ``S = X^T X / N`` and Ledoit and Wolf's estimate of the
    ``s`` that minimises the expected Frobenius error; accumulated in blocks of rows.
    """
    n, d = centred.shape
    if n == 0:
        raise ValueError("cannot estimate a covariance from zero rows")
    scatter = np.zeros((d, d))
    fourth = np.zeros((d, d))  # sum over rows of x_i^2 x_j^2
    for start in range(0, n, _CHUNK):
        block = np.asarray(centred[start:start + _CHUNK], dtype=np.float64)
        scatter += block.T @ block
        squares = block * block
        fourth += squares.T @ squares
    sample = scatter / n
    mu = np.trace(sample) / d
    # delta: distance of S from the target; beta: the sampling variance of S (capped at delta)
    delta = (np.sum(sample * sample) - 2 * mu * np.trace(sample) + d * mu * mu) / d
    beta = (np.sum(fourth) / n - np.sum(sample * sample)) / (n * d)
    beta = min(beta, delta)
    shrinkage = 0.0 if beta <= 0 else float(beta / delta)
    covariance = (1 - shrinkage) * sample
    covariance[np.diag_indices(d)] += shrinkage * mu
    return covariance, shrinkage


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive semi-definite matrix, its smallest eigenvalues floored."""
    values, vectors = np.linalg.eigh(matrix)
    floor = max(float(values.max()), 0.0) * _EIG_FLOOR or _EIG_FLOOR
    return (vectors / np.maximum(values, floor)) @ vectors.T


@dataclass(frozen=True)
class NoveltyModel:
    """Class means and the shared precision of normalised train features, and the calibrated threshold."""

    means: np.ndarray  # (K, D) float32: one row per class that had train rows (D: after channel_means)
    precision: np.ndarray  # (D, D) float32, symmetric positive definite
    threshold: float = math.nan  # a score above this is novel; nan until ``calibrated``
    shrinkage: float = math.nan  # the Ledoit-Wolf weight of the identity target (reported, not used)
    cells: int = 1  # the readout's grid cells per channel it averages first (``channel_means``; 1: none)

    @property
    def dim(self) -> int:
        """Dimensions it scores in: the readout's, divided by ``cells``."""
        return int(self.means.shape[1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance (N, K) float64 of raw readout features (N, D * cells) to each class
        mean, in the normalised space of their channel means."""
        x = l2_normalise(channel_means(features, self.cells))
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1] * self.cells} dimensions, the novelty model "
                             f"{self.dim * self.cells}")
        means, precision = self.means.astype(np.float64), self.precision.astype(np.float64)
        mean_terms = np.einsum("kd,kd->k", means @ precision, means)  # (K,)
        blocks = []
        for start in range(0, len(x), _CHUNK):
            block = x[start:start + _CHUNK]
            projected = block @ precision  # (B, D)
            squared = (np.einsum("bd,bd->b", projected, block)[:, None] - 2 * projected @ means.T
                       + mean_terms[None, :])  # (B, K): (x - mu_k)^T P (x - mu_k)
            blocks.append(np.maximum(squared, 0.0))
        return np.concatenate(blocks) if blocks else np.zeros((0, len(means)))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Novelty (N,) float64 of raw readout features (N, D): the smallest squared Mahalanobis
        distance to a class mean, in the normalised space (of the order of D for a known image)."""
        return self.distances(features).min(axis=1)

    def posterior(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) float32 of the Gaussian model itself (equal priors, the shared
        covariance): ``softmax(-distance / 2)``; the nearest class is the most probable. With one class, 1."""
        logits = -0.5 * self.distances(features)
        logits -= logits.max(axis=1, keepdims=True) if len(logits) else 0.0
        weights = np.exp(logits)
        return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)

    def calibrated(self, known_scores: np.ndarray, false_alarm: float) -> "NoveltyModel":
        """This model with the threshold that flags about ``false_alarm`` of known images, given their
        ``score`` (N,) (validation: the classes the probe knows, images it was not fitted on)."""
        return replace(self, threshold=calibrate(known_scores, false_alarm))

    def is_novel(self, scores: np.ndarray) -> np.ndarray:
        """Boolean (N,): scores above the threshold (never, while uncalibrated or for a nan score)."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"means": np.ascontiguousarray(self.means, dtype=np.float32),
                "precision": np.ascontiguousarray(self.precision, dtype=np.float32),
                "threshold": np.array([self.threshold], dtype=np.float64),
                "shrinkage": np.array([self.shrinkage], dtype=np.float64),
                "cells": np.array([self.cells], dtype=np.int64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> "NoveltyModel":
        """Inverse of ``state_dict``; a file saved before ``cells`` existed scores the features as they are."""
        return cls(means=np.asarray(state["means"], np.float32), precision=np.asarray(state["precision"], np.float32),
                   threshold=float(state["threshold"][0]), shrinkage=float(state["shrinkage"][0]),
                   cells=int(state["cells"][0]) if "cells" in state else 1)

    def save(self, directory: Path) -> Path:
        """``directory/novelty.safetensors`` (tensors only, no pickle)."""
        from safetensors.numpy import save_file

        path = Path(directory) / NOVELTY_FILE
        save_file(self.state_dict(), str(path), metadata={"method": METHOD})
        return path

    @classmethod
    def load(cls, directory: Path) -> "NoveltyModel | None":
        """The model saved in ``directory``, or None when there is none (a finetune head, older models)."""
        from safetensors.numpy import load_file

        path = Path(directory) / NOVELTY_FILE
        return cls.from_state_dict(load_file(str(path))) if path.is_file() else None


def fit_novelty(features: np.ndarray, labels: np.ndarray, cells: int = 1) -> NoveltyModel:
    """The uncalibrated model of known-class features (N, D) with their labels (N,), scoring each channel's
    mean over ``cells`` grid cells (``novelty_cells``; 1: the features as they are).

    The means and precision are rounded to float32 here, so calibration scores with exactly what is saved.
    """
    x = l2_normalise(channel_means(features, cells))
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise ValueError(f"labels shape {labels.shape} does not match {len(x)} rows")
    classes, inverse = np.unique(labels, return_inverse=True)
    if len(classes) == 0:
        raise ValueError("cannot fit a novelty model on zero rows")
    counts = np.bincount(inverse, minlength=len(classes)).astype(np.float64)
    means = np.zeros((len(classes), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= counts[:, None]
    covariance, shrinkage = ledoit_wolf(x - means[inverse])
    return NoveltyModel(means.astype(np.float32), spd_inverse(covariance).astype(np.float32), shrinkage=shrinkage,
                        cells=cells)


def calibrate(scores: np.ndarray, false_alarm: float) -> float:
    """The threshold flagging ``floor(false_alarm * N)`` of ``scores`` (N,) (fewer where they tie): the
    score ranked just below that many, so the share above it is at most the rate and within 1/N of it."""
    if not 0.0 < false_alarm < 1.0:
        raise ValueError(f"false-alarm rate must be in (0, 1), got {false_alarm}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"calibration needs a non-empty 1-d array of scores, got shape {scores.shape}")
    flagged = int(np.floor(false_alarm * len(scores) + 1e-9))  # 0.29 * 100 is 28.999...: still 29
    return float(np.sort(scores)[len(scores) - 1 - flagged])


def false_alarm_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of known-class ``scores`` (N,) above ``threshold``: flagged novel though they are not."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.mean(scores > threshold)) if len(scores) else math.nan
