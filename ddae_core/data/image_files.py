"""Image files of a folder or archive, streamed one at a time (batch inference, embeddings).

Unlike a dataset source there are no class folders: every visible file with an image extension, at
any depth, in a fixed order (sorted relative paths; archive member order for tar files). Links inside
archives are skipped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

from ddae_core.data.errors import DatasetLayoutError, DatasetNotFoundError
from ddae_core.data.files import Member, archive_errors, archive_members, is_archive, is_image_name, walk_files


def _checked(source: str | os.PathLike[str]) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such folder or archive")
    if not (path.is_dir() or is_archive(path)):
        raise DatasetLayoutError(f"{path}: not a folder or a .zip/.tar/.tar.gz archive")
    return path


def count_images(source: str | os.PathLike[str]) -> int:
    """How many image files ``iter_images`` will yield (for a progress bar's total); reads no image."""
    path = _checked(source)
    with archive_errors(path):
        return sum(1 for _ in _entries(path))


def iter_images(source: str | os.PathLike[str]) -> Iterator[tuple[str, bytes]]:
    """``(relative path, file bytes)`` for every image file in a folder or a .zip/.tar(.gz) archive."""
    path = _checked(source)
    with archive_errors(path):
        for entry in _entries(path):
            yield entry.name, entry.read()


def _entries(source: Path) -> Iterator[Member]:
    """One ``Member`` per image file, in order; its reader is valid until the next is yielded."""
    if source.is_dir():
        for name in walk_files(source):
            if is_image_name(name):
                yield Member(name, functools.partial(open, source / name, "rb"))
    else:
        yield from (m for m in archive_members(source) if is_image_name(m.name))
