"""Image files of a folder or archive, streamed one at a time (batch inference, embeddings).

Unlike a dataset source there are no class folders: every file with an image extension, at any
depth, in a fixed order (sorted relative paths; archive member order for tar files).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from ddae_core.data.errors import DatasetLayoutError, DatasetNotFoundError
from ddae_core.data.sources import IMAGE_EXTENSIONS, _hidden, is_archive


def _wanted(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not any(_hidden(p) for p in parts) and PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _folder_names(folder: Path) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        names += [Path(dirpath, f).relative_to(folder).as_posix() for f in filenames]
    return sorted(n for n in names if _wanted(n))


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
    with _archive_errors(path):
        return sum(1 for _ in _entries(path))


def iter_images(source: str | os.PathLike[str]) -> Iterator[tuple[str, bytes]]:
    """``(relative path, file bytes)`` for every image file in a folder or a .zip/.tar(.gz) archive."""
    path = _checked(source)
    with _archive_errors(path):
        for name, read in _entries(path):
            yield name, read()


def _entries(source: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """``(relative path, reader of its bytes)`` per image file, in order; a reader is valid until the next."""
    if source.is_dir():
        for name in _folder_names(source):
            yield name, (source / name).read_bytes
    elif source.name.lower().endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            for name in sorted(i.filename for i in zf.infolist() if not i.is_dir() and _wanted(i.filename)):
                yield name, functools.partial(zf.read, name)
    else:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                if member.isfile() and _wanted(member.name):
                    yield member.name, functools.partial(_read_member, tar, member)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    with tar.extractfile(member) as handle:
        return handle.read()


@contextlib.contextmanager
def _archive_errors(path: Path) -> Iterator[None]:
    """A broken archive, while listed or read, becomes a ``DatasetLayoutError`` naming ``path``."""
    try:
        yield
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise DatasetLayoutError(f"{path}: cannot read archive ({err})") from err
