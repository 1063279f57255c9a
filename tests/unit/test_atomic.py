"""ddae_core.atomic: a write either replaces the old file or folder whole, or leaves it as it was."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ddae_core import atomic
from ddae_core.atomic import atomic_directory, atomic_file, write_bytes_atomic, write_json_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_written_under_its_temp_name_then_replaces_the_old_one(tmp_path):
    path = tmp_path / "out" / "metrics.json"  # the folder is created
    with atomic_file(path) as tmp:
        assert tmp == tmp_path / "out" / f".metrics.json.tmp-{os.getpid()}"
        tmp.write_bytes(b"first")
        assert not path.exists()  # nothing under the final name until the with ends
    assert path.read_bytes() == b"first"
    write_bytes_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert _names(path.parent) == ["metrics.json"]


def test_a_failing_file_write_keeps_the_previous_file_whole_and_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"previous complete file")
    with pytest.raises(OSError, match="No space left"), atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(b"half of the new")
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(TypeError):  # not JSON: fails before a byte is written
        write_json_atomic(path, {"x": object()})
    with pytest.raises(TypeError):  # fails inside the write
        write_bytes_atomic(path, ["not", "bytes"])  # type: ignore[arg-type]
    assert path.read_bytes() == b"previous complete file"
    assert _names(tmp_path) == ["metrics.json"]


def test_a_failing_rename_keeps_the_previous_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "table.parquet"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(errno.EPERM, "rename refused", str(dst))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_bytes_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["table.parquet"]


def test_a_stale_temp_of_a_killed_process_with_the_same_pid_is_replaced(tmp_path):
    path = tmp_path / "x.json"
    stale = tmp_path / f".x.json.tmp-{os.getpid()}"
    stale.write_bytes(b"left by a killed run")
    write_json_atomic(path, [1])
    assert _names(tmp_path) == ["x.json"]


# Today's writers, byte for byte: tasks (then tasks.common) and ddae_core.checkpoint wrote sorted, ASCII-escaped JSON;
# the prepared manifest is written in insertion order with UTF-8 class names (its bytes are data/prepared's
# DVC hash). Written out literally, so a change of format fails here.
DATA = {"splits": {"train": 2}, "class_names": ["café", "T-shirt/top"], "format": 1, "skipped": []}
SORTED_ASCII = (
    b'{\n  "class_names": [\n    "caf\\u00e9",\n    "T-shirt/top"\n  ],\n  "format": 1,\n'
    b'  "skipped": [],\n  "splits": {\n    "train": 2\n  }\n}\n'
)
INSERTION_UTF8 = (
    '{\n  "splits": {\n    "train": 2\n  },\n  "class_names": [\n    "café",\n    "T-shirt/top"\n  ],\n'
    '  "format": 1,\n  "skipped": []\n}\n'
).encode()


def test_json_bytes_equal_those_of_the_writers_it_replaces(tmp_path):
    write_json_atomic(tmp_path / "metrics.json", DATA)
    assert (tmp_path / "metrics.json").read_bytes() == SORTED_ASCII
    write_json_atomic(tmp_path / "manifest.json", DATA, sort_keys=False, ensure_ascii=False)
    assert (tmp_path / "manifest.json").read_bytes() == INSERTION_UTF8


def test_a_directory_is_built_in_scratch_then_replaces_the_existing_one_whole(tmp_path):
    final = tmp_path / "prepared"
    (final / "old-only").mkdir(parents=True)
    (final / "manifest.json").write_text("old")
    with atomic_directory(final) as tmp:
        assert tmp == tmp_path / f"prepared.tmp-{os.getpid()}" and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "train").mkdir()
        (tmp / "train" / "images.u8").write_bytes(b"\x01\x02")
        (tmp / "extracted").mkdir()  # scratch space: what the caller leaves is published
        write_json_atomic(tmp / "manifest.json", {"new": True})
        assert (final / "manifest.json").read_text() == "old"  # the old one is untouched until the end
    assert _names(final) == ["extracted", "manifest.json", "train"]
    assert (final / "train" / "images.u8").read_bytes() == b"\x01\x02"
    assert _names(tmp_path) == ["prepared"]  # no prepared.tmp-<pid>, no prepared.old-<pid>


def test_a_failing_directory_build_keeps_the_previous_one_and_no_temp(tmp_path):
    final = tmp_path / "probe"
    final.mkdir()
    (final / "selection.json").write_text("previous")
    with pytest.raises(RuntimeError, match="midway"), atomic_directory(final) as tmp:
        (tmp / "selection.json").write_text("half")
        raise RuntimeError("failed midway")
    assert _names(final) == ["selection.json"] and (final / "selection.json").read_text() == "previous"
    assert _names(tmp_path) == ["probe"]


def test_a_failing_final_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    final = tmp_path / "features"
    final.mkdir()
    (final / "index.json").write_text("previous")
    real_replace = os.replace
    temp = tmp_path / f"features.tmp-{os.getpid()}"

    def fail_publishing(src, dst):
        if Path(src) == temp:
            assert (tmp_path / f"features.old-{os.getpid()}").is_dir()  # the old one waits beside it
            raise OSError(errno.EXDEV, "rename failed", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_publishing)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(final) as tmp:
        (tmp / "index.json").write_text("new")
    monkeypatch.undo()
    assert (final / "index.json").read_text() == "previous"
    assert _names(tmp_path) == ["features"]


def test_a_directory_without_a_previous_one_is_created_with_its_parents(tmp_path):
    final = tmp_path / "outputs" / "finetune"
    with atomic_directory(final) as tmp:
        write_json_atomic(tmp / "head" / "selection.json", {"kind": "finetune"})
    assert (final / "head" / "selection.json").read_bytes() == b'{\n  "kind": "finetune"\n}\n'
    assert _names(final / "head") == ["selection.json"]  # the file's own temp name is gone too
    assert _names(tmp_path / "outputs") == ["finetune"]
