"""A model trained elsewhere, through the whole pipeline: a tiny latent DiT + VAE (diffusers' constructors,
``save_pretrained``) imported, extracted, probed and registered on a generated image folder; the registered
model classifies PNG bytes; DVC reruns exactly when the imported weights change; and a second project
imports the first one's registered network by its ``models:/`` URI and probes it the same."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
from PIL import Image

from ddae_core.pretrained.importer import source_checksum

import e2e_helpers as h
from diffusers_models import save_dit_pipeline

pytestmark = pytest.mark.slow

SMALL = {"probe.max_iter": 50, "extract.levels": [121], "label_efficiency.fractions": [1.0],
         "diagnostics.pairs": 0, "diagnostics.knn_queries": 30}


def overrides(source: str) -> list[str]:
    pairs = {"pretrain.init.mode": "import", "pretrain.init.source": source, **SMALL}
    return [f"--set={key}={json.dumps(value)}" for key, value in pairs.items()]  # YAML reads JSON


def test_a_latent_dit_is_imported_probed_registered_and_serves_png_bytes(tmp_path, monkeypatch):
    import mlflow

    dit = save_dit_pipeline(tmp_path / "dit")
    images = h.make_image_tree(tmp_path / "images", per_class=12)
    for path in images.rglob("*.png"):  # 20x20: the model's 16x16 must win over the images' own size
        Image.open(path).resize((20, 20)).save(path)
    root = h.copy_project(tmp_path / "project")
    ran = h.run([h.tool("ddae"), "run", "--dataset", "imagefolder", "--set", f"data.source={images}",
                 *overrides(str(dit))], root, timeout=1200)
    assert ran.returncode == 0, ran.stdout[-4000:]

    assert json.loads((root / "data/prepared/manifest.json").read_text())["shape"] == [16, 16, 3]
    record = json.loads((root / "data/init.json").read_text())
    assert record["checksum"] == source_checksum(dit) and record["input_shape"] == [3, 16]
    network = json.loads((root / "outputs/pretrain/network/network.json").read_text())
    assert network["kind"] == "latent-dit" and network["init"]["source"] == str(dit)
    selection = json.loads((root / "outputs/probe/selection.json").read_text())
    assert selection["taps"] and all(tap.startswith("transformer_blocks.") for tap in selection["taps"])

    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a model prepends its code path
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("ddae-classifier", "champion")
    assert version.tags["ddae.init.source"] == str(dit) and version.tags["ddae.init.checksum"] == record["checksum"]
    pngs = [h.png_bytes(h._pattern(kind, 500 + kind)) for kind in range(3)]
    predicted = mlflow.pyfunc.load_model("models:/ddae-classifier@champion").predict(pd.DataFrame({"image": pngs}))
    assert len(predicted) == 3 and set(predicted["class_name"]) <= set(h.CLASSES)

    listed = h.run([h.tool("ddae"), "networks", "--from", str(dit)], root)
    assert listed.returncode == 0 and "transformer_blocks.1" in listed.stdout and "16 tokens" in listed.stdout

    # new weights in the same folder: the snapshot moves, and exactly the stages from prepare on are stale
    save_dit_pipeline(dit, seed=1)
    assert h.stage_python(root, "snapshot").returncode == 0
    status = h.dvc(root, "status", "--json")
    stale = set(json.loads(status.stdout))
    assert {"prepare", "pretrain"} <= stale and "snapshot" in stale  # init.json is a dep of both
    assert json.loads((root / "data/init.json").read_text())["checksum"] == source_checksum(dit) != record["checksum"]

    # a second project imports the first one's registered network by its registry URI, through DVC up
    # to the probe (the stages after it do not care where the network came from: the run above ran them)
    other = h.copy_project(tmp_path / "other", {
        "data.dataset": "imagefolder", "data.source": str(images), "pretrain.init.mode": "import",
        "pretrain.init.source": f"models:/ddae-classifier/{version.version}", **SMALL})
    imported = h.dvc(other, "repro", "probe", env=h.project_env(other, MLFLOW_TRACKING_URI=uri), timeout=1200)
    assert imported.returncode == 0, imported.stdout[-4000:]
    assert json.loads((other / "outputs/pretrain/network/network.json").read_text())["kind"] == "latent-dit"
    ours, theirs = (json.loads((p / "metrics/probe.json").read_text()) for p in (root, other))
    assert ours["val_acc"] == theirs["val_acc"]  # the same weights, data and probe: the same selection


def test_bad_sources_stop_the_run_naming_them_and_leave_no_network(tmp_path):
    images = h.make_image_tree(tmp_path / "images", per_class=4)
    root = h.copy_project(tmp_path / "project")
    missing = tmp_path / "not-here"
    ran = h.run([h.tool("ddae"), "run", "--dataset", "imagefolder", "--set", f"data.source={images}",
                 *overrides(str(missing))], root, timeout=600)
    assert ran.returncode != 0 and f"{missing}: no such file or folder" in ran.stdout
    assert not (root / "outputs/pretrain/network").exists()
    listed = h.run([h.tool("ddae"), "networks", "--from", str(missing)], root)
    assert listed.returncode == 1 and "no such file or folder" in listed.stdout
