"""The Parquet feature store: one row per image per (tap, level, pool, copy).

Layout: ``<root>/tap=<tap>/level=<level>/pool=<pool>/<split>-copy<k>.parquet``, so one
(tap, level, pool) reads without touching the rest. Each file carries every column (self-describing)
and, in its schema metadata, the checkpoint hash and network config it was computed from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_COLUMNS = ("sample_id", "split", "label", "tap", "level", "pool", "copy", "feature")


@dataclass(frozen=True)
class FeatureKey:
    """One probed representation: a block, a noise level (t or sigma) and a pooling grid."""

    tap: str
    level: float
    pool: int

    @property
    def label(self) -> str:
        return f"{self.tap}@{self.level:g}/p{self.pool}"

    def directory(self, root: Path) -> Path:
        return root / f"tap={self.tap}" / f"level={self.level:g}" / f"pool={self.pool}"


def part_path(root: Path, key: FeatureKey, split: str, copy: int) -> Path:
    return key.directory(root) / f"{split}-copy{copy}.parquet"


def write_part(path: Path, key: FeatureKey, split: str, copy: int, sample_ids: np.ndarray,
               labels: np.ndarray, features: np.ndarray, metadata: dict) -> None:
    """Write one (key, split, copy) part through a temporary name (readers never see half a file)."""
    n, dim = features.shape
    values = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table({
        "sample_id": pa.array(sample_ids, type=pa.int64()),
        "split": pa.array([split] * n, type=pa.string()),
        "label": pa.array(labels, type=pa.int64()),
        "tap": pa.array([key.tap] * n, type=pa.string()),
        "level": pa.array(np.full(n, key.level), type=pa.float64()),
        "pool": pa.array(np.full(n, key.pool), type=pa.int32()),
        "copy": pa.array(np.full(n, copy), type=pa.int32()),
        "feature": pa.FixedSizeListArray.from_arrays(values, dim),
    })
    table = table.replace_schema_metadata({b"ddae": json.dumps(metadata, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", use_dictionary=["split", "tap"])
    tmp.replace(path)


@dataclass(frozen=True)
class FeaturePart:
    """A part read back: ids, labels and the (N, D) float32 feature matrix."""

    sample_ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    metadata: dict


def read_part(path: Path) -> FeaturePart:
    """Read one part; the feature column comes back as a contiguous (N, D) float32 array."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature part not found; rerun the extract stage")
    table = pq.read_table(path, columns=["sample_id", "label", "feature"])
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    meta = json.loads((table.schema.metadata or {}).get(b"ddae", b"{}"))
    return FeaturePart(
        sample_ids=table.column("sample_id").to_numpy(),
        labels=table.column("label").to_numpy(),
        features=flat.reshape(-1, dim).astype(np.float32, copy=False),
        metadata=meta,
    )


def read_split(root: Path, key: FeatureKey, split: str, copies: int = 1,
               expected_hash: str | None = None) -> FeaturePart:
    """Read copies 0..copies-1 of one split, stacked; checks every part's checkpoint hash."""
    parts = [read_part(part_path(root, key, split, c)) for c in range(copies)]
    for c, part in enumerate(parts):
        found = part.metadata.get("network_hash")
        if expected_hash is not None and found != expected_hash:
            raise ValueError(
                f"{part_path(root, key, split, c)}: computed from checkpoint {found}, expected "
                f"{expected_hash}; rerun the extract stage"
            )
    return FeaturePart(
        sample_ids=np.concatenate([p.sample_ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        features=np.concatenate([p.features for p in parts]),
        metadata=parts[0].metadata,
    )
