"""dvc.yaml's metrics and plots against the files the stages write (no pipeline run).

The slow end-to-end tests read `dvc metrics show` / `dvc plots show` after a real `dvc repro`; these
check the declarations against the writers' own columns, and let DVC draw tables those writers made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from ddae_core.atomic import write_bytes_atomic, write_csv_atomic
from ddae_core.heads.anomaly import roc_curve
from ddae_core.heads.selective import selective_curve
from ddae_core.readout import Readout
from tasks.evaluate import EFFICIENCY_COLUMNS, efficiency_table
from tasks.probe import CONFUSION_COLUMNS, PER_CLASS_COLUMNS, TABLE_COLUMNS, write_per_class, write_table
from tasks.services.outputs.feature_store import Candidate
from tasks.services.outputs.plots import (
    LOSS_COLUMNS,
    MONITOR_COLUMNS,
    ROC_COLUMNS,
    save_loss_table,
    save_monitor_table,
    save_roc_table,
)
from tasks.services.outputs.selective import CURVE_COLUMNS, curve_table, write_curve_csv

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"
COLUMNS = {  # each table dvc.yaml draws -> the columns its writer writes
    "outputs/pretrain/loss.csv": LOSS_COLUMNS,
    "outputs/pretrain/monitor.csv": MONITOR_COLUMNS,
    "plots/probe/table.csv": TABLE_COLUMNS,
    "plots/probe/selective.csv": CURVE_COLUMNS,
    "plots/probe/confusion.csv": CONFUSION_COLUMNS,
    "plots/probe/per_class.csv": PER_CLASS_COLUMNS,
    "plots/probe/roc.csv": ROC_COLUMNS,
    "plots/evaluate/label_efficiency.csv": EFFICIENCY_COLUMNS,
}
PNG = b"\x89PNG\r\n\x1a\n"  # DVC passes image plots through as bytes


def _pipeline() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _path(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _plot_definitions() -> dict[str, dict]:
    return {_path(entry): (None if isinstance(entry, str) else next(iter(entry.values()))) or {}
            for entry in _pipeline()["plots"]}


def test_metrics_are_json_files_only():
    """`dvc metrics show` parses every file under `metrics:`; a CSV, a PNG or a folder there fails it."""
    declared = {name: [_path(e) for e in stage.get("metrics", [])] for name, stage in _pipeline()["stages"].items()}
    assert all(path.endswith(".json") for paths in declared.values() for path in paths), declared
    assert "metrics/probe.json" in declared["probe"] and "metrics/pretrain.json" in declared["pretrain"]


def test_every_plot_is_inside_a_cached_stage_output():
    """Plots come from stage outputs DVC caches, so `dvc push --run-cache` and `dvc plots diff` have them."""
    cached = [_path(entry) for stage in _pipeline()["stages"].values()
              for entry in stage.get("outs", []) + stage.get("metrics", [])
              if isinstance(entry, str) or next(iter(entry.values())).get("cache", True)]
    for path in _plot_definitions():
        assert any(path == out or path.startswith(out + "/") for out in cached), f"{path}: not a cached stage output"


def test_plot_axes_are_columns_the_stages_write():
    tables = {path: props for path, props in _plot_definitions().items() if path.endswith(".csv")}
    assert set(tables) == set(COLUMNS)
    for path, props in tables.items():
        ys = props["y"] if isinstance(props["y"], list) else [props["y"]]
        assert props["x"] in COLUMNS[path] and set(ys) <= set(COLUMNS[path]), (path, props)
    template = json.loads((REPO / ".dvc/plots" / f"{tables['plots/evaluate/label_efficiency.csv']['template']}.json")
                          .read_text())
    assert template["encoding"]["color"]["field"] in EFFICIENCY_COLUMNS  # a line per method


def test_efficiency_table_has_a_row_per_method_that_ran_in_method_order():
    cells = [{"method": m, "fraction": f, "labels": int(1000 * f), "test_acc": acc}
             for m, acc in (("ddae_knn", 0.5), ("ddae_probe", 0.7)) for f in (1.0, 0.01)]
    assert efficiency_table(cells) == [["ddae_probe", "1%", 10, "0.7000"], ["ddae_probe", "100%", 1000, "0.7000"],
                                       ["ddae_knn", "1%", 10, "0.5000"], ["ddae_knn", "100%", 1000, "0.5000"]]


def _project(root: Path) -> Path:
    """dvc.yaml, params and the plot templates in a fresh git repository, with no outputs yet."""
    root.mkdir()
    for item in ("dvc.yaml", "params.yaml", "profiles", ".dvc"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, root / item, ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
        else:
            shutil.copy2(source, root / item)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_dvc_draws_the_tables_the_writers_write(tmp_path):
    """Every declared plot loads with DVC's own reader, and label efficiency draws whichever methods ran."""
    root = _project(tmp_path / "project")
    history = [{"step": s, "epoch": s / 50, "loss": 1.0 / s, "lr": 1e-3, "images_per_s": 99.0} for s in (10, 20, 30)]
    save_loss_table(history, root / "outputs/pretrain/loss.csv")
    points = [{"step": s, "linear_val_acc": a, "knn_val_acc": a - 0.1, "tap_index": 0.0}
              for s, a in ((10, 0.7), (20, 0.8), (30, 0.75))]
    save_monitor_table(points, 20, ["mid.res1"], root / "outputs/pretrain/monitor.csv")
    candidates = [Candidate(Readout(("mid.res1",), 11.0, pool, 0), {}) for pool in (1, 2)]
    rows = {c.readout.label: {"phase": "full", "l2": 0.001, "train_acc": 0.9, "val_acc": 0.8 + 0.01 * i}
            for i, c in enumerate(candidates)}
    write_table(root / "plots/probe/table.csv", rows, {}, candidates)
    rng = np.random.default_rng(0)
    write_curve_csv(root / "plots/probe/selective.csv",
                    curve_table(selective_curve(rng.uniform(size=200), rng.uniform(size=200) < 0.7)))
    write_csv_atomic(root / "plots/probe/confusion.csv", CONFUSION_COLUMNS,
                     [("cat", "cat"), ("cat", "dog"), ("dog", "dog")])
    write_per_class(root / "plots/probe/per_class.csv", {"cat": {"images": 2, "recall": 0.5},  # no test bird:
                                                         "dog": {"images": 1, "recall": 1.0},  # recall blank
                                                         "bird": {"images": 0, "recall": None}})
    anomalous = np.array([False, False, True, True, False])
    save_roc_table(*roc_curve(np.array([0.1, 0.4, 0.35, 0.8, 0.2]), anomalous), root / "plots/probe/roc.csv")
    ran = [{"method": m, "fraction": f, "labels": int(600 * f), "test_acc": 0.6}  # no raw pixels; fine-tuned
           for m in ("ddae_probe", "ddae_knn", "ddae_finetune") for f in (0.01, 0.1, 1.0)]
    write_csv_atomic(root / "plots/evaluate/label_efficiency.csv", EFFICIENCY_COLUMNS, efficiency_table(ran))
    for png in ("outputs/pretrain/loss.png", "outputs/pretrain/monitor.png", "outputs/pretrain/samples.png", "plots/probe/heatmap_pool1.png",
                "plots/probe/selective.png", "plots/probe/confusion.png", "plots/evaluate/label_efficiency.png"):
        write_bytes_atomic(root / png, PNG)

    shown = subprocess.run([str(DVC), "plots", "show", "--json", "-o", str(tmp_path / "out")], cwd=root,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    result = json.loads(shown.stdout)
    assert "errors" not in result, result["errors"]
    drawn = {name: items[0]["content"]["data"]["values"] for name, items in result["data"].items()
             if items[0]["type"] == "vega"}
    assert {name: len(points) for name, points in drawn.items()} == {
        "outputs/pretrain/loss.csv": 3, "outputs/pretrain/monitor.csv": 6, "plots/probe/table.csv": 2, "plots/probe/selective.csv": 20,
        "plots/probe/confusion.csv": 3, "plots/probe/per_class.csv": 3, "plots/probe/roc.csv": 6,
        "plots/evaluate/label_efficiency.csv": 9}
    assert [(p["false_alarm"], p["recall"]) for p in drawn["plots/probe/roc.csv"]][-1] == ("1", "1")
    assert [p["loss"] for p in drawn["outputs/pretrain/loss.csv"]] == ["0.1", "0.05", "0.0333333"]
    assert {p["method"] for p in drawn["plots/evaluate/label_efficiency.csv"]} == {"ddae_probe", "ddae_knn",
                                                                                   "ddae_finetune"}
    assert [(p["class"], p["recall"]) for p in drawn["plots/probe/per_class.csv"]] == [
        ("cat", "0.5000"), ("dog", "1.0000"), ("bird", "")]
    confusion = result["data"]["plots/probe/confusion.csv"][0]["content"]["spec"]["encoding"]
    assert (confusion["x"]["field"], confusion["y"]["field"]) == ("predicted", "actual")  # rows: the true class
    images = {name for name, items in result["data"].items() if items[0]["type"] == "image"}
    assert {"plots/probe/heatmap_pool1.png", "plots/probe/selective.png", "plots/probe/confusion.png"} <= images
