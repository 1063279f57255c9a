"""Stage 4, probe: a linear probe per (tap, level, pool) and per configured tap concatenation.

Fit on train, choose (representation, L2) on validation, report test accuracy once. Raw pixels go
through the same probe code as the floor to beat.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ddae_core.checkpoint import network_hash
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared
from ddae_core.probe import screen_and_select, select_probe
from tasks.common import Paths, StageError, atomic_directory, stage_main, write_csv_atomic, write_json_atomic
from tasks.feature_store import FeatureKey, read_split
from tasks.plots import save_heatmap
from tasks.selective import selective_report
from tasks.tracking import stage_run


def load_candidates(paths: Paths, config: PipelineConfig, index: dict, expected_hash: str):
    """Feature matrices per candidate: {name: (taps, level, pool, {split: X})} plus labels per split."""
    keys = [FeatureKey(k["tap"], k["level"], k["pool"]) for k in index["keys"]]
    copies = index["train_copies"]
    singles: dict[FeatureKey, dict[str, np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    ids: dict[str, np.ndarray] = {}
    for key in keys:
        singles[key] = {}
        for split in ("train", "val", "test"):
            part = read_split(paths.features, key, split, copies if split == "train" else 1, expected_hash)
            if split in ids and not np.array_equal(ids[split], part.sample_ids):
                raise StageError(f"{paths.features}: rows of {key.label} ({split}) are not aligned")
            ids[split], labels[split] = part.sample_ids, part.labels
            singles[key][split] = part.features
    candidates = {key.label: ((key.tap,), key.level, key.pool, feats) for key, feats in singles.items()}
    extracted_taps = sorted({k.tap for k in keys}, key=[k.tap for k in keys].index)
    for group in config.probe.concat:
        for level in sorted({k.level for k in keys}):
            for pool in sorted({k.pool for k in keys}):
                members = [FeatureKey(t, level, pool) for t in group]
                missing = [m.tap for m in members if m not in singles]
                if missing:
                    raise StageError(
                        f"params.yaml: probe.concat: taps {missing} were not extracted "
                        f"(extract.taps gives {extracted_taps})"
                    )
                feats = {s: np.concatenate([singles[m][s] for m in members], axis=1)
                         for s in ("train", "val", "test")}
                name = FeatureKey("+".join(group), level, pool).label
                candidates[name] = (tuple(group), level, pool, feats)
    return candidates, labels


def probe_pixels(paths: Paths, config: PipelineConfig, num_classes: int) -> dict:
    """The raw-pixel floor through the same probe code: pixels in [0, 1], flattened."""
    _manifest, splits = load_prepared(paths.prepared)
    as_x = {s: np.asarray(splits[s].images, dtype=np.float32).reshape(len(splits[s]), -1) / 255.0
            for s in ("train", "val", "test")}
    _key, l2, probe, table = select_probe(
        {"pixels": (as_x["train"], as_x["val"])}, splits["train"].labels, splits["val"].labels,
        num_classes=num_classes, l2_grid=config.probe.l2_grid, max_iter=config.probe.max_iter,
        progress=True,
    )
    chosen = next(r for r in table if r["l2"] == l2)
    return {"l2": l2, "val_acc": chosen["val_acc"],
            "test_acc": float(probe.accuracy(as_x["test"], splits["test"].labels))}


def probe_online(paths: Paths, config: PipelineConfig, index: dict, taps: list[str], level: float,
                 pool: int, num_classes: int) -> dict:
    """The paper's online protocol (``ddae_core.probe_online``) on the readout the cached probe chose.

    Forward passes count network runs of one image at one noise level. ``cached_forward_passes``:
    what the extract stage spends on this readout, train x (1 + extract.augment_copies) + val + test
    (one level; every tap and pool of a level comes from the same run). ``extract_forward_passes``:
    what the extract stage spent on its whole grid (the same times the number of levels extracted).
    """
    from ddae_core.checkpoint import load_network
    from ddae_core.probe_online import online_probe

    _manifest, splits = load_prepared(paths.prepared)
    cfg = config.probe
    result = online_probe(
        load_network(paths.network), splits["train"], splits["val"], splits["test"], taps=taps, level=level,
        pool=pool, num_classes=num_classes, seed=index["seed"], epochs=cfg.online_epochs, lr=cfg.online_lr,
        batch_size=cfg.online_batch_size, progress=True,
    )
    sizes = index["splits"]
    cached = sizes["train"] * index["train_copies"] + sizes["val"] + sizes["test"]
    return {
        "online_test_acc": result.test_acc,
        "online_val_acc": result.val_acc,
        "online_forward_passes": result.forward_passes,
        "online_wall_s": result.wall_s,
        "cached_forward_passes": cached,
        "extract_forward_passes": cached * len({k["level"] for k in index["keys"]}),
    }


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Probe every candidate, select on validation, evaluate the winner on test once.

    Returns:
        The metrics dict written to metrics/probe.json.
    """
    index_path = paths.features / "index.json"
    if not index_path.is_file():
        raise StageError(f"{index_path} not found: run the extract stage first")
    index = json.loads(index_path.read_text())
    checkpoint = network_hash(paths.network)
    candidates, labels = load_candidates(paths, config, index, checkpoint)
    num_classes = len(index["class_names"])
    best_name, best_l2, best_probe, table = screen_and_select(
        {name: (c[3]["train"], c[3]["val"]) for name, c in candidates.items()},
        labels["train"], labels["val"], num_classes=num_classes, l2_grid=config.probe.l2_grid,
        max_iter=config.probe.max_iter, screen_size=config.probe.screen_train,
        finalists=config.probe.finalists, seed=index["seed"], progress=True,
    )
    taps, level, pool, feats = candidates[best_name]
    test_acc = float(best_probe.accuracy(feats["test"], labels["test"]))
    per_candidate = best_rows(table)
    chosen = next(r for r in table if r["key"] == best_name and r["l2"] == best_l2 and r["phase"] == "full")
    metrics = {
        "test_acc": test_acc,
        "val_acc": chosen["val_acc"],
        "best": {"name": best_name, "taps": list(taps), "level": level, "pool": pool, "l2": best_l2},
        "level_kind": index["level_kind"],
        "candidates": len(candidates),
        "train_size": int(len(labels["train"])),
    }
    if config.probe.online:  # the paper's protocol on the same readout (slow; off by default)
        metrics.update(probe_online(paths, config, index, list(taps), level, pool, num_classes))
    if config.probe.raw_pixels:
        pixels = probe_pixels(paths, config, num_classes)
        metrics["raw_pixels_test_acc"] = pixels["test_acc"]
        metrics["raw_pixels_val_acc"] = pixels["val_acc"]

    with atomic_directory(paths.probe) as staging:
        save_file({k: np.ascontiguousarray(v) for k, v in best_probe.state_dict().items()},
                  str(staging / "probe.safetensors"))
        write_json_atomic(staging / "selection.json", {
            "taps": list(taps), "level": level, "level_kind": index["level_kind"], "pool": pool,
            "l2": best_l2, "val_acc": metrics["val_acc"], "test_acc": test_acc,
            "class_names": index["class_names"], "network_hash": checkpoint, "seed": index["seed"],
            "data_checksum": index["data_checksum"],
        })
    with atomic_directory(paths.plots / "probe") as plots:
        write_table(plots / "table.csv", per_candidate, finalist_rows(table), candidates)
        heatmaps = [p.name for p in write_heatmaps(plots, per_candidate, candidates)]
        metrics["selective"], selective_files = selective_report(plots, best_probe, feats, labels,
                                                                 config.predict.target_accuracy)
        heatmaps += [p.name for p in selective_files]  # logged to MLflow with the heatmaps
    write_json_atomic(paths.metrics / "probe.json", metrics)

    with stage_run(paths.root, "probe", {"ddae.network_hash": checkpoint,
                                         "ddae.data_checksum": index["data_checksum"]}):
        import mlflow

        mlflow.log_params({"best": best_name, "l2": best_l2, "l2_grid": str(list(config.probe.l2_grid))})
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
        mlflow.log_artifact(str(paths.plots / "probe" / "table.csv"))
        for heatmap in heatmaps:
            mlflow.log_artifact(str(paths.plots / "probe" / heatmap))
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


TABLE_COLUMNS = ("candidate", "taps", "level", "pool", "phase", "l2", "train_acc", "val_acc", "full_val_acc")


def write_table(path: Path, rows: dict[str, dict], finalists: dict[str, dict], candidates: dict) -> None:
    """One CSV row per candidate (for ``dvc plots`` and people); ``full_val_acc`` for finalists."""
    lines = []
    for name, row in rows.items():
        taps, level, pool, _ = candidates[name]
        full = finalists.get(name)
        lines.append([name, "+".join(taps), f"{level:g}", pool, row["phase"], row["l2"],
                      f"{row['train_acc']:.4f}", f"{row['val_acc']:.4f}", f"{full['val_acc']:.4f}" if full else ""])
    write_csv_atomic(path, TABLE_COLUMNS, lines)


def write_heatmaps(directory: Path, rows: dict[str, dict], candidates: dict) -> list[Path]:
    """One heatmap (taps x levels, validation accuracy) per pooling grid."""
    written = []
    for pool in sorted({c[2] for c in candidates.values()}):
        cells = {("+".join(c[0]), f"{c[1]:g}"): rows[name]["val_acc"]
                 for name, c in candidates.items() if c[2] == pool}
        tap_rows = list(dict.fromkeys(r for r, _ in cells))
        level_cols = list(dict.fromkeys(col for _, col in cells))
        path = directory / f"heatmap_pool{pool}.png"
        save_heatmap(cells, tap_rows, level_cols, path, f"Linear probe, {pool}x{pool} pooling")
        written.append(path)
    return written


if __name__ == "__main__":
    stage_main("probe", run)
