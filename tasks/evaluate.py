"""The evaluate stage: label efficiency and representation diagnostics, from the cached features.

Label efficiency: the probe's chosen readout and raw pixels, probed on class-balanced fractions of
the train labels (L2 chosen on validation, test once; the 100% cells are the probe stage's own),
beside the fine-tune stage's cells when it ran. Diagnostics, per tap and noise level: kNN accuracy
beside the linear one, and alignment/uniformity of two augmented views of a few train images.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from ddae_core.atomic import atomic_directory, write_bytes_atomic, write_csv_atomic, write_json_atomic
from ddae_core.checkpoint import load_network, network_hash
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared, normal_classes
from ddae_core.devices import stage_device
from ddae_core.features import extract_all
from ddae_core.heads.diagnostics import alignment, knn_accuracy, uniformity
from ddae_core.heads.probe import select_probe
from ddae_core.readout import Readout
from ddae_core.sampling import capped_subset, fraction_label, label_subsets, nested_subset, too_few_labels
from tasks.services.outputs.feature_store import FeatureIndex, load_selection, read_readout
from tasks.services.outputs.paths import Paths
from tasks.services.outputs.plots import save_label_efficiency, save_not_drawn
from tasks.services.runner.stage_main import StageError, stage_main
from tasks.services.tracking.runs import stage_run

log = logging.getLogger("ddae")

METHODS = {  # column -> what the table calls it
    "ddae_probe": "DDAE, linear probe",
    "ddae_knn": "DDAE, kNN",
    "raw_pixels": "raw pixels, linear probe",
    "ddae_finetune": "DDAE, fine-tuned",
    "scratch_finetune": "same network from scratch",
}


def probe_accuracy(x: dict[str, np.ndarray], y: dict[str, np.ndarray], rows: np.ndarray, num_classes: int,
                   config: PipelineConfig, name: str = "features",
                   device: str | torch.device = "cpu") -> dict[str, float | bool]:
    """Probe fitted on ``rows`` of train (on ``device``), L2 chosen on validation along the probe stage's L2
    path (fewer labels move the optimum to larger L2; the path extends to it), scored once on test.

    Returns val_acc, test_acc, the chosen l2 and l2_at_edge (warned, under ``name``, when True).
    """
    _key, l2, probe, table = select_probe({name: (x["train"][rows], x["val"])}, y["train"][rows], y["val"],
                                          num_classes=num_classes, l2_grid=config.probe.l2_grid,
                                          max_iter=config.probe.max_iter, l2_extend=config.probe.l2_extend,
                                          l2_bounds=config.probe.l2_bounds, progress=False, device=device)
    chosen = next(r for r in table if r["l2"] == l2)
    return {"val_acc": chosen["val_acc"], "test_acc": float(probe.accuracy(x["test"], y["test"])), "l2": l2,
            "l2_at_edge": chosen["l2_at_edge"]}


def label_efficiency(config: PipelineConfig, paths: Paths, checkpoint: str,
                     device: str | torch.device = "cpu") -> tuple[list[dict], dict[float, int]]:
    """One row per (method, fraction): labels used, validation and test accuracy; and the fractions
    skipped for holding fewer labels than classes (``too_few_labels``), with their label counts.

    Fractions below 100% use the plain (copy 0) features of their rows; the 100% cells are the probe
    stage's fits (with the extract stage's augmented copies, when it made any).
    """
    selection = load_selection(paths)
    probe_path = paths.metrics / "probe.json"
    if not probe_path.is_file():  # like selection.json: one line from stage_main, not a traceback
        raise StageError(f"{probe_path} not found: run the probe stage first")
    probe_metrics = json.loads(probe_path.read_text())
    x, y = {}, {}
    for split in ("train", "val", "test"):
        x[split], y[split] = read_readout(paths.features, selection.readout, split, checkpoint)
    num_classes = len(selection.class_names)
    cfg = config.label_efficiency
    subsets = label_subsets(y["train"], cfg.fractions, cfg.seed)
    skipped = too_few_labels(cfg.fractions, y["train"])  # left out of subsets, with a warning
    pixels = None
    if cfg.raw_pixels:
        _manifest, splits = load_prepared(paths.prepared)
        pixels = {s: np.asarray(splits[s].images, dtype=np.float32).reshape(len(splits[s]), -1) / 255.0
                  for s in ("train", "val", "test")}
    queries = knn_queries(y["test"], config)
    rows = []
    for fraction, subset in sorted(subsets.items()):
        cell = {"fraction": fraction, "labels": int(len(subset)), "test_images": int(len(y["test"]))}
        if len(subset) == len(y["train"]):  # all labels: exactly what the probe stage fitted
            rows.append({**cell, "method": "ddae_probe", "val_acc": selection.val_acc,
                         "test_acc": selection.test_acc})
        else:
            rows.append({**cell, "method": "ddae_probe", **probe_accuracy(x, y, subset, num_classes, config,
                                                                          selection.readout.label, device)})
        if pixels is not None:
            if len(subset) == len(y["train"]) and "raw_pixels_test_acc" in probe_metrics:
                rows.append({**cell, "method": "raw_pixels", "val_acc": probe_metrics["raw_pixels_val_acc"],
                             "test_acc": probe_metrics["raw_pixels_test_acc"]})
            else:
                rows.append({**cell, "method": "raw_pixels", **probe_accuracy(pixels, y, subset, num_classes, config,
                                                                              "pixels", device)})
        rows.append({**cell, "method": "ddae_knn", "test_images": int(len(queries)), "test_acc": knn_accuracy(
            x["train"][subset], y["train"][subset], x["test"][queries], y["test"][queries], num_classes=num_classes,
            k=config.diagnostics.knn_k, temperature=config.diagnostics.knn_temperature)})
        log.info("label efficiency %s: %s", fraction_label(fraction), rows[-3:])
    finetune_path = paths.metrics / "finetune.json"
    finetune = json.loads(finetune_path.read_text()) if finetune_path.is_file() else {"enabled": False}
    for cell in finetune.get("cells", []):
        rows.append({key: cell[key] for key in ("fraction", "labels", "val_acc", "test_acc")}
                    | {"method": cell["model"], "test_images": finetune["test_images"]})
    return rows, skipped


def knn_queries(test_labels: np.ndarray, config: PipelineConfig) -> np.ndarray:
    """The class-balanced test rows the kNN probe classifies (all when ``knn_queries`` is 0)."""
    return capped_subset(test_labels, config.diagnostics.knn_queries, config.diagnostics.seed)


def diagnostics(config: PipelineConfig, paths: Paths, index: FeatureIndex, checkpoint: str,
                device: str | torch.device = "cpu") -> list[dict]:
    """Per (tap, level) at ``diagnostics.pool``: kNN test accuracy, alignment and uniformity."""
    cfg = config.diagnostics
    keys = [r for r in index.readouts if r.pool == cfg.pool]
    if not keys:
        raise StageError(f"params.yaml: diagnostics.pool: {cfg.pool} is not in extract.pools "
                         f"({sorted({r.pool for r in index.readouts})})")
    num_classes = len(index.class_names)
    views = two_views(config, paths, index, keys, device) if cfg.pairs else {}
    rows = []
    for key in keys:
        train, y_train = read_readout(paths.features, key, "train", checkpoint)
        test, y_test = read_readout(paths.features, key, "test", checkpoint)
        queries = knn_queries(y_test, config)
        test, y_test = test[queries], y_test[queries]
        row = {"tap": key.tap_name, "level": key.level, "pool": key.pool,
               "knn_test_acc": knn_accuracy(train, y_train, test, y_test, num_classes=num_classes,
                                            k=cfg.knn_k, temperature=cfg.knn_temperature)}
        if views:
            first, second = views[1][key.feature_keys[0]], views[2][key.feature_keys[0]]
            row["alignment"] = alignment(first, second)
            row["uniformity"] = (uniformity(first) + uniformity(second)) / 2  # per view, as Wang & Isola
        rows.append(row)
        log.info("diagnostics %s: %s", key.label, row)
    return rows


def two_views(config: PipelineConfig, paths: Paths, index: FeatureIndex, keys: list[Readout],
              device: str | torch.device = "cpu") -> dict[int, dict]:
    """Features of augmented copies 1 and 2 (flip/crop + their own noise) of a few train images, the
    network on ``device``."""
    _manifest, splits = load_prepared(paths.prepared)
    train = splits["train"]
    rows = nested_subset(train.labels, min(config.diagnostics.pairs, len(train)), config.diagnostics.seed)
    denoiser = load_network(paths.network, device=device).eval()
    taps = list(dict.fromkeys(k.taps[0] for k in keys))
    levels = sorted({k.level for k in keys})
    return {copy: extract_all(denoiser, np.asarray(train.images[rows]), np.asarray(train.sample_ids)[rows],
                              taps=taps, levels=levels, pools=[config.diagnostics.pool], seed=index.seed,
                              batch_size=config.extract.batch_size, copy=copy, progress=False, device=device,
                              precision=index.precision)
            for copy in (1, 2)}


EFFICIENCY_COLUMNS = ("method", "fraction", "labels", "test_acc")


def efficiency_table(rows: list[dict]) -> list[list]:
    """One line per (method, fraction) that ran, in ``METHODS`` order: label_efficiency.csv.

    Long rather than one column per method, so the methods that did not run (fine-tuning off, no raw
    pixels) leave no empty column: dvc.yaml draws one line per ``method`` (template
    .dvc/plots/label_efficiency.json) whichever ran, and ``dvc plots diff`` compares experiments.
    """
    order = list(METHODS)
    return [[r["method"], fraction_label(r["fraction"]), r["labels"], f"{r['test_acc']:.4f}"]
            for r in sorted(rows, key=lambda r: (order.index(r["method"]), r["fraction"]))]


def markdown_table(rows: list[dict], skipped: dict[float, int] | None = None) -> str:
    """The headline table: test accuracy (%) per method and label fraction; then the fractions skipped."""
    fractions = sorted({r["fraction"] for r in rows})
    lines = ["| test accuracy | " + " | ".join(f"{fraction_label(f)} labels" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for method, title in METHODS.items():
        cells = {r["fraction"]: r for r in rows if r["method"] == method}
        if cells:
            lines.append(f"| {title} | " + " | ".join(
                f"{100 * cells[f]['test_acc']:.2f}%" if f in cells else "" for f in fractions) + " |")
    sizes = sorted({(METHODS[r["method"]], r["test_images"]) for r in rows if "test_images" in r})
    lines += ["", "Test images scored: " + "; ".join(f"{title} {count}" for title, count in sizes) + "."]
    if skipped:
        lines += ["", "Skipped, under one label per class: " + "; ".join(
            f"{fraction_label(f)} ({n} labels)" for f, n in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def summary_metrics(efficiency: list[dict], study: list[dict], skipped: dict[float, int]) -> dict:
    """``{"label_efficiency": {method: {"1%": test_acc}}, "diagnostics": {"tap@level": {...}}}`` for DVC,
    and the fractions skipped (fewer labels than classes) with the labels they would have had."""
    table: dict[str, dict[str, float]] = {}
    for row in efficiency:
        table.setdefault(row["method"], {})[fraction_label(row["fraction"])] = row["test_acc"]
    labels = {fraction_label(r["fraction"]): r["labels"] for r in efficiency}
    per_tap = {Readout((r["tap"],), r["level"], r["pool"], seed=0).label:  # the seed is not part of the name
               {k: v for k, v in r.items() if k not in ("tap", "level", "pool")} for r in study}
    return {"label_efficiency": table, "labels": labels, "diagnostics": per_tap,
            "skipped_fractions": {fraction_label(f): n for f, n in skipped.items()}}


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Label efficiency and diagnostics; returns the metrics written to metrics/evaluate.json."""
    device = stage_device("evaluate", log)
    if normal_classes(paths.prepared):
        return skipped_for_anomaly(paths)
    index = FeatureIndex.load(paths.features)
    checkpoint = network_hash(paths.network)
    efficiency, skipped = label_efficiency(config, paths, checkpoint, device)
    study = diagnostics(config, paths, index, checkpoint, device)
    with atomic_directory(paths.plots / "evaluate") as plots:
        write_csv_atomic(plots / "label_efficiency.csv", EFFICIENCY_COLUMNS, efficiency_table(efficiency))
        write_csv_atomic(plots / "diagnostics.csv", list(study[0]), [list(r.values()) for r in study])
        write_bytes_atomic(plots / "label_efficiency.md", markdown_table(efficiency, skipped).encode())
        save_label_efficiency(efficiency, METHODS, plots / "label_efficiency.png")
    write_json_atomic(paths.metrics / "evaluate.json", summary_metrics(efficiency, study, skipped))
    with stage_run(paths.root, "evaluate", {"ddae.network_hash": checkpoint,
                                            "ddae.data_checksum": index.data_checksum}):
        import mlflow

        mlflow.log_metrics({f"{r['method']}.{fraction_label(r['fraction']).rstrip('%')}pct.test_acc": r["test_acc"]
                            for r in efficiency})
        mlflow.log_metrics({f"knn.{r['tap']}.level{r['level']:g}.test_acc": r["knn_test_acc"] for r in study})
        for name in ("label_efficiency.csv", "label_efficiency.md", "label_efficiency.png", "diagnostics.csv"):
            mlflow.log_artifact(str(paths.plots / "evaluate" / name))
    return {"label_efficiency": markdown_table(efficiency, skipped), "diagnostics": len(study)}


ANOMALY_SKIP = ("anomaly mode (data.normal_classes): train holds the normal classes only, so there is no "
                "classifier whose label efficiency to measure; metrics/probe.json['anomaly'] has the detector's scores")


def skipped_for_anomaly(paths: Paths) -> dict:
    """Anomaly mode: the stage's outputs say why nothing was measured (an empty table, a note, the reason)."""
    with atomic_directory(paths.plots / "evaluate") as plots:
        write_csv_atomic(plots / "label_efficiency.csv", EFFICIENCY_COLUMNS, [])
        write_bytes_atomic(plots / "label_efficiency.md", f"Label efficiency: {ANOMALY_SKIP}.\n".encode())
        save_not_drawn(plots / "label_efficiency.png", "Label efficiency", ANOMALY_SKIP)
    write_json_atomic(paths.metrics / "evaluate.json", {"skipped": ANOMALY_SKIP})
    log.info("evaluate: skipped, %s", ANOMALY_SKIP)
    return {"skipped": ANOMALY_SKIP}


if __name__ == "__main__":
    stage_main("evaluate", run)
