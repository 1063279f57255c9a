"""A user's own photos on the first try: ``ddae run --dataset imagefolder --set data.source=DIR`` with no
shape, channels or taps set, on colour JPEGs of odd sizes (one grayscale, one rotated by EXIF) in the
``train/`` + ``val/`` layout; it must finish, register a model and predict on one of the JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddae_core.nn.unet import network_config, tap_names

import e2e_helpers as h

pytestmark = pytest.mark.slow

CLASSES = ("ants", "bees", "wasps")
# Only what makes the run test-sized: a tiny network, few steps, small batches and a small working size.
TINY_STEPS = {
    "pretrain.network.name": "ddpm-tiny",
    "pretrain.train.steps": 20,
    "pretrain.train.batch_size": 16,
    "pretrain.train.checkpoint_every": 10,
    "pretrain.train.warmup_steps": 5,
    "pretrain.train.mixed_precision": "no",
    "pretrain.samples.count": 4,
    "pretrain.samples.steps": 5,
    "probe.max_iter": 50,
    "data.max_image_size": 32,
}


def photo(kind: int, index: int, size: tuple[int, int]) -> Image.Image:
    """A colour photo of class ``kind``: its own hue and stripe direction, varied by ``index``."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((xx if kind == 0 else yy if kind == 1 else xx + yy) * (0.3 + 0.02 * index)) * 0.5 + 0.5
    hue = np.array([(220, 60, 40), (40, 180, 60), (50, 70, 220)][kind], np.float32)
    rgb = stripes[..., None] * hue + (1 - stripes[..., None]) * (255 - hue) * 0.3
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def write_photos(root: Path) -> Path:
    """``train/`` (10 per class) and ``val/`` (4 per class): 48x40 and 300x200 JPEGs, one grayscale
    and one stored on its side with an EXIF orientation tag."""
    for split, count in (("train", 10), ("val", 4)):
        for kind, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (300, 200) if i % 3 == 0 else (48, 40)
                image = photo(kind, i, size)
                if split == "train" and kind == 0 and i == 1:
                    image = image.convert("L")
                exif = Image.Exif()
                if split == "train" and kind == 1 and i == 2:
                    image = image.transpose(Image.Transpose.ROTATE_90)
                    exif[0x0112] = 6  # "rotate 90 CW to view": undone at prepare
                image.save(folder / f"img{i:02d}.jpg", quality=92, exif=exif)
    return root


def test_ddae_run_on_a_photo_folder_with_nothing_set(tmp_path):
    import pyarrow.parquet as pq

    source = write_photos(tmp_path / "photos")
    root = h.copy_project(tmp_path / "project")
    overrides = [f"--set={key}={json.dumps(value)}" for key, value in TINY_STEPS.items()]  # YAML reads JSON
    ran = h.run([h.tool("ddae"), "run", "--dataset", "imagefolder", "--set", f"data.source={source}", *overrides],
                root, timeout=1500)
    assert ran.returncode == 0, ran.stdout[-4000:]
    (report,) = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith('{"metrics"')]  # the report line
    assert report["mlflow_ui"].startswith("http://127.0.0.1:5000/#/experiments/")  # the UI's model-training view
    assert report["mlflow_ui"].endswith("?workflowType=machine_learning")

    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["shape"] == [32, 32, 3]  # colour inferred; median shorter side 40, capped at 32
    assert "val/ is used as the test split" in manifest["layout"]
    assert manifest["splits"]["test"] == 12 and manifest["class_counts"]["test"] == dict.fromkeys(CLASSES, 4)
    assert any("unreliable" in w for w in manifest["warnings"])  # 1 validation image per class
    assert "val/ is used as the test split" in ran.stdout

    selection = json.loads((root / "outputs/probe/selection.json").read_text())
    blocks = tap_names(network_config("ddpm-tiny", 3, 32))
    assert selection["taps"] and set(selection["taps"]) <= set(blocks)  # the selectors, resolved to 32x32 blocks
    register = json.loads((root / "metrics/register.json").read_text())
    assert register["version"] == 1 and register["promoted"]

    one = tmp_path / "one"
    one.mkdir()
    (one / "bee.jpg").write_bytes((source / "train/bees/img02.jpg").read_bytes())  # the EXIF-rotated one
    out = tmp_path / "predicted.parquet"
    predicted = h.run([h.tool("ddae"), "predict", str(one), "-o", str(out)], root, timeout=300)
    assert predicted.returncode == 0, predicted.stdout[-3000:]
    table = pq.read_table(out).to_pandas()
    assert len(table) == 1 and table["error"].isna().all() and table["class_name"].iloc[0] in CLASSES
