"""Data layer: readers, preprocessing, the prepared format. All inputs are generated in tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddae_core.config import DataConfig
from ddae_core.data import (
    FASHION_MNIST_DIR,
    CorruptImagesError,
    DatasetError,
    DatasetLayoutError,
    DatasetNotFoundError,
    PreparedDataError,
    PreprocessSpec,
    balanced_subset,
    compute_checksum,
    idx_shape,
    load_prepared,
    prepare_dataset,
    preprocess_image,
    read_cifar10,
    read_idx,
    save_image_grid,
    to_model_input,
    to_uint8_images,
)

from image_trees import LAYOUT_FLAT, img_config, make_tree, write_bad_files

# --- generators -----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_fashion_mnist(folder: Path, per_class_train: int = 6, per_class_test: int = 2, gz: bool = True) -> dict:
    """Fake Fashion-MNIST: 28x28 images whose pixels encode (index, label), 10 balanced classes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, per_class, prefix in (("train", per_class_train, "train"), ("test", per_class_test, "t10k")):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        rng = np.random.default_rng(len(labels))
        images = rng.integers(1, 256, size=(len(labels), 28, 28), dtype=np.uint8)  # no zeros: padding shows
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[name] = (images, labels)
    return out


def fm_config(folder: Path, **kwargs) -> DataConfig:
    return DataConfig(**{"dataset": "fashion-mnist", "source": str(folder), "image_size": 32, **kwargs})


def write_cifar(folder: Path, per_batch: int = 3) -> dict:
    """Fake CIFAR-10 binary batches: records of label byte + R, G, B planes (32x32, row-major)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_batch, dtype=np.uint8)
        planes = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], planes.reshape(per_batch, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        out[name] = (planes, labels)
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return out


def pack(root: Path, kind: str, dest: Path) -> Path:
    """Archive the contents of ``root`` as .zip or .tar.gz."""
    if kind == "zip":
        path = dest / "data.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(root).as_posix())
    else:
        path = dest / "data.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for f in sorted(root.iterdir()):
                tar.add(f, arcname=f.name)
    return path


# --- readers --------------------------------------------------------------------------------------


def test_fashion_mnist_idx_gz_is_read_and_padded_2px(tmp_path):
    raw = make_fashion_mnist(tmp_path / "fm")
    assert idx_shape(tmp_path / "fm" / "train-images-idx3-ubyte.gz") == (60, 28, 28)
    manifest = prepare_dataset(fm_config(tmp_path / "fm", val_fraction=0.5), tmp_path / "out", progress=False)
    assert manifest["splits"] == {"train": 30, "val": 30, "test": 20}
    assert manifest["shape"] == [32, 32, 1] and manifest["preprocess"]["fit"] == "pad"
    _, splits = load_prepared(tmp_path / "out")
    images, labels = raw["test"]
    test = splits["test"]
    assert test.images.dtype == np.uint8 and test.images.shape == (20, 32, 32, 1)
    for row in range(len(test)):
        source_index = int(test.sample_ids[row]) - 60  # test ids follow the 60 train ids
        np.testing.assert_array_equal(test.images[row, 2:30, 2:30, 0], images[source_index])
        assert test.labels[row] == labels[source_index]
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not test.images[:, border].any()  # the 2 px frame is black


def test_idx_raw_and_gz_read_the_same(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", array, gz=False)), array)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", array, gz=True)), array)
    (tmp_path / "c").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(DatasetLayoutError, match="header says"):
        read_idx(tmp_path / "c")


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="sudo apt-get install dataset-fashion-mnist"):
        prepare_dataset(fm_config(tmp_path / "empty"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # its out.tmp-<pid> is gone


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_binary_batches(tmp_path, packed):
    raw = write_cifar(tmp_path / "cifar-10-batches-bin")
    source = tmp_path / "cifar-10-batches-bin"
    if packed:
        source = tmp_path / "cifar-10-binary.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tmp_path / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    data = read_cifar10(str(source), download=False)
    assert data.class_names == tuple(f"class{i}" for i in range(10))
    assert len(data.train) == 15 and len(data.test) == 3
    planes, labels = raw["data_batch_2.bin"]
    image = np.asarray(data.train.load(3 + 1))  # batch 2, record 1
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, planes[1].transpose(1, 2, 0))
    assert data.train.labels[4] == labels[1]
    np.testing.assert_array_equal(data.test.ids, [15, 16, 17])


def test_cifar10_prepare_at_32_is_pixel_exact(tmp_path):
    raw = write_cifar(tmp_path / "c", per_batch=4)
    config = DataConfig(dataset="cifar10", source=str(tmp_path / "c"), channels=3, image_size=32, val_fraction=0.2)
    prepare_dataset(config, tmp_path / "out", progress=False)
    _, splits = load_prepared(tmp_path / "out")
    planes, _ = raw["test_batch.bin"]
    np.testing.assert_array_equal(splits["test"].images, planes.transpose(0, 2, 3, 1))


# --- image folders --------------------------------------------------------------------------------

LAYOUT_SPLIT = {"train/cat": 6, "train/dog": 6, "train/eel": 6, "test/cat": 2, "test/dog": 2}


@pytest.mark.parametrize("kind", ["dir", "zip", "tar.gz"])
@pytest.mark.parametrize("layout", ["flat", "split"])
def test_image_folder_layouts_and_archives(tmp_path, kind, layout):
    tree = tmp_path / "tree" / "wrapped"  # one wrapper folder, as archives often have
    make_tree(tree, LAYOUT_FLAT if layout == "flat" else LAYOUT_SPLIT)
    (tree / "cat" if layout == "flat" else tree / "train" / "cat").joinpath(".hidden.png").write_bytes(b"junk")
    source = tree if kind == "dir" else pack(tmp_path / "tree", kind, tmp_path)
    manifest = prepare_dataset(img_config(source, test_fraction=0.2), tmp_path / "out", progress=False)
    assert manifest["class_names"] == ["cat", "dog", "eel"]
    assert manifest["skipped"] == []  # the hidden file was not even looked at
    _, splits = load_prepared(tmp_path / "out")
    if layout == "flat":
        assert manifest["splits"]["test"] == 6  # 2 per class carved with test_fraction
        assert np.bincount(splits["test"].labels).tolist() == [2, 2, 2]
    else:
        assert np.bincount(splits["test"].labels, minlength=3).tolist() == [2, 2, 0]
        assert manifest["splits"]["train"] + manifest["splits"]["val"] == 18
    all_ids = np.concatenate([s.sample_ids for s in splits.values()])
    assert len(np.unique(all_ids)) == len(all_ids) == sum(manifest["splits"].values())
    assert splits["train"].images.shape[1:] == (8, 8, 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]  # no out.tmp-<pid>


def test_image_folder_rows_follow_sorted_paths_whatever_the_filesystem_order(tmp_path):
    """Rows are in sorted relative-path order (so the val/test carve is the same on every machine)."""
    from ddae_core.data.sources import scan_image_folder

    root = tmp_path / "src"
    make_tree(root, {"cat": 3, "cat/a-sub": 2, "dog": 3})
    source = scan_image_folder(root, "src")
    paths = list(source.train.paths)
    assert paths == sorted(paths)  # a walk listing a folder's own files first would start with cat/img...
    assert paths[:5] == ["cat/a-sub/img000.png", "cat/a-sub/img001.png", "cat/img000.png", "cat/img001.png",
                         "cat/img002.png"]
    assert source.train.ids.tolist() == list(range(8))  # an id is the position in that sorted list


def test_manifest_is_written_in_key_order_with_utf8_class_names(tmp_path):
    """Its bytes are data/prepared's DVC hash: sorting keys or escaping names would rerun every stage."""
    make_tree(tmp_path / "src", {"café": 3, "dog": 3})
    manifest = prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    written = (tmp_path / "out" / "manifest.json").read_bytes()
    assert written == (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    assert list(json.loads(written))[:3] == ["format", "dataset", "source"] and '"café"'.encode() in written


def test_corrupt_files_fail_listing_all_and_keep_old_output(tmp_path):
    make_tree(tmp_path / "src", LAYOUT_FLAT)
    prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    old_checksum = load_prepared(tmp_path / "out")[0]["checksum"]
    bad = write_bad_files(tmp_path / "src" / "dog")
    with pytest.raises(CorruptImagesError) as info:
        prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert sorted(r["path"] for r in info.value.report) == sorted(f"dog/{name}" for name in bad)
    for name in bad:
        assert name in str(info.value)
    assert load_prepared(tmp_path / "out")[0]["checksum"] == old_checksum  # old good output kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folders left


def test_corrupt_files_fail_leaves_no_output(tmp_path):
    make_tree(tmp_path / "src", LAYOUT_FLAT)
    write_bad_files(tmp_path / "src" / "cat")
    with pytest.raises(CorruptImagesError):
        prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_corrupt_files_skip_are_recorded(tmp_path):
    make_tree(tmp_path / "src", LAYOUT_FLAT)
    bad = write_bad_files(tmp_path / "src" / "eel")
    manifest = prepare_dataset(img_config(tmp_path / "src", on_corrupt="skip"), tmp_path / "out", progress=False)
    assert sorted(r["path"] for r in manifest["skipped"]) == sorted(f"eel/{name}" for name in bad)
    assert all(r["error"] for r in manifest["skipped"])
    assert sum(manifest["splits"].values()) == 30  # the 4 bad files are left out
    assert load_prepared(tmp_path / "out")[0]["skipped"] == manifest["skipped"]


def test_empty_class_folder_is_named(tmp_path):
    make_tree(tmp_path / "src", {"cat": 3, "dog": 3})
    (tmp_path / "src" / "yak").mkdir()
    (tmp_path / "src" / "yak" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetLayoutError, match="'yak'"):
        prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_test_only_class_is_named(tmp_path):
    make_tree(tmp_path / "src", {"train/cat": 3, "train/dog": 3, "test/cat": 1, "test/gnu": 1})
    with pytest.raises(DatasetError, match="gnu"):
        prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)


def test_archive_with_path_traversal_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("cat/a.png", b"x")
        zf.writestr("../escaped.png", b"x")
    with pytest.raises(DatasetLayoutError, match="unsafe"):
        prepare_dataset(img_config(tmp_path / "evil.zip"), tmp_path / "out", progress=False)
    assert not (tmp_path / "escaped.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_modes_and_sizes(tmp_path, channels):
    folder = tmp_path / "src"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    Image.new("L", (20, 9), 100).save(folder / "a" / "gray.png")
    Image.new("RGB", (5, 7), (10, 200, 30)).save(folder / "a" / "rgb.jpg")
    Image.new("RGBA", (33, 33), (255, 255, 255, 0)).save(folder / "a" / "clear.png")
    Image.new("RGB", (16, 40), (9, 9, 9)).convert("P").save(folder / "b" / "palette.gif")
    Image.fromarray(np.full((11, 11), 65535, np.uint16)).save(folder / "b" / "deep.png")  # I;16
    Image.new("CMYK", (12, 12), (0, 0, 0, 0)).save(folder / "b" / "cmyk.tiff")
    Image.new("RGB", (9, 9), (1, 2, 3)).save(folder / "b" / "x.bmp")
    Image.new("RGB", (9, 9), (1, 2, 3)).save(folder / "b" / "x.webp")
    config = img_config(folder, channels=channels, image_size=16, val_fraction=0.3, test_fraction=0.3)
    manifest = prepare_dataset(config, tmp_path / "out", progress=False)
    assert sum(manifest["splits"].values()) == 8 and manifest["skipped"] == []
    _, splits = load_prepared(tmp_path / "out")
    for split in splits.values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (16, 16, channels)
    spec = PreprocessSpec(channels, 16, "resize")
    assert preprocess_image(Image.open(folder / "a" / "clear.png"), spec).max() == 0  # alpha on black
    assert preprocess_image(Image.open(folder / "b" / "deep.png"), spec).min() == 255  # 16-bit scaled
    assert preprocess_image(Image.open(folder / "b" / "cmyk.tiff"), spec).min() == 255  # no ink = white


def test_val_split_stratified_deterministic_disjoint(tmp_path):
    raw_images, _ = make_fashion_mnist(tmp_path / "fm", per_class_train=10)["train"]

    def split_ids(seed: int, name: str) -> dict:
        prepare_dataset(fm_config(tmp_path / "fm", split_seed=seed, val_fraction=0.2), tmp_path / name, progress=False)
        return load_prepared(tmp_path / name)[1]

    a, again, other = split_ids(0, "a"), split_ids(0, "again"), split_ids(1, "other")
    assert np.bincount(a["val"].labels).tolist() == [2] * 10  # 20% of each class
    assert np.bincount(a["train"].labels).tolist() == [8] * 10
    np.testing.assert_array_equal(a["val"].sample_ids, again["val"].sample_ids)
    assert not np.array_equal(a["val"].sample_ids, other["val"].sample_ids)
    assert not set(a["val"].sample_ids) & set(a["train"].sample_ids)
    all_ids = np.concatenate([s.sample_ids for s in a.values()])
    assert len(np.unique(all_ids)) == len(all_ids) == 120
    for row in (0, 5):  # a val row's pixels are the source image its id names
        np.testing.assert_array_equal(a["val"].images[row, 2:30, 2:30, 0], raw_images[a["val"].sample_ids[row]])


def test_checksum_stable_on_rerun_and_sensitive_to_one_pixel(tmp_path):
    make_tree(tmp_path / "src", {"cat": 4, "dog": 4})
    first = prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert compute_checksum(tmp_path / "out") == first["checksum"]
    second = prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert second["checksum"] == first["checksum"]
    path = tmp_path / "src" / "dog" / "img002.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[5, 5, 0] ^= 0xFF
    Image.fromarray(pixels).save(path)
    third = prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert third["checksum"] != first["checksum"]
    assert third["splits"] == first["splits"]


def test_max_train_is_class_balanced(tmp_path):
    make_tree(tmp_path / "src", {"train/a": 20, "train/b": 5, "train/c": 12, "test/a": 6, "test/b": 6, "test/c": 6})
    config = img_config(tmp_path / "src", max_train=21, max_test=9, val_fraction=0.2)
    manifest = prepare_dataset(config, tmp_path / "out", progress=False)
    _, splits = load_prepared(tmp_path / "out")
    pool = np.concatenate([splits["train"].labels, splits["val"].labels])
    assert np.bincount(pool).tolist() == [8, 5, 8]  # b has only 5; its share goes to a and c
    assert np.bincount(splits["test"].labels).tolist() == [3, 3, 3]
    assert np.bincount(splits["val"].labels).tolist() == [2, 1, 2]  # round(0.2 * class), after the subset
    rng = np.random.default_rng(0)
    assert np.bincount(np.repeat([0, 1, 2], 10)[balanced_subset(np.repeat([0, 1, 2], 10), 7, rng)]).max() == 3


def test_load_prepared_errors_name_the_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json") as missing:
        load_prepared(tmp_path)
    assert isinstance(missing.value, DatasetError)  # stages catch one base class
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PreparedDataError, match=r"manifest\.json"):
        load_prepared(tmp_path)


def test_refuses_to_replace_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    make_tree(tmp_path / "src", {"cat": 2, "dog": 2})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


# --- preprocessing and scaling --------------------------------------------------------------------


def test_to_model_input_range_and_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    x = to_model_input(images)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 5, 6)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert x[0, 1, 0, 0].item() == 1.0 and x[0, 0, 0, 0].item() == -1.0
    np.testing.assert_array_equal(to_uint8_images(x), images)
    assert to_uint8_images(torch.full((1, 1, 2, 2), 3.0)).max() == 255  # clipped, not wrapped
    with pytest.raises(ValueError):
        to_model_input(images.astype(np.float32))


def test_preprocess_bytes_equals_pil():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (30, 45, 4), dtype=np.uint8), mode="RGBA")
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    for spec in (PreprocessSpec(3, 16, "resize"), PreprocessSpec(1, 32, "pad")):
        from_bytes = preprocess_image(buffer.getvalue(), spec)
        assert from_bytes.shape == spec.shape and from_bytes.dtype == np.uint8
        np.testing.assert_array_equal(from_bytes, preprocess_image(img, spec))
    assert PreprocessSpec.from_dict(PreprocessSpec(3, 16, "pad").to_dict()) == PreprocessSpec(3, 16, "pad")


def test_resize_center_crops_and_pad_shrinks_larger():
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # only the centre third is white
    out = preprocess_image(Image.fromarray(wide), PreprocessSpec(3, 10, "resize"))
    assert out.min() == 255  # the crop kept exactly the white centre square
    padded = preprocess_image(Image.fromarray(np.full((64, 32), 255, np.uint8)), PreprocessSpec(1, 32, "pad"))
    assert padded.shape == (32, 32, 1)
    assert padded[:, 8:24].min() == 255 and padded[:, :8].max() == 0 and padded[:, 24:].max() == 0


def test_save_image_grid(tmp_path):
    images = np.stack([np.full((4, 5, 1), 10 * i, np.uint8) for i in range(5)])
    path = save_image_grid(images, tmp_path / "grids" / "g.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2)
    assert grid[2 + 6, 2 + 7] == 40  # row 1, column 1 holds image 4
    assert [p.name for p in path.parent.iterdir()] == ["g.png"]  # no temp file left


# --- the real files -------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (sudo apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(tmp_path):
    assert idx_shape(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") == (60000, 28, 28)
    assert idx_shape(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") == (10000, 28, 28)
    assert idx_shape(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz") == (10000,)
    manifest = prepare_dataset(DataConfig(image_size=32, max_train=200, max_test=50), tmp_path / "fm", progress=False)
    assert manifest["splits"] == {"train": 180, "val": 20, "test": 50}
    assert manifest["class_names"][0] == "T-shirt/top" and manifest["class_names"][9] == "Ankle boot"
    _, splits = load_prepared(tmp_path / "fm")
    assert np.bincount(splits["val"].labels).tolist() == [2] * 10
    assert splits["test"].images.shape == (50, 32, 32, 1)
    assert splits["test"].images[:, :2].max() == 0 and splits["train"].images.mean() > 10
