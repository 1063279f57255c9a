"""Readers for the raw datasets: Fashion-MNIST (IDX), CIFAR-10 (official binary archive), image folders.

Every reader returns a ``Source``: class names plus a train split and (usually) a test split. A split
decodes one image at a time (``load(i)``), so an image folder larger than RAM is never held decoded.

Sample ids (``RawSplit.ids``) are each image's position in the source's canonical order, so they are
unique across splits and stable across reruns and subsets:
- Fashion-MNIST / CIFAR-10: official train images ``0 .. n_train-1``, then test ``n_train ..``;
- image folders: the position of the file's relative path in the sorted list of all image files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image

from ddae_core.atomic import atomic_file
from ddae_core.config import DataConfig
from ddae_core.data.errors import DatasetLayoutError, DatasetNotFoundError
from ddae_core.data.files import (
    ARCHIVE_SUFFIXES,
    IMAGE_EXTENSIONS,
    archive_errors,
    archive_members,
    hidden,
    is_archive,
    walk_files,
)
from ddae_core.data.images import Fit, open_image

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NATIVE_SHAPES = {"fashion-mnist": (1, 28), "cifar10": (3, 32)}  # (channels, size) of the known datasets
_CIFAR_RECORD = 1 + 32 * 32 * 3  # label byte + R plane + G plane + B plane (each 32x32, row-major)


class RawSplit(Protocol):
    """One split of a raw source, decoded lazily."""

    labels: np.ndarray  # int64 (N,), index into Source.class_names
    ids: np.ndarray  # int64 (N,), see the module docstring

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image:
        """Decode image ``index``; raises for unreadable files."""
        ...

    def describe(self, index: int) -> str:
        """Where image ``index`` came from, for error reports."""
        ...

    def subset(self, indices: np.ndarray) -> "RawSplit":
        """The images at ``indices``, in that order."""
        ...


@dataclass(frozen=True)
class ArraySplit:
    """Images already decoded into one array (IDX, CIFAR-10 binary: compact enough for RAM)."""

    images: np.ndarray  # uint8 (N, H, W) grayscale or (N, H, W, 3) RGB
    labels: np.ndarray
    ids: np.ndarray
    origin: str  # e.g. "fashion-mnist train", used in reports

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def describe(self, index: int) -> str:
        return f"{self.origin} id {int(self.ids[index])}"

    def subset(self, indices: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[indices], self.labels[indices], self.ids[indices], self.origin)


@dataclass(frozen=True)
class FileSplit:
    """Image files under ``root``, read and decoded one at a time."""

    root: Path
    paths: tuple[str, ...]  # relative POSIX paths under root
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return open_image((self.root / self.paths[index]).read_bytes())

    def describe(self, index: int) -> str:
        return self.paths[index]

    def subset(self, indices: np.ndarray) -> "FileSplit":
        return FileSplit(self.root, tuple(self.paths[i] for i in indices), self.labels[indices], self.ids[indices])


@dataclass(frozen=True)
class Source:
    """A raw dataset: class names, its splits, the fit its images need and, for a known dataset, its shape."""

    dataset: str
    location: str  # the file or folder it was read from (recorded in the manifest)
    class_names: tuple[str, ...]
    train: RawSplit
    test: RawSplit | None  # None: no test split on disk; the caller carves one from train
    fit: Fit
    warnings: tuple[str, ...] = field(default=())
    val: RawSplit | None = None  # a validation split on disk (train/ + val/ + test/); None: carved from train
    layout: str = "official train and test splits"  # how the splits were found, for the log and the manifest
    native_shape: tuple[int, int] | None = None  # (channels, size) of a known dataset; None: infer from files


def _int64(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# --- IDX (Fashion-MNIST) -------------------------------------------------------------------------


def _open_maybe_gzip(path: Path) -> BinaryIO:
    """Open ``path`` for reading, decompressing if it starts with the gzip magic (names may lie)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _parse_idx_header(header: bytes, path: Path) -> tuple[int, ...]:
    """IDX header (``00 00 08 ndim`` then ndim big-endian uint32 sizes) -> shape."""
    if len(header) < 4 or header[0:2] != b"\x00\x00" or header[2] != 0x08:
        raise DatasetLayoutError(f"{path}: not an unsigned-byte IDX file (magic {header[:4].hex()})")
    ndim = header[3]
    if len(header) < 4 + 4 * ndim:
        raise DatasetLayoutError(f"{path}: IDX header is truncated")
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def idx_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Shape stored in an IDX file's header (``.gz`` or raw), without reading the data."""
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        head = f.read(4)
        ndim = head[3] if len(head) == 4 else 0
        return _parse_idx_header(head + f.read(4 * ndim), path)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An unsigned-byte IDX file (``.gz`` or raw) -> ``uint8`` array of the shape in its header."""
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        data = f.read()
    shape = _parse_idx_header(data[: 4 + 4 * (data[3] if len(data) >= 4 else 0)], path)
    offset = 4 + 4 * len(shape)
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != expected:
        raise DatasetLayoutError(f"{path}: header says {shape} ({expected} bytes), file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def find_fashion_mnist(source: str = "") -> dict[str, Path]:
    """Paths of the four Fashion-MNIST IDX files in ``source`` (or the Debian package's folder)."""
    folder = Path(source).expanduser() if source else FASHION_MNIST_DIR
    found: dict[str, Path] = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                found[key] = folder / name
                break
    missing = [FASHION_MNIST_FILES[k] + "[.gz]" for k in FASHION_MNIST_FILES if k not in found]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing: {', '.join(missing)}). Install it with "
            f"`sudo apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}), or put the "
            "four IDX files (.gz or uncompressed) in a folder and set data.source to that folder."
        )
    return found


def read_fashion_mnist(source: str = "") -> Source:
    """Fashion-MNIST from its IDX files: 60000 train + 10000 test, 28x28 grayscale, 10 classes."""
    files = find_fashion_mnist(source)
    splits = {}
    offset = 0
    for name in ("train", "test"):
        images = read_idx(files[f"{name}_images"])  # (N, 28, 28)
        labels = read_idx(files[f"{name}_labels"]).astype(np.int64)  # (N,)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetLayoutError(f"Fashion-MNIST {name}: images {images.shape} do not match labels {labels.shape}")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetLayoutError(f"Fashion-MNIST {name}: label {labels.max()} out of range 0..9")
        ids = np.arange(offset, offset + len(labels), dtype=np.int64)
        splits[name] = ArraySplit(images, labels, ids, f"fashion-mnist {name}")
        offset += len(labels)
    location = str(files["train_images"].parent)
    return Source("fashion-mnist", location, FASHION_MNIST_CLASSES, splits["train"], splits["test"], "pad",
                  native_shape=NATIVE_SHAPES["fashion-mnist"])


# --- CIFAR-10 (binary version) -------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloads are kept: ``$DDAE_CACHE_DIR`` or ``~/.cache/ddae``."""
    return Path(os.environ.get("DDAE_CACHE_DIR", "~/.cache/ddae")).expanduser()


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar10(cache_dir: Path, timeout: float = 60.0) -> Path:
    """Download the official binary archive into ``cache_dir`` (temp name, MD5 check, rename)."""
    target = cache_dir / CIFAR10_ARCHIVE
    log.info("downloading %s to %s", CIFAR10_URL, target)
    try:
        with atomic_file(target) as tmp:
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
            if _md5(tmp) != CIFAR10_MD5:
                raise DatasetNotFoundError(f"downloaded {CIFAR10_URL} but its MD5 is not {CIFAR10_MD5}; try again")
    except DatasetNotFoundError:
        raise
    except (urllib.error.URLError, OSError) as err:
        raise DatasetNotFoundError(
            f"CIFAR-10 is not in {cache_dir} and downloading {CIFAR10_URL} failed ({err}). Download "
            f"{CIFAR10_ARCHIVE} by hand and put it in {cache_dir}, or set data.source to the archive or "
            f"to its extracted {CIFAR10_DIR} folder."
        ) from err
    return target


def locate_cifar10(source: str = "", cache_dir: Path | None = None, download: bool = True) -> Path:
    """The CIFAR-10 binary archive or extracted folder named by ``source``, else cached, else downloaded."""
    if source:
        path = Path(source).expanduser()
        candidates = [path, path / CIFAR10_DIR, path / CIFAR10_ARCHIVE]
    else:
        cache_dir = cache_dir or default_cache_dir()
        candidates = [cache_dir / CIFAR10_DIR, cache_dir / CIFAR10_ARCHIVE]
    for candidate in candidates:
        if candidate.is_file() or (candidate / CIFAR10_TEST_FILE).is_file():
            return candidate
    if source:
        raise DatasetNotFoundError(
            f"data.source {source!r} is neither {CIFAR10_ARCHIVE} nor a {CIFAR10_DIR} folder (nor holds one). "
            f"Get the binary version from {CIFAR10_URL}, or set data.source: '' to download it."
        )
    if not download:
        raise DatasetNotFoundError(f"CIFAR-10 is not in {cache_dir}; download {CIFAR10_URL} there")
    return download_cifar10(cache_dir)


def _cifar_members(path: Path) -> dict[str, bytes]:
    """File name -> bytes for the batch files and ``batches.meta.txt``, from an archive or a folder."""
    wanted = set(CIFAR10_TRAIN_FILES) | {CIFAR10_TEST_FILE, "batches.meta.txt"}
    members: dict[str, bytes] = {}
    if path.is_file():
        try:
            for member in archive_members(path):  # read in memory: nothing is extracted, so no path can escape
                name = PurePosixPath(member.name).name
                if name in wanted:
                    members[name] = member.read()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
            raise DatasetLayoutError(f"{path}: not a readable CIFAR-10 binary archive ({err})") from err
    else:
        for name in wanted:
            if (path / name).is_file():
                members[name] = (path / name).read_bytes()
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if n not in members]
    if missing:
        raise DatasetLayoutError(f"{path}: missing CIFAR-10 batch files {missing} (is this the binary version?)")
    return members


def _parse_cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch -> (images uint8 (N, 32, 32, 3), labels int64 (N,))."""
    if len(data) % _CIFAR_RECORD:
        raise DatasetLayoutError(f"CIFAR-10 {name}: {len(data)} bytes is not a whole number of records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() >= len(CIFAR10_CLASSES):
        raise DatasetLayoutError(f"CIFAR-10 {name}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> (N, H, W, C)
    return np.ascontiguousarray(images), labels


def read_cifar10(source: str = "", cache_dir: Path | None = None, download: bool = True) -> Source:
    """CIFAR-10 from the official binary version (never the pickled python version)."""
    path = locate_cifar10(source, cache_dir, download)
    members = _cifar_members(path)
    train = [_parse_cifar_batch(members[n], n) for n in CIFAR10_TRAIN_FILES]
    train_images = np.concatenate([b[0] for b in train])
    train_labels = np.concatenate([b[1] for b in train])
    test_images, test_labels = _parse_cifar_batch(members[CIFAR10_TEST_FILE], CIFAR10_TEST_FILE)
    names = CIFAR10_CLASSES
    if "batches.meta.txt" in members:
        listed = tuple(line.strip() for line in members["batches.meta.txt"].decode().splitlines() if line.strip())
        if len(listed) == len(CIFAR10_CLASSES):
            names = listed
    n = len(train_labels)
    return Source(
        "cifar10",
        str(path),
        names,
        ArraySplit(train_images, train_labels, np.arange(n, dtype=np.int64), "cifar10 train"),
        ArraySplit(test_images, test_labels, np.arange(n, n + len(test_labels), dtype=np.int64), "cifar10 test"),
        "resize",
        native_shape=NATIVE_SHAPES["cifar10"],
    )


# --- image folders and archives ------------------------------------------------------------------


def _safe_member_path(dest: Path, name: str, archive: Path) -> Path | None:
    """Destination of archive member ``name`` under ``dest``; None for hidden; error if it escapes."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise DatasetLayoutError(f"{archive}: refusing unsafe member path {name!r}")
    if any(hidden(p) for p in parts):
        return None
    target = dest.joinpath(*parts).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DatasetLayoutError(f"{archive}: member {name!r} would be written outside the extraction folder")
    return target


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract regular files of a .zip or tar archive into ``dest``; links are skipped, escaping paths refused."""
    dest.mkdir(parents=True, exist_ok=True)
    with archive_errors(archive):
        for member in archive_members(archive):  # folders are implied by their files
            target = _safe_member_path(dest, member.name, archive)
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                with member.open() as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def _visible(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, files) of ``folder``, hidden ones left out, sorted by name."""
    entries = sorted((e for e in folder.iterdir() if not hidden(e.name)), key=lambda e: e.name)
    return [e for e in entries if e.is_dir()], [e for e in entries if e.is_file()]


def _class_files(folder: Path, root: Path) -> tuple[list[str], int]:
    """Image files anywhere under a class folder (sorted, relative to ``root``) and the count of other files."""
    prefix = folder.relative_to(root)
    files = [(prefix / name).as_posix() for name in walk_files(folder)]
    images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_EXTENSIONS]
    return images, len(files) - len(images)


def _collect(folder: Path, root: Path, classes: Sequence[str]) -> tuple[list[str], list[int], int]:
    """Files and label indices for the class folders of ``folder``; an empty class folder is an error."""
    paths, labels, others = [], [], 0
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not hidden(d.name)):
        files, n_other = _class_files(sub, root)
        others += n_other
        if not files:
            raise DatasetLayoutError(
                f"class folder {sub.relative_to(root).as_posix()!r} holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        paths += files
        labels += [classes.index(sub.name)] * len(files)
    return paths, labels, others


SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}


def _split_folders(root: Path, dirs: list[Path], location: str) -> tuple[dict[str, Path], str]:
    """Which folders hold which split, and the layout in words; ``{}`` for bare class folders.

    ``train/`` + ``test/`` (+ ``val/``) are used as named; ``train/`` + ``val/`` uses val as the test
    split (the layout of many public datasets), and validation is carved from train; a lone ``train/``
    is treated like class folders. ``val/`` may also be spelt ``valid/`` or ``validation/``.
    """
    found: dict[str, Path] = {}
    for d in dirs:
        split = SPLIT_FOLDERS.get(d.name.lower())
        if split is not None:
            if split in found:
                raise DatasetLayoutError(f"{location}: both {found[split].name}/ and {d.name}/ name the {split} split")
            found[split] = d
    if not found:
        return {}, "class folders (test and validation carved from them)"
    if "train" not in found:
        named = " and ".join(f"{p.name}/" for p in found.values())
        raise DatasetLayoutError(f"{location}: found {named} without train/; add a train/ folder of class folders, "
                                 "or put the class folders at the top level")
    others = [d.name for d in dirs if d.name.lower() not in SPLIT_FOLDERS]
    if others:
        log.warning("%s: ignoring folder(s) %s beside the split folders %s", location, others,
                    sorted(p.name for p in found.values()))
    if set(found) == {"train"}:
        return {"train": found["train"]}, "train/ only (test and validation carved from it)"
    if "test" in found:
        if "val" in found:
            return found, "train/ + val/ + test/, used as named"
        return found, "train/ + test/ (validation carved from train)"
    val = found["val"].name
    return ({"train": found["train"], "test": found["val"]},
            f"train/ + {val}/: {val}/ is used as the test split, validation is carved from train")


def scan_image_folder(root: Path, location: str) -> Source:
    """Index a folder of class sub-folders, bare or under split folders (``_split_folders``); decodes nothing."""
    dirs, files = _visible(root)
    while len(dirs) == 1 and not files and dirs[0].name.lower() not in SPLIT_FOLDERS:
        root = dirs[0]  # an archive often wraps everything in one top folder
        dirs, files = _visible(root)
    folders, layout = _split_folders(root, dirs, location)
    if folders:
        classes = sorted(d.name for d in _visible(folders["train"])[0])
        for split, folder in folders.items():
            unknown = [c for c in sorted(d.name for d in _visible(folder)[0]) if c not in classes]
            if unknown:
                raise DatasetLayoutError(f"{location}: {folder.name}/ has class folder(s) {unknown} "
                                         "that train/ does not have")
    else:
        classes = sorted(d.name for d in dirs)
        folders = {"train": root}
    if len(classes) < 2:
        raise DatasetLayoutError(f"{location}: need at least 2 class folders, found {classes}")
    collected = {split: _collect(folder, root, classes) for split, folder in folders.items()}
    order = {p: i for i, p in enumerate(sorted(p for paths, _, _ in collected.values() for p in paths))}
    splits: dict[str, FileSplit] = {}
    for split, (paths, labels, _) in collected.items():
        ids = _int64([order[p] for p in paths])
        splits[split] = FileSplit(root, tuple(paths), _int64(labels), ids)
    warnings = []
    others = sum(n for _, _, n in collected.values())
    if others:
        warnings.append(f"{others} file(s) without an image extension were ignored")
    loose = [f.name for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        warnings.append(f"{len(loose)} image file(s) outside class folders were ignored (e.g. {loose[0]})")
    for message in warnings:
        log.warning("%s: %s", location, message)
    log.info("%s: %s", location, layout)
    return Source("imagefolder", location, tuple(classes), splits["train"], splits.get("test"), "resize",
                  tuple(warnings), val=splits.get("val"), layout=layout)


@contextlib.contextmanager
def open_image_folder(source: str, scratch_dir: Path | None = None) -> Iterator[Source]:
    """An image folder or archive as a ``Source``; archives are extracted to a temp dir removed on exit."""
    if not source:
        raise DatasetNotFoundError("data.source must name an image folder or a .zip/.tar/.tar.gz archive")
    path = Path(source).expanduser()
    if path.is_dir():
        yield scan_image_folder(path, str(path))
    elif is_archive(path):
        with tempfile.TemporaryDirectory(prefix="ddae-extract-", dir=scratch_dir) as tmp:
            safe_extract(path, Path(tmp))
            yield scan_image_folder(Path(tmp), str(path))
    elif path.exists():
        raise DatasetLayoutError(f"{path}: not a folder or a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")
    else:
        raise DatasetNotFoundError(f"image folder or archive {path} does not exist (data.source)")


@contextlib.contextmanager
def open_source(config: DataConfig, scratch_dir: Path | None = None) -> Iterator[Source]:
    """The raw dataset named by ``config.dataset`` / ``config.source``, valid inside the ``with``."""
    if config.dataset == "fashion-mnist":
        yield read_fashion_mnist(config.source)
    elif config.dataset == "cifar10":
        yield read_cifar10(config.source)
    elif config.dataset == "imagefolder":
        with open_image_folder(config.source, scratch_dir) as source:
            yield source
    else:
        raise ValueError(f"unknown dataset {config.dataset!r}")
