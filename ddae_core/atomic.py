"""Atomic writes: every output is written under a temporary sibling name, fsynced and renamed into place.

A reader (or a rerun after ``kill -9``) sees the previous complete file or folder or the new complete
one, never half of one. Temporary names, beside the final path:

- a file: ``.<name>.tmp-<pid>``;
- a folder: ``<name>.tmp-<pid>`` while it is built, and ``<name>.old-<pid>`` for the folder it replaces,
  during the two renames.

Checkpoint rotation (``ddae_core.checkpoint``) recognises leftovers of killed runs by the substrings
``.tmp-`` and ``.old-``. One process writes a given path at a time: a leftover temporary name with
this process's pid is stale (an earlier process had the pid) and is removed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


def _sibling(final: Path, pattern: str) -> Path:
    """``final``'s sibling named by ``pattern`` (``{name}``, ``{pid}``): the temporary names above."""
    return final.with_name(pattern.format(name=final.name, pid=os.getpid()))


def _fsync(path: Path) -> None:
    """Flush a file's data or a folder's entries to disk (best effort: some systems refuse folders)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file, link or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``final``, on failure it goes.

    The caller creates and closes the file at the yielded path; it is then fsynced, renamed onto
    ``final`` and the folder entry fsynced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, ".{name}.tmp-{pid}")
    _remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(final.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` as the whole content of ``path`` (see ``atomic_file``)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def _json_bytes(data: Any, *, sort_keys: bool = True, ensure_ascii: bool = True) -> bytes:
    """``data`` as the project writes JSON: indented by 2, one trailing newline, UTF-8."""
    return (json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n").encode("utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = True,
                      ensure_ascii: bool = True) -> None:
    """Write ``data`` as JSON (indented by 2, one trailing newline, UTF-8) through a temporary file and a rename."""
    write_bytes_atomic(path, _json_bytes(data, sort_keys=sort_keys, ensure_ascii=ensure_ascii))


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folder)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))


def _replace_directory(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing ``final`` is set aside and restored if that fails."""
    if not final.exists() and not final.is_symlink():
        os.replace(tmp, final)
        _fsync(final.parent)
        return
    old = _sibling(final, "{name}.old-{pid}")
    _remove(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    _fsync(final.parent)
    _remove(old)


def write_csv_atomic(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a header line and ``rows`` as CSV through a temporary file (the tables ``dvc plots`` draws)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder to fill; on success it replaces ``final``, on failure it goes.

    The folder is real scratch space (an archive may be extracted into it; whatever is left in it when
    the ``with`` ends is published). On success every file under it is fsynced, ``final`` (if any) is
    moved to ``<name>.old-<pid>``, the new folder renamed onto ``final`` (the old one is put back if
    that rename fails) and the old one deleted.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "{name}.tmp-{pid}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_directory(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


__all__ = ["atomic_directory", "atomic_file", "write_bytes_atomic", "write_csv_atomic", "write_json_atomic"]
