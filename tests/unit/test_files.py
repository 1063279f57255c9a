"""ddae_core.data.files: one listing of folders and archives, the same on every machine."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from ddae_core.data import DatasetLayoutError
from ddae_core.data.files import (
    archive_errors,
    archive_members,
    hidden,
    is_archive,
    is_image_name,
    visible,
    walk_files,
)

# created in this order on purpose: neither creation order nor a folder-first walk is sorted order
TREE = ["b.png", "a/z.png", "a/s1/x.png", "a/.cache/c.png", ".git/config", "__MACOSX/a/._z.png", "a/.DS_Store",
        "a/readme.txt"]


def _tree(root: Path) -> Path:
    for name in TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return root


def test_walk_lists_sorted_relative_posix_paths_without_hidden_entries(tmp_path):
    root = _tree(tmp_path / "src")
    assert walk_files(root) == ["a/readme.txt", "a/s1/x.png", "a/z.png", "b.png"]


def test_walk_does_not_follow_links_to_folders(tmp_path):
    root = _tree(tmp_path / "src")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"s")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert "linked/secret.png" not in walk_files(root)


def test_names_hidden_visible_images_and_archives(tmp_path):
    assert hidden(".x") and hidden("__MACOSX") and not hidden("x.png")
    assert visible("a/b.png") and not visible("a/.b/c.png") and not visible("")
    assert is_image_name("cat/A.JPG") and not is_image_name("cat/notes.txt") and not is_image_name(".x.png")
    (tmp_path / "data.TAR.GZ").write_bytes(b"")
    (tmp_path / "folder.zip").mkdir()
    assert is_archive(tmp_path / "data.TAR.GZ") and not is_archive(tmp_path / "folder.zip")


def _zip_with_a_link(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("b/c.png", b"C")
        zf.writestr("a.png", b"A")
        zf.writestr(zipfile.ZipInfo("empty-dir/"), b"")
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # how zip stores a symlink: its target as data
        zf.writestr(link, b"/etc/passwd")
    return path


def test_zip_members_are_regular_files_sorted_by_name_links_skipped(tmp_path):
    members = [(m.name, m.read()) for m in archive_members(_zip_with_a_link(tmp_path / "x.zip"))]
    assert members == [("a.png", b"A"), ("b/c.png", b"C")]


def test_tar_members_are_regular_files_in_stored_order_links_skipped(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("z.png", b"Z"), ("a.png", b"A")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for kind, name in ((tarfile.SYMTYPE, "sym.png"), (tarfile.LNKTYPE, "hard.png"), (tarfile.DIRTYPE, "d")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.png" if kind != tarfile.DIRTYPE else ""
            tar.addfile(info)
    read = []
    for member in archive_members(path):  # a member reads while the listing is at it (a tar streams)
        with member.open() as handle:
            read.append((member.name, handle.read()))
    assert read == [("z.png", b"Z"), ("a.png", b"A")]


@pytest.mark.parametrize("name", ["broken.zip", "broken.tar.gz"])
def test_a_broken_archive_is_an_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 this is not really an archive" if name.endswith(".zip") else b"\x1f\x8b\x08junk")
    with pytest.raises(DatasetLayoutError, match=f"^{path}: cannot read archive"), archive_errors(path):
        list(archive_members(path))
