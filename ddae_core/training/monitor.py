"""The probe monitor: how linearly separable the EMA network's features are, at points during pretraining.

DDAE's probe accuracy peaks before generation quality does (the paper picked epoch 800 of 2000 by
hand); scoring the EMA network every few thousand steps on a small labelled subset makes the peak
visible in every run and lets the run carry forward the best checkpoint instead of the last. Each
point reads every tap at one noise level with global pooling through the one feature path
(``features.extract_all``), fits the cached probe's linear probe per tap on the train subset
(L2 chosen on val) and a kNN vote on the same features; the point's score is the best tap's linear
validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ddae_core.features import extract_all
from ddae_core.heads.diagnostics import knn_accuracy
from ddae_core.heads.probe import select_probe
from ddae_core.readout import FeaturePrecision


@dataclass(frozen=True)
class LabelledImages:
    """Images the monitor scores on: uint8 (N, H, W, C), int64 labels (N,), sample ids keying the noise (N,)."""

    images: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray


@dataclass(frozen=True)
class ProbeMonitor:
    """Scores a network: ``__call__(denoiser)`` -> ``{"score", "linear_val_acc", "knn_val_acc", "tap_index"}``."""

    train: LabelledImages
    val: LabelledImages
    taps: tuple[str, ...]  # block names, all read from one forward pass
    level: float  # DDPM t or EDM sigma
    num_classes: int
    l2_grid: tuple[float, ...]
    max_iter: int = 100
    knn_k: int = 20
    knn_temperature: float = 0.07
    seed: int = 0  # keys the features' noise
    batch_size: int = 256
    precision: FeaturePrecision = "fp32"  # the network's while read (extract.precision, resolved)

    def features(self, denoiser: nn.Module, split: LabelledImages, device: torch.device) -> dict[str, np.ndarray]:
        """Per tap, the (N, D) globally pooled features of ``split`` at the monitor's level."""
        out = extract_all(denoiser, split.images, split.sample_ids, taps=list(self.taps), levels=[self.level],
                          pools=[1], seed=self.seed, batch_size=self.batch_size, progress=False, device=device,
                          precision=self.precision)
        return {tap: out[(tap, self.level, 1)] for tap in self.taps}

    def __call__(self, denoiser: nn.Module) -> dict[str, float]:
        device = next(denoiser.parameters()).device
        train, val = self.features(denoiser, self.train, device), self.features(denoiser, self.val, device)
        tap, _l2, _probe, table = select_probe(
            {tap: (train[tap], val[tap]) for tap in self.taps}, self.train.labels, self.val.labels,
            num_classes=self.num_classes, l2_grid=self.l2_grid, max_iter=self.max_iter, progress=False)
        linear = max(row["val_acc"] for row in table if row["key"] == tap)
        knn = knn_accuracy(train[tap], self.train.labels, val[tap], self.val.labels, num_classes=self.num_classes,
                           k=self.knn_k, temperature=self.knn_temperature)
        return {"score": float(linear), "linear_val_acc": float(linear), "knn_val_acc": float(knn),
                "tap_index": float(self.taps.index(tap))}


def best_point(points: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest ``score``; the earliest of equal ones (fewer steps, same accuracy)."""
    best = None
    for point in sorted(points, key=lambda p: p["step"]):
        if best is None or point["score"] > best["score"]:
            best = point
    return best


__all__ = ["LabelledImages", "ProbeMonitor", "best_point"]
