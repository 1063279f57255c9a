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

from ddae_core.atomic import atomic_file
from tasks.common import StageError

FEATURE_COLUMNS = ("sample_id", "split", "label", "tap", "level", "pool", "copy", "feature")


class FeatureStoreError(StageError):
    """A feature file is missing or was computed from another checkpoint: rerun extract."""


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


def feature_table(key: FeatureKey, split: str, copy: int, sample_ids: np.ndarray, labels: np.ndarray,
                  features: np.ndarray) -> pa.Table:
    """One block of rows (features (N, D)) in the extract stage's columns, ``FEATURE_COLUMNS``."""
    n = len(features)
    return pa.table({
        "sample_id": pa.array(sample_ids, type=pa.int64()),
        "split": pa.array([split] * n, type=pa.string()),
        "label": pa.array(labels, type=pa.int64()),
        "tap": pa.array([key.tap] * n, type=pa.string()),
        "level": pa.array(np.full(n, key.level), type=pa.float64()),
        "pool": pa.array(np.full(n, key.pool), type=pa.int32()),
        "copy": pa.array(np.full(n, copy), type=pa.int32()),
        "feature": _feature_column(features),
    })


def write_part(path: Path, key: FeatureKey, split: str, copy: int, sample_ids: np.ndarray,
               labels: np.ndarray, features: np.ndarray, metadata: dict) -> None:
    """Write one (key, split, copy) part through a temporary name (readers never see half a file)."""
    table = feature_table(key, split, copy, sample_ids, labels, features)
    write_table_atomic(table, path, metadata, use_dictionary=["split", "tap"])


def write_table_atomic(table: pa.Table, path: Path, metadata: dict, use_dictionary: list[str] | bool) -> None:
    """Write ``table`` (``metadata`` in its schema) through ``atomic_file``: readers never see half a file."""
    table = table.replace_schema_metadata({b"ddae": json.dumps(metadata, sort_keys=True).encode()})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=use_dictionary)


def _feature_column(features: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float32 -> a fixed_size_list<float32>[D] column (one list per row)."""
    n, dim = features.shape
    values = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, dim)


def _column_to_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32> column back to a contiguous (N, D) float32 array."""
    column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def write_unit(path: Path, sample_ids: np.ndarray, labels: np.ndarray, features: list[np.ndarray],
               metadata: dict) -> None:
    """One resumable unit of extraction: a block of rows with every key's features (column ``f<i>``)."""
    columns = {"sample_id": pa.array(sample_ids, type=pa.int64()), "label": pa.array(labels, type=pa.int64())}
    columns.update({f"f{i}": _feature_column(values) for i, values in enumerate(features)})
    write_table_atomic(pa.table(columns), path, metadata, use_dictionary=False)


def read_unit(path: Path, key_index: int) -> FeaturePart:
    """The ids, labels and features of key ``key_index`` of one unit file."""
    table = pq.read_table(path, columns=["sample_id", "label", f"f{key_index}"])
    meta = json.loads((table.schema.metadata or {}).get(b"ddae", b"{}"))
    return FeaturePart(table.column("sample_id").to_numpy(), table.column("label").to_numpy(),
                       _column_to_matrix(table.column(f"f{key_index}")), meta)


def unit_rows(path: Path) -> int | None:
    """Rows of a finished unit file, or None when it is missing or unreadable (to be redone)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException):
        return None


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
        raise FeatureStoreError(f"{path}: feature part not found; rerun the extract stage")
    table = pq.read_table(path, columns=["sample_id", "label", "feature"])
    meta = json.loads((table.schema.metadata or {}).get(b"ddae", b"{}"))
    return FeaturePart(
        sample_ids=table.column("sample_id").to_numpy(),
        labels=table.column("label").to_numpy(),
        features=_column_to_matrix(table.column("feature")),
        metadata=meta,
    )


def read_split(root: Path, key: FeatureKey, split: str, copies: int = 1,
               expected_hash: str | None = None) -> FeaturePart:
    """Read copies 0..copies-1 of one split, stacked; checks every part's checkpoint hash."""
    parts = [read_part(part_path(root, key, split, c)) for c in range(copies)]
    for c, part in enumerate(parts):
        found = part.metadata.get("network_hash")
        if expected_hash is not None and found != expected_hash:
            raise FeatureStoreError(
                f"{part_path(root, key, split, c)}: computed from checkpoint {found}, expected "
                f"{expected_hash}; rerun the extract stage"
            )
    return FeaturePart(
        sample_ids=np.concatenate([p.sample_ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        features=np.concatenate([p.features for p in parts]),
        metadata=parts[0].metadata,
    )
