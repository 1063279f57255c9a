"""Representation diagnostics: alignment and uniformity (Wang & Isola, 2020) and a kNN probe.

As in the official DDAE feature study: features are L2-normalised first; alignment is the mean
squared distance between two augmented views of the same image (lower = more invariant), uniformity
the log of the mean Gaussian potential between different images (lower = more spread out). The kNN
probe is the usual cosine-similarity, temperature-weighted vote (Wu et al. 2018), beside the linear one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 2048  # query rows per similarity block (bounds memory to CHUNK x N floats)


def _normalised(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, float64 (N, D); rejects non-2-D input."""
    tensor = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()
    if tensor.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(tensor.shape)}")
    return F.normalize(tensor, dim=1)


def alignment(view_a: np.ndarray | torch.Tensor, view_b: np.ndarray | torch.Tensor, alpha: float = 2.0) -> float:
    """``E ||f(x) - f(x+)||^alpha`` over row pairs of two views (N, D), features normalised first."""
    a, b = _normalised(view_a), _normalised(view_b)
    if a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"views must be non-empty and of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a - b).norm(dim=1).pow(alpha).mean())


def uniformity(features: np.ndarray | torch.Tensor, t: float = 2.0) -> float:
    """``log E exp(-t ||f(x) - f(y)||^2)`` over all pairs x != y of rows (N, D), normalised first."""
    x = _normalised(features)
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {x.shape[0]}")
    return float(torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log())


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, *, num_classes: int,
                k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """Class of each query row (int64 (M,)): the k most cosine-similar train rows vote exp(sim / T)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    bank = _normalised(train).float()  # (N, D)
    labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
    if labels.shape != (bank.shape[0],):
        raise ValueError(f"{labels.shape[0]} train labels for {bank.shape[0]} train rows")
    queries = _normalised(query).float()  # (M, D)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"query has {queries.shape[1]} features, train {bank.shape[1]}")
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], _CHUNK):
        similarity = queries[start:start + _CHUNK] @ bank.T  # (B, N)
        top, index = similarity.topk(k, dim=1)  # (B, k)
        votes = torch.zeros((top.shape[0], num_classes)).scatter_add_(1, labels[index], (top / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, query_labels: np.ndarray,
                 *, num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Fraction of query rows the kNN vote classifies as ``query_labels``."""
    predicted = knn_predict(train, train_labels, query, num_classes=num_classes, k=k, temperature=temperature)
    return float((predicted == np.asarray(query_labels)).mean()) if len(predicted) else 0.0
