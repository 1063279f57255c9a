"""A user's own image folder with nothing set: the working-shape rule, split layouts, per-class counts,
small-data warnings, a pretraining length that scales, and tap names that do not depend on the size."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from PIL import Image

from ddae_core.config import DataConfig, PipelineConfig, TrainConfig
from ddae_core.data import load_prepared, prepare_dataset
from ddae_core.data.errors import DatasetLayoutError
from ddae_core.data.shape import fit_size, has_colour, working_shape
from ddae_core.data.sources import ArraySplit, Source, scan_image_folder
from ddae_core.nn import NETWORKS, network_config, tap_names, tap_selectors
from ddae_core.nn.unet import size_multiple
from ddae_core.readout import resolve_taps
from ddae_core.training.schedules import planned_steps
from ddae_core.validation import validate_readouts
from image_trees import make_tree


def auto_config(source, **kwargs) -> DataConfig:
    return DataConfig(dataset="imagefolder", source=str(source), **kwargs)


def write_images(folder, sizes, mode="RGB", colour=True):
    """One image per (width, height) in ``sizes``: a colour gradient, or gray values stored in ``mode``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
        if mode == "L":
            img = Image.fromarray(x.astype(np.uint8), "L")
        else:
            planes = (x, x[::-1, ::-1], np.full_like(x, 60)) if colour else (x, x, x)
            img = Image.fromarray(np.stack(planes, -1).astype(np.uint8), "RGB")
        img.save(folder / f"img{i:03d}.jpg", quality=90)


# --- the working-shape rule -------------------------------------------------------------------------


def test_fit_size_caps_rounds_down_to_the_multiple_and_never_goes_below_eight():
    assert fit_size(28, 64, 4) == 28  # Fashion-MNIST exported as PNGs keeps its own size
    assert fit_size(32, 64, 8) == 32
    assert fit_size(30, 64, 4) == 28  # down to what the network's down-sampling divides
    assert fit_size(1200, 64, 4) == 64  # big photos: the cap
    assert fit_size(5, 64, 4) == 8 and fit_size(5, 64, 16) == 16  # tiny images: the floor, rounded up


def test_colour_is_judged_on_pixels_not_on_the_mode():
    gray_rgb = Image.fromarray(np.full((20, 20, 3), 128, np.uint8), "RGB")
    tinted = np.full((20, 20, 3), 128, np.uint8)
    tinted[5, 5] = (200, 90, 40)
    assert not has_colour(gray_rgb) and not has_colour(gray_rgb.convert("L"))
    assert has_colour(Image.fromarray(tinted, "RGB"))


def test_colour_photos_of_mixed_sizes_give_three_channels_and_the_median_side(tmp_path):
    write_images(tmp_path / "src" / "a", [(300, 200), (48, 40), (120, 100)])
    write_images(tmp_path / "src" / "b", [(60, 90), (200, 300)])
    source = scan_image_folder(tmp_path / "src", "src")
    shape = working_shape(source, auto_config(tmp_path / "src"), multiple=4)
    assert (shape.channels, shape.image_size) == (3, 64)  # median shorter side 100, capped at 64
    narrow = working_shape(source, auto_config(tmp_path / "src", max_image_size=1000), multiple=8)
    assert narrow.image_size == 96  # median 100, down to a multiple of 8
    assert "median shorter side 100" in narrow.reason


def test_gray_photos_saved_as_rgb_jpegs_give_one_channel(tmp_path):
    write_images(tmp_path / "src" / "a", [(28, 28)] * 3, colour=False)
    write_images(tmp_path / "src" / "b", [(28, 28)] * 3, mode="L")
    shape = working_shape(scan_image_folder(tmp_path / "src", "src"), auto_config(tmp_path / "src"), multiple=4)
    assert (shape.channels, shape.image_size) == (1, 28)


def test_a_known_dataset_keeps_its_shape_rounded_up_for_a_deeper_network():
    images = np.zeros((4, 28, 28), np.uint8)
    split = ArraySplit(images, np.array([0, 1, 0, 1]), np.arange(4), "fashion-mnist train")
    source = Source("fashion-mnist", "-", ("a", "b"), split, split, "pad", native_shape=(1, 28))
    assert working_shape(source, DataConfig(), multiple=4).image_size == 28  # the default run, as it was
    deeper = working_shape(source, DataConfig(), multiple=8)  # ddpm-35m: padded to 32, never cropped to 24
    assert (deeper.channels, deeper.image_size) == (1, 32) and "rounded up to 32" in deeper.reason


def test_explicit_channels_and_size_win_over_the_rule(tmp_path):
    write_images(tmp_path / "src" / "a", [(100, 100)] * 2)
    write_images(tmp_path / "src" / "b", [(100, 100)] * 2)
    source = scan_image_folder(tmp_path / "src", "src")
    shape = working_shape(source, auto_config(tmp_path / "src", channels=1), multiple=4)
    assert (shape.channels, shape.image_size) == (1, 64)
    shape = working_shape(source, auto_config(tmp_path / "src", image_size=16), multiple=4)
    assert (shape.channels, shape.image_size) == (3, 16)


def test_prepare_with_nothing_set_records_the_shape_and_why(tmp_path):
    write_images(tmp_path / "src" / "a", [(40, 40)] * 6)
    write_images(tmp_path / "src" / "b", [(44, 40)] * 6)
    manifest = prepare_dataset(auto_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert manifest["shape"] == [40, 40, 3]
    assert manifest["preprocess"] == {"channels": 3, "image_size": 40, "fit": "resize"}
    assert "median shorter side 40" in manifest["shape_rule"]
    assert manifest["config"]["image_size"] == "auto"  # what was asked, beside what it became


def test_size_multiple_follows_the_network_depth():
    assert size_multiple("ddpm-cpu") == 4 and size_multiple("ddpm-35m") == 8 and size_multiple("ddpm-tiny") == 2
    with pytest.raises(ValueError, match="unknown name"):
        size_multiple("resnet")


# --- layouts -------------------------------------------------------------------------------------


def test_train_and_val_folders_use_val_as_the_test_split(tmp_path):
    make_tree(tmp_path / "src", {"train/ants": 8, "train/bees": 8, "val/ants": 3, "val/bees": 2})
    source = scan_image_folder(tmp_path / "src", "src")
    assert source.test is not None and len(source.test) == 5 and source.val is None
    assert "val/ is used as the test split" in source.layout
    manifest = prepare_dataset(auto_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert manifest["splits"]["test"] == 5 and manifest["splits"]["train"] + manifest["splits"]["val"] == 16
    assert manifest["layout"] == source.layout


def test_train_val_and_test_folders_are_used_as_named(tmp_path):
    make_tree(tmp_path / "src", {"train/a": 6, "train/b": 6, "validation/a": 2, "validation/b": 3,
                                 "test/a": 4, "test/b": 1})
    manifest = prepare_dataset(auto_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert manifest["splits"] == {"train": 12, "val": 5, "test": 5}
    assert manifest["class_counts"] == {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 3},
                                        "test": {"a": 4, "b": 1}}
    _, splits = load_prepared(tmp_path / "out")
    ids = np.concatenate([s.sample_ids for s in splits.values()])
    assert len(np.unique(ids)) == len(ids) == 22


def test_a_lone_train_folder_is_split_like_class_folders(tmp_path):
    make_tree(tmp_path / "src", {"train/a": 10, "train/b": 10})
    manifest = prepare_dataset(auto_config(tmp_path / "src", test_fraction=0.2), tmp_path / "out", progress=False)
    assert manifest["splits"]["test"] == 4 and "carved" in manifest["layout"]


@pytest.mark.parametrize("tree, fragment", [
    ({"val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2}, "found test/ and val/ without train/"),
    ({"train/a": 2, "train/b": 2, "val/a": 1, "valid/a": 1}, "both val/ and valid/ name the val split"),
    ({"train/a": 2, "train/b": 2, "test/a": 1, "test/c": 1}, "test/ has class folder(s) ['c']"),
])
def test_bad_split_layouts_are_named(tmp_path, tree, fragment):
    make_tree(tmp_path / "src", tree)
    with pytest.raises(DatasetLayoutError, match=re.escape(fragment)):
        prepare_dataset(auto_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tiny_data_runs_with_warnings_about_selection(tmp_path):
    make_tree(tmp_path / "src", {"a": 5, "b": 5})
    manifest = prepare_dataset(auto_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert all(n >= 1 for split in manifest["class_counts"].values() for n in split.values())
    assert any("val split" in w and "unreliable" in w for w in manifest["warnings"])
    assert any("test split" in w and "noisy" in w for w in manifest["warnings"])
    big = tmp_path / "big"
    make_tree(big, {"a": 120, "b": 120}, size=8)
    assert prepare_dataset(auto_config(big), tmp_path / "out2", progress=False)["warnings"] == []


# --- pretraining length ---------------------------------------------------------------------------


def test_planned_steps_mean_epochs_within_a_floor_and_a_cap():
    train = TrainConfig()
    assert planned_steps(train, 54_000) == 844  # Fashion-MNIST: 2 epochs, rounded up to whole batches
    assert planned_steps(train, 80_000) == 900  # 2 epochs > the cap
    assert planned_steps(train, 320) == 200  # a few hundred photos: the floor, ~80 epochs
    assert planned_steps(train, 30_000) == 469  # in between: 2 epochs, rounded up to whole batches
    assert planned_steps(dataclasses.replace(train, steps=7), 54_000) == 7  # explicit steps win


# --- tap names that do not depend on the size -------------------------------------------------------


@pytest.mark.parametrize("name", list(NETWORKS))
def test_default_taps_resolve_for_every_network_at_two_sizes(name):
    config = PipelineConfig()
    resolved = {}
    multiple = size_multiple(name)
    for size in (4 * multiple, 8 * multiple):
        unet = network_config(name, 3, size)
        selectors = tap_selectors(unet)
        validate_readouts(config, tap_names(unet), selectors)  # extract.taps and every probe.concat group
        blocks = resolve_taps(config.extract.taps, tap_names(unet), selectors, "extract.taps")
        decoder = [b for b in tap_names(unet) if b.startswith("dec.") and ".res" in b]
        assert blocks == ("mid.res1", *decoder)
        assert selectors["dec1"] == tuple(b for b in decoder if b.startswith(f"dec.{size // multiple}x"))
        assert selectors["out_1"] == (decoder[0],)
        resolved[size] = [b.split(".")[-1] for b in blocks]
    small, large = resolved.values()
    assert small == large  # the same roles at either size: only the resolution in the names differs
