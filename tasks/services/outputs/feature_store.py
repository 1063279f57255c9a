"""The Parquet feature store: one row per image per single-tap readout (tap, level, pool) and copy.

Layout: ``<root>/tap=<tap>/level=<level>/pool=<pool>/<split>-copy<k>.parquet``, so one
(tap, level, pool) reads without touching the rest. Each file carries every column (self-describing)
and, in its schema metadata, the checkpoint hash and network config it was computed from.
``index.json`` (``FeatureIndex``) lists what the extract stage stored; later stages read readouts
back from here (``read_readout``, ``load_candidates``) and the probe's choice (``load_selection``):
nothing is re-extracted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddae_core.atomic import atomic_file, write_json_atomic
from ddae_core.config import ConfigError
from ddae_core.readout import Readout, Selection, candidates
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import StageError

FEATURE_COLUMNS = ("sample_id", "split", "label", "tap", "level", "pool", "copy", "feature")
INDEX_FILE = "index.json"
SPLITS = ("train", "val", "test")


class FeatureStoreError(StageError):
    """A feature file is missing or was computed from another checkpoint: rerun extract."""


def readout_directory(root: Path, readout: Readout) -> Path:
    """Where a single-tap readout's parts live: ``tap=<tap>/level=<level>/pool=<pool>``."""
    return root / f"tap={_single_tap(readout)}" / f"level={readout.level:g}" / f"pool={readout.pool}"


def part_path(root: Path, readout: Readout, split: str, copy: int) -> Path:
    return readout_directory(root, readout) / f"{split}-copy{copy}.parquet"


def _single_tap(readout: Readout) -> str:
    if len(readout.taps) != 1:
        raise ValueError(f"the feature store keeps single-tap readouts, not {readout.label}")
    return readout.taps[0]


def feature_table(readout: Readout, split: str, copy: int, sample_ids: np.ndarray, labels: np.ndarray,
                  features: np.ndarray) -> pa.Table:
    """One block of rows (features (N, D)) in the extract stage's columns, ``FEATURE_COLUMNS``.

    ``tap`` holds ``readout.tap_name``: the block, or ``a+b`` for the concatenation embed writes.
    """
    n = len(features)
    return pa.table({
        "sample_id": pa.array(sample_ids, type=pa.int64()),
        "split": pa.array([split] * n, type=pa.string()),
        "label": pa.array(labels, type=pa.int64()),
        "tap": pa.array([readout.tap_name] * n, type=pa.string()),
        "level": pa.array(np.full(n, readout.level), type=pa.float64()),
        "pool": pa.array(np.full(n, readout.pool), type=pa.int32()),
        "copy": pa.array(np.full(n, copy), type=pa.int32()),
        "feature": _feature_column(features),
    })


def write_part(path: Path, readout: Readout, split: str, copy: int, sample_ids: np.ndarray,
               labels: np.ndarray, features: np.ndarray, metadata: dict) -> None:
    """Write one (readout, split, copy) part through a temporary name (readers never see half a file)."""
    table = feature_table(readout, split, copy, sample_ids, labels, features)
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


def read_split(root: Path, readout: Readout, split: str, copies: int = 1,
               expected_hash: str | None = None) -> FeaturePart:
    """Read copies 0..copies-1 of one split of a single-tap readout, stacked; checks every part's checkpoint hash."""
    parts = [read_part(part_path(root, readout, split, c)) for c in range(copies)]
    for c, part in enumerate(parts):
        found = part.metadata.get("network_hash")
        if expected_hash is not None and found != expected_hash:
            raise FeatureStoreError(
                f"{part_path(root, readout, split, c)}: computed from checkpoint {found}, expected "
                f"{expected_hash}; rerun the extract stage"
            )
    return FeaturePart(
        sample_ids=np.concatenate([p.sample_ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        features=np.concatenate([p.features for p in parts]),
        metadata=parts[0].metadata,
    )


def read_readout(root: Path, readout: Readout, split: str, expected_hash: str,
                 copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) of one split for ``readout`` (its taps concatenated by ``Readout.concat``) and labels (N,).

    Copies 0..copies-1 are stacked (the probe reads every train copy; other stages only copy 0).
    """
    blocks, labels, ids = {}, None, None
    for member in readout.members:
        part = read_split(root, member, split, copies, expected_hash)
        if ids is not None and not np.array_equal(ids, part.sample_ids):
            raise StageError(f"{root}: rows of {member.label} ({split}) are not aligned with {readout.members[0].label}")
        blocks[member.feature_keys[0]] = part.features
        labels, ids = part.labels, part.sample_ids
    return readout.concat(blocks), np.asarray(labels)


@dataclass(frozen=True)
class FeatureIndex:
    """``index.json``: what the extract stage stored and from what (network, data, seed)."""

    readouts: tuple[Readout, ...]  # single-tap, in extraction order (tap, then level, then pool)
    selectors: Mapping[str, tuple[str, ...]]  # mid, decoder, dec1, out_6 -> blocks of the features' network
    class_names: tuple[str, ...]
    splits: Mapping[str, int]  # rows per split
    train_copies: int  # 1 + extract.augment_copies
    level_kind: str  # "t" (DDPM) or "sigma" (EDM)
    data_checksum: str
    seed: int
    network_hash: str
    precision: str = "fp32"  # the network's while read (an index written before precisions were recorded: fp32)

    @classmethod
    def load(cls, root: Path) -> FeatureIndex:
        """``root/index.json``; a StageError when the extract stage has not run."""
        path = Path(root) / INDEX_FILE
        if not path.is_file():
            raise StageError(f"{path} not found: run the extract stage first")
        data = json.loads(path.read_text())
        seed = int(data["seed"])
        precision = data.get("precision", "fp32")
        return cls(
            readouts=tuple(Readout((k["tap"],), k["level"], k["pool"], seed, precision) for k in data["keys"]),
            selectors={name: tuple(blocks) for name, blocks in data["selectors"].items()},
            class_names=tuple(data["class_names"]), splits=dict(data["splits"]),
            train_copies=int(data["train_copies"]), level_kind=data["level_kind"],
            data_checksum=data["data_checksum"], seed=seed, network_hash=data["network_hash"], precision=precision,
        )

    @staticmethod
    def write(path: Path, metadata: Mapping[str, Any], readouts: Sequence[Readout], splits: Mapping[str, int],
              train_copies: int, class_names: Sequence[str]) -> None:
        """Write ``index.json``: the parts' ``metadata`` plus keys, split sizes, train copies and class names."""
        write_json_atomic(path, {
            **metadata,
            "keys": [{"tap": _single_tap(r), "level": r.level, "pool": r.pool} for r in readouts],
            "splits": dict(splits),
            "train_copies": train_copies,
            "class_names": list(class_names),
        })


def load_selection(paths: Paths) -> Selection:
    """``outputs/probe/selection.json``; a clear error when the probe has not run."""
    path = paths.probe / "selection.json"
    if not path.is_file():
        raise StageError(f"{path} not found: run the probe stage first")
    return Selection.read(paths.probe)


class ReadoutFeatures:
    """A readout's (N, D) features on one split, over the stored blocks and joined only when read:
    ``x[rows]`` concatenates just those rows (the probe's screening subset), ``np.asarray(x)`` the whole
    matrix, each time (nothing is kept), so a grid of concatenations holds no copy of its blocks."""

    def __init__(self, readout: Readout, blocks: Mapping[tuple, np.ndarray]) -> None:
        self.readout = readout
        self._blocks = {key: blocks[key] for key in readout.feature_keys}
        rows = {len(block) for block in self._blocks.values()}
        if len(rows) != 1:
            raise StageError(f"{readout.label}: its blocks hold {sorted(rows)} rows, not one count")
        self.shape = (rows.pop(), sum(block.shape[1] for block in self._blocks.values()))
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        """The features of ``rows`` (a slice or an index array) only, (len(rows), D)."""
        return self.readout.concat({key: block[rows] for key, block in self._blocks.items()})

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        whole = self.readout.concat(self._blocks)
        return whole if dtype is None else whole.astype(dtype, copy=False)


@dataclass(frozen=True)
class Candidate:
    """A readout the probe compares, with its features per split (train: every copy stacked): arrays, or
    ``ReadoutFeatures`` joined on demand."""

    readout: Readout
    features: dict[str, np.ndarray | ReadoutFeatures]


def load_candidates(root: Path, index: FeatureIndex, concat: Sequence[Sequence[str]],
                    expected_hash: str) -> tuple[list[Candidate], dict[str, np.ndarray]]:
    """Every candidate (``readout.candidates``: singles, then ``concat`` groups, selectors expanded)
    with its features, plus the labels per split; each stored readout is read once, and a concatenation's
    features are joined from them only when read (``ReadoutFeatures``).

    Raises ConfigError naming a ``probe.concat`` member that was not extracted.
    """
    try:
        chosen = candidates(index.readouts, concat, index.selectors)
    except ConfigError as err:
        raise ConfigError(f"params.yaml: {err}") from None
    blocks: dict[str, dict] = {split: {} for split in SPLITS}
    labels: dict[str, np.ndarray] = {}
    ids: dict[str, np.ndarray] = {}
    for single in index.readouts:
        for split in SPLITS:
            part = read_split(root, single, split, index.train_copies if split == "train" else 1, expected_hash)
            if split in ids and not np.array_equal(ids[split], part.sample_ids):
                raise StageError(f"{root}: rows of {single.label} ({split}) are not aligned")
            ids[split], labels[split] = part.sample_ids, part.labels
            blocks[split][single.feature_keys[0]] = part.features
    return [Candidate(r, {split: r.concat(blocks[split]) if len(r.taps) == 1 else ReadoutFeatures(r, blocks[split])
                          for split in SPLITS}) for r in chosen], labels
