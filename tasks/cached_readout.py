"""The probe's chosen readout, read back from the feature store (for fine-tuning and evaluation).

Fine-tuning and the label-efficiency study reuse the features the extract stage cached for the
readout the probe chose (``outputs/probe/selection.json``): nothing is re-extracted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common import Paths, StageError
from tasks.feature_store import FeatureKey, read_split


@dataclass(frozen=True)
class Readout:
    """The probe's choice: taps (concatenated in order), noise level, pooling grid, L2, seed."""

    taps: tuple[str, ...]
    level: float
    pool: int
    l2: float
    seed: int
    class_names: tuple[str, ...]
    test_acc: float
    val_acc: float

    @property
    def name(self) -> str:
        return FeatureKey("+".join(self.taps), self.level, self.pool).label


def load_selection(paths: Paths) -> Readout:
    """``outputs/probe/selection.json`` as a ``Readout``; a clear error when the probe has not run."""
    path = paths.probe / "selection.json"
    if not path.is_file():
        raise StageError(f"{path} not found: run the probe stage first")
    data = json.loads(path.read_text())
    return Readout(taps=tuple(data["taps"]), level=float(data["level"]), pool=int(data["pool"]),
                   l2=float(data["l2"]), seed=int(data["seed"]), class_names=tuple(data["class_names"]),
                   test_acc=float(data["test_acc"]), val_acc=float(data["val_acc"]))


def load_index(paths: Paths) -> dict:
    """The feature store's ``index.json``; a clear error when the extract stage has not run."""
    path = paths.features / "index.json"
    if not path.is_file():
        raise StageError(f"{path} not found: run the extract stage first")
    return json.loads(path.read_text())


def read_readout(features: Path, taps: tuple[str, ...], level: float, pool: int, split: str,
                 expected_hash: str) -> tuple[np.ndarray, np.ndarray]:
    """Copy-0 features (N, D) of one split, taps concatenated in order, and labels (N,)."""
    blocks, labels, ids = [], None, None
    for tap in taps:
        part = read_split(features, FeatureKey(tap, float(level), int(pool)), split, 1, expected_hash)
        if ids is not None and not np.array_equal(ids, part.sample_ids):
            raise StageError(f"{features}: rows of {tap} ({split}) are not aligned with {taps[0]}")
        blocks.append(part.features)
        labels, ids = part.labels, part.sample_ids
    return (blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)), np.asarray(labels)
