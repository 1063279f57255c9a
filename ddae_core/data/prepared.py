"""The prepared on-disk format: preprocessed ``uint8`` splits written once, memory-mapped afterwards.

Layout of ``out_dir`` (format 1)::

    manifest.json                      dataset, source, layout, preprocess spec (and why that shape),
                                       class names, split sizes, per-class counts, shape [H, W, C],
                                       checksum, skipped files, warnings, the DataConfig
    {train,val,test}/images.u8         raw uint8 (N, H, W, C), C-order
    {train,val,test}/labels.npy        int64 (N,), index into class_names
    {train,val,test}/sample_ids.npy    int64 (N,), the source's sample ids (see ``sources``)

``checksum`` is sha256 over, for each split in ``SPLITS`` order: the split name, sha256 of its
``images.u8`` bytes, then its labels and ids as little-endian int64 bytes (``compute_checksum``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ddae_core.atomic import atomic_directory, write_json_atomic
from ddae_core.config import ConfigError, DataConfig, as_dict
from ddae_core.data.errors import CorruptImagesError, OutputExistsError, PreparedDataError, PreparedNotFoundError
from ddae_core.data.images import PreprocessSpec, preprocess_image
from ddae_core.data.shape import working_shape
from ddae_core.data.sources import RawSplit, Source, open_source
from ddae_core.sampling import balanced_subset

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
_CHUNK = 512  # images buffered before each write; bounds memory for any dataset size
_MANIFEST_KEYS = ("format", "dataset", "source", "preprocess", "class_names", "splits", "shape", "checksum")

RELIABLE_PER_CLASS = 10  # fewer validation (or test) images per class than this make a choice (or score) noisy

# Separate random streams per decision, so changing one fraction does not reshuffle the others.
_STREAM_TEST, _STREAM_MAX_TRAIN, _STREAM_MAX_TEST, _STREAM_VAL = 1, 2, 3, 4


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held) with ``round(count * fraction)`` of each class held out.

    A class with at least 2 images keeps at least one on each side; a single image stays in ``kept``.
    Both index arrays are sorted, so the split preserves source order.
    """
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = len(members)
        k = min(max(int(round(n * fraction)), 1), n - 1) if n >= 2 else 0
        held.append(rng.permutation(members)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def normal_ids(class_names: Sequence[str], normal_classes: Sequence[str]) -> np.ndarray:
    """Class ids (sorted) of ``data.normal_classes``; a name the dataset does not have is a ConfigError."""
    for name in normal_classes:
        if name not in class_names:
            raise ConfigError(f"data.normal_classes: {name!r} is not a class of this dataset "
                              f"(its classes: {', '.join(map(repr, class_names))})")
    return np.array(sorted(list(class_names).index(name) for name in normal_classes), dtype=np.int64)


def _normal_only(split: RawSplit, normal: np.ndarray) -> RawSplit:
    return split.subset(np.flatnonzero(np.isin(split.labels, normal)))


def plan_splits(source: Source, config: DataConfig) -> dict[str, RawSplit]:
    """Carve test (if the source has none), apply max_train / max_test, then carve val from train
    (unless the source has a validation split of its own, used as it is).

    Anomaly mode (``data.normal_classes``): train and val keep only the normal classes' images (before
    max_train, so it counts normal images), test keeps every class: the others are its anomalies.
    """
    pool, test, val = source.train, source.test, source.val
    if test is None:
        keep, held = stratified_split(pool.labels, config.test_fraction, _rng(config.split_seed, _STREAM_TEST))
        pool, test = pool.subset(keep), pool.subset(held)
    if config.anomaly:
        normal = normal_ids(source.class_names, config.normal_classes)
        pool = _normal_only(pool, normal)
        val = None if val is None else _normal_only(val, normal)
    if config.max_train:
        pool = pool.subset(balanced_subset(pool.labels, config.max_train, _rng(config.split_seed, _STREAM_MAX_TRAIN)))
    if config.max_test:
        test = test.subset(balanced_subset(test.labels, config.max_test, _rng(config.split_seed, _STREAM_MAX_TEST)))
    if val is not None:
        return {"train": pool, "val": val, "test": test}
    keep, held = stratified_split(pool.labels, config.val_fraction, _rng(config.split_seed, _STREAM_VAL))
    return {"train": pool.subset(keep), "val": pool.subset(held), "test": test}


def class_counts(labels: Mapping[str, np.ndarray], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Split -> class name -> images, every class listed (0 where a split has none)."""
    return {split: dict(zip(class_names, np.bincount(y, minlength=len(class_names)).tolist()))
            for split, y in labels.items()}


def small_data_warnings(counts: Mapping[str, Mapping[str, int]], normal_classes: Sequence[str] = ()) -> list[str]:
    """What a user must know when a split is too small to trust: empty classes, thin val or test.

    With ``normal_classes`` (anomaly mode) train and val are judged on those classes only: they hold
    no other class by design.
    """
    if normal_classes:
        counts = {split: {name: n for name, n in per_class.items() if split == "test" or name in normal_classes}
                  for split, per_class in counts.items()}
    warnings = []
    for split, per_class in counts.items():
        empty = [name for name, n in per_class.items() if n == 0]
        if empty:
            warnings.append(f"{split} split has no images of class(es) {empty}")
    for split, what in (("val", "choosing the readout and the L2 strength on it is unreliable"),
                        ("test", "its accuracy is a noisy estimate")):
        fewest = min(counts[split].values(), default=0)
        if fewest < RELIABLE_PER_CLASS:
            warnings.append(f"the {split} split holds {sum(counts[split].values())} images, as few as {fewest} "
                            f"in a class (under {RELIABLE_PER_CLASS}): {what}; add images"
                            + (" or raise data.val_fraction" if split == "val" else ""))
    return warnings


def _hash_split(digest: Any, name: str, images_sha: bytes, labels: np.ndarray, ids: np.ndarray) -> None:
    digest.update(name.encode())
    digest.update(images_sha)
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())


def _write_split(
    split: RawSplit, spec: PreprocessSpec, dest: Path, name: str, progress: bool
) -> tuple[bytes, np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Decode, preprocess and append images chunk by chunk; returns (images sha256, labels, ids, bad files)."""
    dest.mkdir(parents=True)
    images_sha = hashlib.sha256()
    kept: list[int] = []
    bad: list[dict[str, str]] = []
    buffer: list[np.ndarray] = []

    def flush(f: Any) -> None:
        if buffer:
            block = np.stack(buffer).tobytes()  # (n, H, W, C) uint8, C-order
            f.write(block)
            images_sha.update(block)
            buffer.clear()

    with open(dest / "images.u8", "wb") as f:
        for i in tqdm(range(len(split)), desc=f"prepare {name}", unit="img", disable=not progress):
            try:
                image = preprocess_image(split.load(i), spec)
            except Exception as err:  # noqa: BLE001 - any decoder failure is this file's problem, reported
                bad.append({"path": split.describe(i), "error": f"{type(err).__name__}: {err}"})
                continue
            buffer.append(image)
            kept.append(i)
            if len(buffer) >= _CHUNK:
                flush(f)
        flush(f)
    labels = np.asarray(split.labels[kept], dtype=np.int64)
    ids = np.asarray(split.ids[kept], dtype=np.int64)
    np.save(dest / "labels.npy", labels)
    np.save(dest / "sample_ids.npy", ids)
    return images_sha.digest(), labels, ids, bad


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or an earlier prepared dataset may be replaced (never arbitrary user data)."""
    if out_dir.is_file() or out_dir.is_symlink():
        raise OutputExistsError(f"{out_dir} exists and is not a folder; refusing to replace it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise OutputExistsError(f"{out_dir} is not empty and holds no {MANIFEST}; refusing to replace it")


def prepare_dataset(config: DataConfig, out_dir: str | os.PathLike[str], progress: bool = True,
                    size_multiple: int = 4, model_shape: tuple[int, int] | None = None) -> dict[str, Any]:
    """Read ``config``'s dataset, preprocess every image and write the prepared format to ``out_dir``.

    ``size_multiple``: what an inferred image size must be a multiple of (the network's down-sampling);
    ``model_shape``: an imported model's (channels, size), which ``auto`` takes (``working_shape``).

    Built in ``<out_dir>.tmp-<pid>`` and renamed at the end (``atomic_directory``): after any failure
    ``out_dir`` is as it was (absent, or the previous good dataset) and the temp folder is gone. The
    manifest keeps its key order and non-ASCII class names as written (``data/prepared``'s bytes are
    its DVC hash). Returns the manifest.
    """
    out_dir = Path(out_dir).absolute()
    _check_replaceable(out_dir)
    with atomic_directory(out_dir) as tmp:
        with open_source(config, scratch_dir=tmp) as source:
            shape = working_shape(source, config, size_multiple, model_shape)
            spec = PreprocessSpec(channels=shape.channels, image_size=shape.image_size, fit=source.fit)
            splits = plan_splits(source, config)
            digest = hashlib.sha256()
            counts: dict[str, int] = {}
            split_labels: dict[str, np.ndarray] = {}
            bad: list[dict[str, str]] = []
            for name in SPLITS:
                images_sha, labels, ids, split_bad = _write_split(splits[name], spec, tmp / name, name, progress)
                _hash_split(digest, name, images_sha, labels, ids)
                counts[name] = len(labels)
                split_labels[name] = labels
                bad += split_bad
            if bad and config.on_corrupt == "fail":
                raise CorruptImagesError(bad)
            for entry in bad:
                log.warning("skipped unreadable image %s (%s)", entry["path"], entry["error"])
            per_class = class_counts(split_labels, source.class_names)
            warnings = [*source.warnings, *small_data_warnings(per_class, config.normal_classes)]
            for message in warnings[len(source.warnings):]:
                log.warning("%s", message)
            manifest = {
                "format": FORMAT_VERSION,
                "dataset": source.dataset,
                "source": source.location,
                "layout": source.layout,
                "preprocess": spec.to_dict(),
                "shape_rule": shape.reason,
                "class_names": list(source.class_names),
                "splits": counts,
                "class_counts": per_class,
                "shape": list(spec.shape),
                "checksum": digest.hexdigest(),
                "skipped": bad,
                "warnings": warnings,
                "config": manifest_config(config),
            }
            if config.anomaly:  # the mode the later stages read from the data (absent: the classifier)
                manifest["normal_classes"] = [name for name in source.class_names if name in config.normal_classes]
        for leftover in tmp.iterdir():  # e.g. an archive's extraction folder
            if leftover.name not in SPLITS:
                shutil.rmtree(leftover, ignore_errors=True)
        write_json_atomic(tmp / MANIFEST, manifest, sort_keys=False, ensure_ascii=False)
    log.info("prepared %s at %s: %s", manifest["dataset"], out_dir, counts)
    return manifest


def manifest_config(config: DataConfig) -> dict[str, Any]:
    """The data section as the manifest records it; ``normal_classes`` only when set, so a classifier's
    manifest (and so its DVC hash) is what it was before the anomaly mode existed."""
    recorded = as_dict(config)
    if not config.anomaly:
        del recorded["normal_classes"]
    return recorded


def normal_classes(manifest: Mapping[str, Any] | str | os.PathLike[str]) -> list[str]:
    """The prepared data's normal classes (anomaly mode, in class order); [] for a classifier's data.
    Given a prepared folder: [] too when it holds no manifest (a stage run on cached features alone)."""
    if not isinstance(manifest, Mapping):
        path = Path(manifest) / MANIFEST
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return list(manifest.get("normal_classes", []))


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``root/manifest.json``; errors name the file and what is wrong."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise PreparedNotFoundError(f"{path} not found: {root} is not a prepared dataset (run the prepare stage)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PreparedDataError(f"{path} is not valid JSON ({err}); prepare the dataset again") from err
    if not isinstance(manifest, dict):
        raise PreparedDataError(f"{path}: expected a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise PreparedDataError(f"{path}: missing keys {missing}; prepare the dataset again")
    if manifest["format"] != FORMAT_VERSION:
        raise PreparedDataError(f"{path}: format {manifest['format']!r}, this code reads format {FORMAT_VERSION}")
    return manifest


class PreparedSplit:
    """One prepared split: images memory-mapped read-only, labels and ids in memory."""

    def __init__(self, root: str | os.PathLike[str], split: str, manifest: dict[str, Any] | None = None):
        self.root = Path(root)
        self.split = split
        manifest = manifest if manifest is not None else read_manifest(self.root)
        if split not in manifest["splits"]:
            raise PreparedDataError(f"{self.root / MANIFEST}: no split {split!r} (have {list(manifest['splits'])})")
        n = int(manifest["splits"][split])
        shape = (n, *(int(s) for s in manifest["shape"]))  # (N, H, W, C)
        folder = self.root / split
        path = folder / "images.u8"
        try:
            size = path.stat().st_size
        except FileNotFoundError as err:
            raise PreparedDataError(f"{path} is missing") from err
        if size != int(np.prod(shape)):
            raise PreparedDataError(f"{path}: {size} bytes, manifest says {shape} = {int(np.prod(shape))} bytes")
        if n:
            self.images: np.ndarray = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        else:  # mmap cannot map an empty file
            self.images = np.zeros(shape, np.uint8)
            self.images.flags.writeable = False
        self.labels = self._load_vector(folder / "labels.npy", n)
        self.sample_ids = self._load_vector(folder / "sample_ids.npy", n)
        self.class_names: tuple[str, ...] = tuple(manifest["class_names"])
        self.preprocess = PreprocessSpec.from_dict(manifest["preprocess"])

    @staticmethod
    def _load_vector(path: Path, n: int) -> np.ndarray:
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise PreparedDataError(f"{path}: cannot read ({err})") from err
        if values.shape != (n,) or values.dtype != np.int64:
            raise PreparedDataError(f"{path}: {values.dtype} {values.shape}, expected int64 ({n},)")
        return values

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"PreparedSplit({str(self.root)!r}, {self.split!r}, n={len(self)}, shape={self.images.shape[1:]})"


def load_prepared(root: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, PreparedSplit]]:
    """The manifest and every split of a prepared dataset."""
    manifest = read_manifest(root)
    return manifest, {name: PreparedSplit(root, name, manifest) for name in manifest["splits"]}


def compute_checksum(root: str | os.PathLike[str], splits: Sequence[str] = SPLITS) -> str:
    """Recompute the manifest checksum from the files on disk (see the module docstring)."""
    manifest, loaded = load_prepared(root)
    digest = hashlib.sha256()
    for name in splits:
        part = loaded[name]
        images_sha = hashlib.sha256()
        with open(Path(root) / name / "images.u8", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                images_sha.update(block)
        _hash_split(digest, name, images_sha.digest(), part.labels, part.sample_ids)
    return digest.hexdigest()


def verify_prepared(root: str | os.PathLike[str]) -> None:
    """Raise ``PreparedDataError`` if the files no longer match the manifest checksum."""
    expected = read_manifest(root)["checksum"]
    actual = compute_checksum(root)
    if actual != expected:
        raise PreparedDataError(f"{Path(root) / MANIFEST}: checksum {expected}, files give {actual}")
