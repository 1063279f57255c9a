"""Listing the files of a folder or an archive: the one walker the data readers share.

Folders are listed as sorted POSIX paths relative to the folder, so every machine (whatever order its
filesystem returns entries in) sees the same files in the same order. Hidden entries (``.name``,
``__MACOSX``) are left out, and hidden folders are not entered. Archive members are read in memory,
never extracted by path, and links are skipped, so no member can point outside the archive.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from ddae_core.data.errors import DatasetLayoutError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def hidden(name: str) -> bool:
    """Whether one path component is hidden: a dot file or folder, or macOS's ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def visible(relative: str) -> bool:
    """Whether no component of a relative POSIX path is hidden (and it has one)."""
    parts = PurePosixPath(relative).parts
    return bool(parts) and not any(hidden(p) for p in parts)


def is_image_name(relative: str) -> bool:
    """Whether a visible relative path has an image extension (``IMAGE_EXTENSIONS``, any case)."""
    return visible(relative) and PurePosixPath(relative).suffix.lower() in IMAGE_EXTENSIONS


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file named like a supported archive (``ARCHIVE_SUFFIXES``)."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def walk_files(folder: Path) -> list[str]:
    """Sorted POSIX paths, relative to ``folder``, of every visible file at any depth.

    Hidden files are skipped and hidden folders not entered; links to folders are not followed.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not hidden(d)]
        base = Path(dirpath).relative_to(folder)
        found += [(base / name).as_posix() for name in filenames if not hidden(name)]
    return sorted(found)


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its name as stored, and how to read it (valid while listed)."""

    name: str  # POSIX path inside the archive, as stored: may be unsafe (``../x``); callers check
    open: Callable[[], IO[bytes]]  # a binary stream of the member's bytes

    def read(self) -> bytes:
        with self.open() as handle:
            return handle.read()


def _zip_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def archive_members(path: Path) -> Iterator[Member]:
    """The regular files of a .zip (sorted by name) or tar archive (in stored order, as it streams).

    Folders, links, devices and fifos are skipped. A member's ``open`` works until the next member is
    yielded (tar streams). Wrap the loop in ``archive_errors(path)`` to name the file of a broken archive.
    """
    if path.name.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            infos = sorted((i for i in zf.infolist() if not i.is_dir() and not _zip_link(i)), key=lambda i: i.filename)
            for info in infos:
                yield Member(info.filename, functools.partial(zf.open, info))
    else:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    yield Member(member.name, functools.partial(tar.extractfile, member))


@contextlib.contextmanager
def archive_errors(path: Path) -> Iterator[None]:
    """A broken archive, while listed or read, becomes a ``DatasetLayoutError`` naming ``path``."""
    try:
        yield
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise DatasetLayoutError(f"{path}: cannot read archive ({err})") from err


__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "Member",
    "archive_errors",
    "archive_members",
    "hidden",
    "is_archive",
    "is_image_name",
    "visible",
    "walk_files",
]
