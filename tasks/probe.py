"""The probe stage: a linear probe per (tap, level, pool) and per configured tap concatenation.

Fit on train, choose (representation, L2) on validation, report test accuracy once. Raw pixels go
through the same probe code as the floor to beat.

Anomaly mode (the prepared data has ``normal_classes``, ``data.normal_classes``): no linear probe (one
class is nothing to separate); the novelty model of a fixed readout (``anomaly_readout``) fitted on the
normal train images, its threshold calibrated on normal val, AUROC on test (``heads.anomaly``), raw
pixels through the same code beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from ddae_core.atomic import atomic_directory, write_csv_atomic, write_json_atomic
from ddae_core.checkpoint import network_hash
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared, normal_classes
from ddae_core.devices import stage_device
from ddae_core.heads.anomaly import OneClassResult, one_class, roc_curve
from ddae_core.heads.metrics import balanced_accuracy, confusion_matrix, per_class
from ddae_core.heads.novelty import METHOD, NoveltyModel, false_alarm_rate, fit_novelty, novelty_cells
from ddae_core.heads.probe import LinearProbe, screen_and_select, select_probe
from ddae_core.readout import SELECTION_FILE, Readout, Selection
from tasks.services.outputs.feature_store import Candidate, FeatureIndex, load_candidates
from tasks.services.outputs.paths import Paths
from tasks.services.outputs.plots import ROC_COLUMNS, save_confusion, save_heatmap, save_roc_curves, save_roc_table
from tasks.services.outputs.selective import CURVE_COLUMNS, selective_report
from tasks.services.runner.stage_main import log, stage_main
from tasks.services.tracking.runs import stage_run


def probe_pixels(paths: Paths, config: PipelineConfig, num_classes: int,
                 device: str | torch.device = "cpu") -> dict:
    """The raw-pixel floor through the same probe code (fits on ``device``): pixels in [0, 1], flattened."""
    _manifest, splits = load_prepared(paths.prepared)
    as_x = {s: np.asarray(splits[s].images, dtype=np.float32).reshape(len(splits[s]), -1) / 255.0
            for s in ("train", "val", "test")}
    _key, l2, probe, table = select_probe(
        {"pixels": (as_x["train"], as_x["val"])}, splits["train"].labels, splits["val"].labels,
        num_classes=num_classes, l2_grid=config.probe.l2_grid, max_iter=config.probe.max_iter,
        l2_extend=config.probe.l2_extend, l2_bounds=config.probe.l2_bounds, progress=True, device=device,
    )
    chosen = next(r for r in table if r["l2"] == l2)
    return {"l2": l2, "l2_at_edge": chosen["l2_at_edge"], "val_acc": chosen["val_acc"],
            "test_acc": float(probe.accuracy(as_x["test"], splits["test"].labels))}


def probe_online(paths: Paths, config: PipelineConfig, index: FeatureIndex, readout: Readout,
                 num_classes: int, cached: dict, device: str | torch.device = "cpu") -> dict:
    """The official online protocol (``ddae_core.heads.probe_online``) on the readout the cached probe chose,
    the network on ``device``, reported beside the cached probe's own result: ``{"official_protocol": ...,
    "cached_probe": ...}``.

    Forward passes count network runs of one image at one noise level. The cached probe's: what the
    extract stage spends on this readout, train x (1 + extract.augment_copies) + val + test (one level;
    every tap and pool of a level comes from the same run). ``extract_forward_passes``: what the extract
    stage spent on its whole grid (the same times the number of levels extracted).
    """
    from ddae_core.checkpoint import load_network
    from ddae_core.heads.probe_online import online_probe

    _manifest, splits = load_prepared(paths.prepared)
    cfg = config.probe
    result = online_probe(
        load_network(paths.network, device=device), splits["train"], splits["val"], splits["test"],
        readout=readout, num_classes=num_classes, epochs=cfg.online_epochs, lr=cfg.online_lr,
        batch_size=cfg.online_batch_size, progress=True, device=device,
    )
    sizes = index.splits
    cached_passes = sizes["train"] * index.train_copies + sizes["val"] + sizes["test"]
    return {
        "readout": readout.label,
        "official_protocol": {
            "test_acc": result.test_acc, "val_acc": result.val_acc, "forward_passes": result.forward_passes,
            "wall_s": result.wall_s, "epochs": result.epochs, "batch_size": result.batch_size, "lr": result.lr,
            "processes": result.processes,
        },
        "cached_probe": {"test_acc": cached["test_acc"], "val_acc": cached["val_acc"],
                         "forward_passes": cached_passes},
        "extract_forward_passes": cached_passes * len({r.level for r in index.readouts}),
    }


def online_metrics(online: dict) -> dict[str, float]:
    """The comparison as flat MLflow metrics: ``online.official_protocol.test_acc``, ``online.cached_probe.test_acc``..."""
    return {f"online.{name}.{key}": float(value) for name in ("official_protocol", "cached_probe")
            for key, value in online[name].items()}


def select(config: PipelineConfig, index: FeatureIndex, candidates: list[Candidate],
           labels: dict[str, np.ndarray],
           device: str | torch.device = "cpu") -> tuple[Candidate, float, LinearProbe, list[dict]]:
    """Screen, refit the finalists and choose (candidate, L2) on validation (fits on ``device``); ties keep
    candidate order."""
    by_label = {c.readout.label: c for c in candidates}
    best_name, best_l2, best_probe, table = screen_and_select(
        {name: (c.features["train"], c.features["val"]) for name, c in by_label.items()},
        labels["train"], labels["val"], num_classes=len(index.class_names), l2_grid=config.probe.l2_grid,
        max_iter=config.probe.max_iter, l2_extend=config.probe.l2_extend, l2_bounds=config.probe.l2_bounds,
        screen_size=config.probe.screen_train,
        finalists=config.probe.finalists, seed=index.seed, progress=True, device=device,
    )
    return by_label[best_name], best_l2, best_probe, table


def novelty_model(config: PipelineConfig, index: FeatureIndex, best: Candidate,
                  labels: dict[str, np.ndarray]) -> tuple[NoveltyModel, dict]:
    """The chosen readout's novelty model (``ddae_core.heads.novelty``) and its metrics.

    Fitted on the train images (copy 0: not their augmented copies), the threshold calibrated on
    validation to ``predict.novelty_false_alarm``; the false-alarm rate measured on val and on test. A
    readout wider than ``heads.novelty.MAX_DIM`` is scored on its channel means (``cells``).
    """
    rows = index.splits["train"]  # the train features stack copy 0 first
    cells = novelty_cells(best.features["train"].shape[1], best.readout.pool)
    model = fit_novelty(best.features["train"][:rows], labels["train"][:rows], cells)
    val_scores = model.score(best.features["val"])
    model = model.calibrated(val_scores, config.predict.novelty_false_alarm)
    return model, {
        "method": METHOD, "threshold": model.threshold, "false_alarm": config.predict.novelty_false_alarm,
        "val_false_alarm": false_alarm_rate(val_scores, model.threshold),
        "test_false_alarm": false_alarm_rate(model.score(best.features["test"]), model.threshold),
        "chosen_on": "val", "val_rows": int(len(val_scores)), "train_rows": int(rows), "dim": model.dim,
        "cells": model.cells, "shrinkage": model.shrinkage,
    }


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Probe every candidate, select on validation, evaluate the winner on test once.

    Returns:
        The metrics dict written to metrics/probe.json.
    """
    device = stage_device("probe", log)
    normal = normal_classes(paths.prepared)
    if normal:
        return run_anomaly(config, paths, normal)
    index = FeatureIndex.load(paths.features)
    checkpoint = network_hash(paths.network)
    candidates, labels = load_candidates(paths.features, index, config.probe.concat, checkpoint)
    best, best_l2, best_probe, table = select(config, index, candidates, labels, device)
    readout = best.readout
    test_predictions = best_probe.predict(best.features["test"])
    test_acc = float(np.mean(test_predictions == labels["test"]))
    confusion = confusion_matrix(labels["test"], test_predictions, len(index.class_names))
    chosen = next(r for r in table if r["key"] == readout.label and r["l2"] == best_l2 and r["phase"] == "full")
    metrics = {
        "test_acc": test_acc,
        "test_balanced_acc": balanced_accuracy(confusion),  # mean recall over classes: uneven data's score
        "val_acc": chosen["val_acc"],
        "best": {"name": readout.label, "taps": list(readout.taps), "level": readout.level, "pool": readout.pool,
                 "l2": best_l2, "l2_at_edge": chosen["l2_at_edge"]},  # True: selection warned, see probe.l2_extend
        "level_kind": index.level_kind,
        "candidates": len(candidates),
        "train_size": int(len(labels["train"])),
    }
    novelty, metrics["novelty"] = novelty_model(config, index, best, labels)
    num_classes = len(index.class_names)
    if config.probe.online:  # the official protocol on the same readout (slow; off by default)
        metrics["online"] = probe_online(paths, config, index, readout, num_classes, metrics, device)
    if config.probe.raw_pixels:
        pixels = probe_pixels(paths, config, num_classes, device)
        metrics["raw_pixels_test_acc"] = pixels["test_acc"]
        metrics["raw_pixels_val_acc"] = pixels["val_acc"]
        metrics["raw_pixels_l2"], metrics["raw_pixels_l2_at_edge"] = pixels["l2"], pixels["l2_at_edge"]
    selection = Selection(readout=readout, class_names=index.class_names, level_kind=index.level_kind,
                          test_acc=test_acc, network_hash=checkpoint, data_checksum=index.data_checksum,
                          l2=best_l2, val_acc=metrics["val_acc"])
    heatmaps = publish(config, paths, selection, best_probe, novelty, best, candidates, table, labels, metrics,
                       (test_predictions, confusion))
    write_json_atomic(paths.metrics / "probe.json", metrics)
    track(config, paths, selection, metrics, heatmaps)
    return metrics


def publish(config: PipelineConfig, paths: Paths, selection: Selection, probe: LinearProbe, novelty: NoveltyModel,
            best: Candidate, candidates: list[Candidate], table: list[dict], labels: dict[str, np.ndarray],
            metrics: dict, test_scores: tuple[np.ndarray, np.ndarray]) -> list[str]:
    """``outputs/probe`` (probe weights, novelty model, selection.json) and ``plots/probe``; sets
    ``metrics["selective"]``.

    ``test_scores``: the chosen probe's test predictions and their confusion matrix (confusion.csv holds
    one ``actual,predicted`` row per test image for ``dvc plots``' confusion template, confusion.png the matrix,
    per_class.csv each class's test images and recall).

    Returns the names of the plot files written, for MLflow.
    """
    with atomic_directory(paths.probe) as staging:
        save_file({k: np.ascontiguousarray(v) for k, v in probe.state_dict().items()},
                  str(staging / "probe.safetensors"))
        novelty.save(staging)
        write_json_atomic(staging / SELECTION_FILE, selection.to_json())
    per_candidate = best_rows(table)
    with atomic_directory(paths.plots / "probe") as plots:
        write_table(plots / "table.csv", per_candidate, finalist_rows(table), candidates)
        heatmaps = [p.name for p in write_heatmaps(plots, per_candidate, candidates)]
        metrics["selective"], selective_files = selective_report(plots, probe, best.features, labels,
                                                                 config.predict.target_accuracy)
        heatmaps += [p.name for p in selective_files]  # logged to MLflow with the heatmaps
        predictions, confusion = test_scores
        names = selection.class_names
        write_csv_atomic(plots / "confusion.csv", CONFUSION_COLUMNS,
                         ((names[a], names[b]) for a, b in zip(labels["test"], predictions)))
        save_confusion(confusion, names, plots / "confusion.png",
                       f"Test confusion: {100 * metrics['test_acc']:.1f}% accuracy, "
                       f"{100 * metrics['test_balanced_acc']:.1f}% balanced")
        write_per_class(plots / "per_class.csv", per_class(confusion, names))  # a table, not 2K metric columns
        heatmaps += ["confusion.png", "confusion.csv", "per_class.csv"]
        write_empty_tables(plots, {"roc.csv": ROC_COLUMNS})
    return heatmaps


def write_empty_tables(directory: Path, tables: dict[str, tuple[str, ...]]) -> None:
    """The other mode's tables that dvc.yaml declares, header only: `dvc plots show` draws nothing for them
    instead of reporting a missing file."""
    for name, columns in tables.items():
        write_csv_atomic(directory / name, columns, [])


def track(config: PipelineConfig, paths: Paths, selection: Selection, metrics: dict, heatmaps: list[str]) -> None:
    """The stage's MLflow run: the choice, its float metrics, the table and the plots."""
    with stage_run(paths.root, "probe", {"ddae.network_hash": selection.network_hash,
                                         "ddae.data_checksum": selection.data_checksum}):
        import mlflow

        mlflow.log_params({"best": selection.readout.label, "l2": selection.l2,
                           "l2_grid": str(list(config.probe.l2_grid)), "l2_at_edge": metrics["best"]["l2_at_edge"]})
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        if "online" in metrics:
            mlflow.log_metrics(online_metrics(metrics["online"]))
        mlflow.log_metrics({f"novelty.{k}": float(v) for k, v in metrics["novelty"].items()
                            if k in ("threshold", "val_false_alarm", "test_false_alarm")})
        mlflow.log_artifact(str(paths.plots / "probe" / "table.csv"))
        for heatmap in heatmaps:
            mlflow.log_artifact(str(paths.plots / "probe" / heatmap))


ANOMALY_READOUT_RULE = "fixed: the first extract tap at the first level, globally pooled (no anomaly is looked at)"
ANOMALY_CLASSES = ("normal", "anomaly")  # confusion.png in anomaly mode: rows the truth, columns flagged novel
MAX_PIXEL_DIM = 4096  # raw pixels beyond this many values per image: no pixel baseline (a D x D precision)


def anomaly_readout(candidates: list[Candidate]) -> Candidate:
    """The readout anomaly mode scores: fixed in advance, since without labelled anomalies no choice by
    a score is honest; the first single-tap candidate (extraction order) with pool 1, else the first."""
    singles = [c for c in candidates if len(c.readout.taps) == 1]
    return next((c for c in singles if c.readout.pool == 1), singles[0])


def pixels_one_class(paths: Paths, config: PipelineConfig, anomalous: np.ndarray) -> OneClassResult | str:
    """Raw pixels in [0, 1], flattened, through the same one-class scoring; why not, when too large."""
    _manifest, splits = load_prepared(paths.prepared)
    dim = int(np.prod(splits["train"].images.shape[1:]))
    if dim > MAX_PIXEL_DIM:
        return f"skipped: {dim} pixel values per image (over {MAX_PIXEL_DIM})"
    as_x = {s: np.asarray(splits[s].images, dtype=np.float32).reshape(len(splits[s]), -1) / 255.0
            for s in ("train", "val", "test")}
    return one_class(as_x["train"], splits["train"].labels, as_x["val"], as_x["test"], anomalous,
                     false_alarm=config.predict.novelty_false_alarm, recall=config.probe.anomaly_recall)


def run_anomaly(config: PipelineConfig, paths: Paths, normal: list[str]) -> dict:
    """Anomaly mode: the fixed readout's novelty model (fitted on normal train copy 0, calibrated on
    normal val), AUROC and false alarm at ``probe.anomaly_recall`` on test (normal = negative, every
    other class = positive); raw pixels beside it. Writes what the classifier path writes, less the
    linear probe: ``outputs/probe`` (selection.json kind anomaly, novelty.safetensors), metrics/probe.json,
    ``plots/probe/roc.csv`` and ``roc.png``, and ``confusion.png`` (normal/anomaly against flagged)."""
    index = FeatureIndex.load(paths.features)
    checkpoint = network_hash(paths.network)
    candidates, labels = load_candidates(paths.features, index, (), checkpoint)
    best = anomaly_readout(candidates)
    normal_ids = [index.class_names.index(name) for name in normal]
    anomalous = ~np.isin(labels["test"], normal_ids)
    rows = index.splits["train"]  # the train features stack copy 0 first
    result = one_class(best.features["train"][:rows], labels["train"][:rows], best.features["val"],
                       best.features["test"], anomalous, false_alarm=config.predict.novelty_false_alarm,
                       recall=config.probe.anomaly_recall)
    readout, report = best.readout, result.report
    pixels = pixels_one_class(paths, config, anomalous) if config.probe.raw_pixels else "skipped: probe.raw_pixels false"
    metrics = {
        "mode": "anomaly",
        "test_auroc": report["test_auroc"],
        "best": {"name": readout.label, "taps": list(readout.taps), "level": readout.level, "pool": readout.pool},
        "level_kind": index.level_kind,
        "candidates": 1,
        "train_size": int(rows),
        "anomaly": {"normal_classes": normal, "readout_rule": ANOMALY_READOUT_RULE,
                    "test_normal": int((~anomalous).sum()), "test_anomalous": int(anomalous.sum()), **report},
        "novelty": {"method": METHOD, "threshold": report["threshold"], "false_alarm": report["false_alarm"],
                    "val_false_alarm": report["val_false_alarm"], "test_false_alarm": report["test_false_alarm"],
                    "chosen_on": "val", "val_rows": int(len(best.features["val"])), "train_rows": int(rows),
                    "dim": report["dim"], "shrinkage": report["shrinkage"]},
        "linear_probe": "skipped: anomaly mode (data.normal_classes); a probe over the normal classes alone "
                        "says nothing of anomalies",
    }
    if isinstance(pixels, OneClassResult):
        metrics["raw_pixels_test_auroc"] = pixels.report["test_auroc"]
        metrics["anomaly"]["raw_pixels"] = pixels.report
    else:
        metrics["anomaly"]["raw_pixels"] = pixels
    selection = Selection(readout=readout, class_names=tuple(normal), level_kind=index.level_kind, test_acc=None,
                          network_hash=checkpoint, data_checksum=index.data_checksum, kind="anomaly",
                          test_auroc=report["test_auroc"])
    with atomic_directory(paths.probe) as staging:
        result.model.save(staging)
        write_json_atomic(staging / SELECTION_FILE, selection.to_json())
    with atomic_directory(paths.plots / "probe") as plots:
        false_alarm, recall, thresholds = roc_curve(result.test_scores, anomalous)
        save_roc_table(false_alarm, recall, thresholds, plots / "roc.csv")
        write_empty_tables(plots, {"table.csv": TABLE_COLUMNS, "selective.csv": CURVE_COLUMNS,
                                   "confusion.csv": CONFUSION_COLUMNS, "per_class.csv": PER_CLASS_COLUMNS})
        curves = {readout.label: (false_alarm, recall, report["test_auroc"])}
        if isinstance(pixels, OneClassResult):
            curves["raw pixels"] = (*roc_curve(pixels.test_scores, anomalous)[:2], pixels.report["test_auroc"])
        save_roc_curves(curves, plots / "roc.png", f"Anomalies on test (normal: {', '.join(normal)})",
                        operating=(report["test_false_alarm"], report["test_recall"]))
        flagged = result.model.is_novel(result.test_scores)  # the served threshold's decisions, as the card shows
        save_confusion(confusion_matrix(anomalous.astype(int), flagged.astype(int), 2), ANOMALY_CLASSES,
                       plots / "confusion.png", f"Test at the served threshold: {100 * report['test_recall']:.1f}% "
                       f"of anomalies flagged, {100 * report['test_false_alarm']:.1f}% false alarms")
    write_json_atomic(paths.metrics / "probe.json", metrics)
    with stage_run(paths.root, "probe", {"ddae.network_hash": checkpoint, "ddae.data_checksum": index.data_checksum,
                                         "ddae.mode": "anomaly"}):
        import mlflow

        mlflow.log_params({"best": readout.label, "normal_classes": ",".join(normal)[:500]})
        mlflow.log_metrics({f"anomaly.{k}": float(v) for k, v in report.items() if isinstance(v, float)})
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        for name in ("roc.csv", "roc.png"):
            mlflow.log_artifact(str(paths.plots / "probe" / name))
    log.info("probe (anomaly mode): %s, test AUROC %.4f%s", readout.label, report["test_auroc"],
             f" (raw pixels {metrics['raw_pixels_test_auroc']:.4f})" if "raw_pixels_test_auroc" in metrics else "")
    return metrics


def best_rows(table: list[dict]) -> dict[str, dict]:
    """For each candidate, its best-on-validation row of the first phase it ran in (screening when
    there was one, so every candidate is compared on the same footing); first row wins ties."""
    first_phase = table[0]["phase"]
    best: dict[str, dict] = {}
    for row in table:
        name = row["key"]
        if row["phase"] == first_phase and (name not in best or row["val_acc"] > best[name]["val_acc"]):
            best[name] = row
    return best


def finalist_rows(table: list[dict]) -> dict[str, dict]:
    """For each candidate refitted on the full train split, its best-on-validation row."""
    return best_rows([row for row in table if row["phase"] == "full"]) if table[0]["phase"] == "screen" else {}


CONFUSION_COLUMNS = ("actual", "predicted")  # confusion.csv: one row per test image, class names
PER_CLASS_COLUMNS = ("class", "test_images", "recall")  # per_class.csv: the chosen probe on test, per class
TABLE_COLUMNS = ("candidate", "taps", "level", "pool", "phase", "l2", "train_acc", "val_acc", "full_val_acc")


def write_table(path: Path, rows: dict[str, dict], finalists: dict[str, dict], candidates: list[Candidate]) -> None:
    """One CSV row per candidate (for ``dvc plots`` and people); ``full_val_acc`` for finalists."""
    readouts = {c.readout.label: c.readout for c in candidates}
    lines = []
    for name, row in rows.items():
        readout = readouts[name]
        full = finalists.get(name)
        lines.append([name, readout.tap_name, f"{readout.level:g}", readout.pool, row["phase"], row["l2"],
                      f"{row['train_acc']:.4f}", f"{row['val_acc']:.4f}", f"{full['val_acc']:.4f}" if full else ""])
    write_csv_atomic(path, TABLE_COLUMNS, lines)


def write_per_class(path: Path, classes: dict[str, dict]) -> None:
    """One CSV row per class, in class order: its test images and recall (blank when test holds none)."""
    write_csv_atomic(path, PER_CLASS_COLUMNS, ([name, row["images"], "" if row["recall"] is None else
                                                f"{row['recall']:.4f}"] for name, row in classes.items()))


def write_heatmaps(directory: Path, rows: dict[str, dict], candidates: list[Candidate]) -> list[Path]:
    """One heatmap (taps x levels, validation accuracy) per pooling grid."""
    readouts = [c.readout for c in candidates]
    written = []
    for pool in sorted({r.pool for r in readouts}):
        cells = {(r.tap_name, f"{r.level:g}"): rows[r.label]["val_acc"] for r in readouts if r.pool == pool}
        tap_rows = list(dict.fromkeys(r for r, _ in cells))
        level_cols = list(dict.fromkeys(col for _, col in cells))
        path = directory / f"heatmap_pool{pool}.png"
        save_heatmap(cells, tap_rows, level_cols, path, f"Linear probe, {pool}x{pool} pooling")
        written.append(path)
    return written


if __name__ == "__main__":
    stage_main("probe", run)
