"""Anomaly detection with good parts only, end to end: ``dvc repro`` on an image folder where one class is
normal (train and val hold only it) and the others are anomalies in test; the AUROC is in the metrics, and
the registered model, served, names the normal class and flags an anomalous image as novel."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import e2e_helpers as h

pytestmark = pytest.mark.slow

NORMAL = "stripes"  # vertical stripes; the anomalies are checkerboards and discs
MODEL = "ddae-anomaly"


def test_dvc_repro_in_anomaly_mode_scores_and_serves_a_one_class_detector(tmp_path, monkeypatch):
    import mlflow

    tree = h.make_image_tree(tmp_path / "parts", per_class=60)
    params = h.imagefolder_params(tree, **{"data.normal_classes": [NORMAL], "register.model_name": MODEL,
                                           "predict.novelty_false_alarm": 0.1})
    root = h.copy_project(tmp_path / "project", params)
    result = h.dvc(root, "repro", timeout=900)
    assert result.returncode == 0, result.stdout[-6000:]

    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["normal_classes"] == [NORMAL]
    assert {c for c, n in manifest["class_counts"]["train"].items() if n} == {NORMAL}
    assert all(n == 12 for n in manifest["class_counts"]["test"].values())  # every class in test

    probe = json.loads((root / "metrics/probe.json").read_text())
    assert probe["mode"] == "anomaly" and "test_acc" not in probe
    assert probe["test_auroc"] > 0.5 and probe["anomaly"]["test_auroc"] == probe["test_auroc"]
    assert 0 <= probe["anomaly"]["false_alarm_at_recall"] <= 1 and probe["anomaly"]["recall"] == 0.95
    assert probe["anomaly"]["test_normal"] == 12 and probe["anomaly"]["test_anomalous"] == 24
    assert "raw_pixels_test_auroc" in probe and probe["anomaly"]["raw_pixels"]["dim"] == 32 * 32 * 3  # TINY_PARAMS: 32x32
    assert probe["novelty"]["threshold"] == probe["anomaly"]["threshold"]
    assert (root / "plots/probe/roc.csv").read_text().startswith("false_alarm,recall,threshold")
    assert (root / "plots/probe/roc.png").stat().st_size > 0
    assert "skipped" in json.loads((root / "metrics/evaluate.json").read_text())
    shown = h.dvc(root, "metrics", "show", "--json")
    assert shown.returncode == 0 and "test_auroc" in shown.stdout
    # Every plot dvc.yaml declares exists, those this mode does not draw as a PNG saying why: no errors.
    plots = subprocess.run([h.tool("dvc"), "plots", "show", "--json", "-o", str(tmp_path / "plots")], cwd=root,
                           env=h.project_env(root), capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0, plots.stdout[-3000:] + plots.stderr[-3000:]
    assert "errors" not in json.loads(plots.stdout), json.loads(plots.stdout)["errors"]
    for png in ("outputs/pretrain/monitor.png", "plots/evaluate/label_efficiency.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    register = json.loads((root / "metrics/register.json").read_text())
    assert register["metric"] == "test_auroc" and register["promoted"] and register["test_auroc"] > 0.5

    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a model prepends its code path
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    import pandas as pd

    normal = h.png_bytes(h._pattern(h._KIND[NORMAL], 7))  # a train image: normal by construction
    noise = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)  # nothing like a part
    out = model.predict(pd.DataFrame({"image": [normal, h.png_bytes(noise)]}))
    assert list(out["class_name"]) == [NORMAL, NORMAL]  # the nearest (only) normal class
    assert out["confidence"].tolist() == [1.0, 1.0]
    threshold = probe["anomaly"]["threshold"]
    assert out["novelty"].iloc[1] > threshold and out["review_reason"].iloc[1] == "novel"
    assert out["novelty"].iloc[0] < out["novelty"].iloc[1]
