"""Streaming image files from folders and archives (batch inference), and the source snapshot."""

import stat
import tarfile
import zipfile

import pytest

from ddae_core.config import DataConfig
from ddae_core.data import DatasetError
from ddae_core.data.image_files import count_images, iter_images
from ddae_core.data.snapshot import source_snapshot


def _tree(root):
    (root / "b").mkdir(parents=True)
    (root / "a.png").write_bytes(b"A")
    (root / "b" / "c.JPG").write_bytes(b"C")
    (root / "notes.txt").write_bytes(b"not an image")
    (root / ".hidden.png").write_bytes(b"H")
    return root


def test_folder_and_archives_yield_the_same_images(tmp_path):
    folder = _tree(tmp_path / "imgs")
    assert list(iter_images(folder)) == [("a.png", b"A"), ("b/c.JPG", b"C")]
    assert count_images(folder) == 2
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for name in ("b/c.JPG", "a.png", "notes.txt"):
            zf.write(folder / name, name)
    assert list(iter_images(tmp_path / "imgs.zip")) == [("a.png", b"A"), ("b/c.JPG", b"C")]
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(folder / "a.png", "a.png")
        tar.add(folder / "notes.txt", "notes.txt")
    assert count_images(tmp_path / "imgs.tar.gz") == 1
    assert list(iter_images(tmp_path / "imgs.tar.gz")) == [("a.png", b"A")]


def test_links_in_a_zip_are_skipped_not_read(tmp_path):
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        zf.writestr("a.png", b"A")
        link = zipfile.ZipInfo("passwd.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symlink entry: its data is the target path
        zf.writestr(link, b"/etc/passwd")
    assert list(iter_images(tmp_path / "imgs.zip")) == [("a.png", b"A")]
    assert count_images(tmp_path / "imgs.zip") == 1


def test_missing_or_unsupported_source_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        count_images(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        count_images(tmp_path / "x.txt")


def test_snapshot_changes_with_content_only(tmp_path):
    folder = _tree(tmp_path / "imgs")
    config = DataConfig(dataset="imagefolder", source=str(folder))
    first = source_snapshot(config)
    assert first["files"] == 3 and first == source_snapshot(config)  # stable; hidden files left out
    (folder / "b" / "d.png").write_bytes(b"D")
    added = source_snapshot(config)
    assert added["checksum"] != first["checksum"]
    (folder / "b" / "d.png").write_bytes(b"E")  # same names, other bytes
    assert source_snapshot(config)["checksum"] not in (first["checksum"], added["checksum"])
    with pytest.raises(DatasetError, match="does not exist"):
        source_snapshot(DataConfig(dataset="imagefolder", source=str(tmp_path / "gone")))
