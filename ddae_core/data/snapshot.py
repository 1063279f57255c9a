"""A content checksum of a dataset's source files: the data version that decides whether to rerun.

The pipeline's first stage writes it to a small file that ``prepare`` depends on, so new or changed
images (in a folder, or a new archive) rerun the pipeline while an unchanged source reruns nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ddae_core.config import DataConfig
from ddae_core.data.errors import DatasetNotFoundError
from ddae_core.data.files import walk_files
from ddae_core.data.sources import find_fashion_mnist, locate_cifar10

_CHUNK = 1 << 20


def _source_files(config: DataConfig) -> tuple[Path, list[Path]]:
    """The folder the source lives in and every file whose bytes define it, in a fixed order."""
    if config.dataset == "fashion-mnist":
        files = sorted(find_fashion_mnist(config.source).values())
        return files[0].parent, files
    if config.dataset == "cifar10":
        path = locate_cifar10(config.source, download=False)
    else:
        if not config.source:
            raise DatasetNotFoundError("data.source must name an image folder or a .zip/.tar/.tar.gz archive")
        path = Path(config.source).expanduser()
        if not path.exists():
            raise DatasetNotFoundError(f"image folder or archive {path} does not exist (data.source)")
    if path.is_file():
        return path.parent, [path]
    return path, [path / name for name in walk_files(path)]


def source_snapshot(config: DataConfig) -> dict:
    """``{"dataset", "location", "files", "checksum"}``: sha256 over each file's relative path and bytes.

    A CIFAR-10 that is not downloaded yet snapshots as ``"not downloaded"`` (prepare fetches it).
    """
    try:
        base, files = _source_files(config)
    except DatasetNotFoundError:
        if config.dataset == "cifar10" and not config.source:
            return {"dataset": "cifar10", "location": "", "files": 0, "checksum": "not downloaded"}
        raise
    location = str(Path(config.source).expanduser().resolve()) if config.source else str(base)
    return {"dataset": config.dataset, "location": location, "files": len(files),
            "checksum": files_checksum(base, files)}


def files_checksum(base: Path, files: list[Path]) -> str:
    """sha256 (hex) over each file's path relative to ``base`` and its bytes, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(base).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
