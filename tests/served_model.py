"""A tiny project the served-model and register tests share: prepared 32x32 grayscale data, a saved
``ddpm-tiny`` network, a probe over its features, and the probe stage's metrics and confusion PNG.

Everything register reads is here, at the paths the stages write, so ``tasks.register.run`` runs on it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

from ddae_core.atomic import write_json_atomic
from ddae_core.checkpoint import network_hash
from ddae_core.data import load_prepared, prepare_dataset
from ddae_core.features import extract_all
from ddae_core.heads.metrics import confusion_matrix
from ddae_core.heads.probe import LinearProbe
from ddae_core.readout import SELECTION_FILE, Readout, Selection
from tasks.services.outputs.paths import Paths
from tasks.services.outputs.plots import save_confusion

from feature_store_builder import save_tiny_network
from image_trees import img_config, make_tree

READOUT = Readout(("mid.res1",), 11.0, 1, 5)
LAYOUT = {"a": 6, "b": 6, "c": 6}


def png(value: int, size: int = 20) -> bytes:
    """A solid grayscale PNG."""
    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def build_project(root: Path) -> Paths:
    """Prepared data, network, probe (random weights: the tests check plumbing, not accuracy), metrics."""
    paths = Paths(root)
    make_tree(root / "images", LAYOUT, size=20)
    prepare_dataset(img_config(root / "images", image_size=32, channels=1, test_fraction=0.34, val_fraction=0.25),
                    paths.prepared, progress=False)
    manifest, splits = load_prepared(paths.prepared)
    denoiser = save_tiny_network(paths, resolution=32)
    test = splits["test"]
    features = extract_all(denoiser, np.asarray(test.images), np.asarray(test.sample_ids), taps=READOUT.taps,
                           levels=[READOUT.level], pools=[READOUT.pool], seed=READOUT.seed,
                           progress=False)[READOUT.feature_keys[0]]
    rng = np.random.default_rng(0)
    k, dim = len(manifest["class_names"]), features.shape[1]
    probe = LinearProbe(weight=rng.normal(size=(k, dim)).astype(np.float32), bias=np.zeros(k, np.float32),
                        mean=features.mean(axis=0).astype(np.float32), std=np.ones(dim, np.float32))
    labels = np.asarray(test.labels)
    predicted = probe.predict(features)
    test_acc = float(np.mean(predicted == labels))
    paths.probe.mkdir(parents=True)
    save_file(probe.state_dict(), str(paths.probe / "probe.safetensors"))
    selection = Selection(readout=READOUT, class_names=tuple(manifest["class_names"]), level_kind="t",
                          test_acc=test_acc, network_hash=network_hash(paths.network),
                          data_checksum=manifest["checksum"], l2=1e-3, val_acc=0.5)
    (paths.probe / SELECTION_FILE).write_text(json.dumps(selection.to_json()))
    confusion = confusion_matrix(labels, predicted, k)
    write_json_atomic(paths.metrics / "probe.json", {
        "test_acc": test_acc, "test_balanced_acc": 0.4321, "val_acc": 0.5,
        "best": {"name": READOUT.label}, "train_size": int(manifest["splits"]["train"]),
        "selective": {"target_accuracy": 0.95, "suggested_threshold": 0.8765, "chosen_on": "val",
                      "val_coverage": 0.5, "val_accuracy": 0.96, "test_coverage": 0.4567, "test_accuracy": 0.9}})
    (paths.plots / "probe").mkdir(parents=True)
    save_confusion(confusion, manifest["class_names"], paths.plots / "probe" / "confusion.png", "Test confusion")
    (root / "params.yaml").write_text("register:\n  model_name: ddae-classifier\n")
    return paths


def preprocess_file(paths: Paths, folder: Path) -> Path:
    """The manifest's preprocessing as the JSON file the pyfunc model loads."""
    manifest, _ = load_prepared(paths.prepared)
    path = folder / "preprocess.json"
    path.write_text(json.dumps(manifest["preprocess"]))
    return path
