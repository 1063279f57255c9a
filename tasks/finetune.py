"""The finetune stage: the network up to the probe's readout + a head, trained end to end.

Per label fraction (``label_efficiency.fractions``, the same class-balanced rows as the probe study; a
fraction under one label per class skipped, as there, and listed in ``skipped_fractions``):
the pretrained EMA network (head initialised by a probe fit on the cached features of those rows),
and the same architecture from random weights. Early stopping on validation, test scored once.
The model of the largest fraction is saved as network + head, the layout the register stage logs.
When ``finetune.enabled`` is false the stage only writes a metrics file saying so.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ddae_core.atomic import atomic_directory, write_json_atomic
from ddae_core.checkpoint import denoiser_from_meta, load_network, network_hash, read_network_config, save_network
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared
from ddae_core.devices import stage_device
from ddae_core.features import extract_all
from ddae_core.heads.finetune import ReadoutClassifier, accuracy, finetune, zero_head
from ddae_core.heads.probe import LinearProbe, fit_logistic
from ddae_core.readout import SELECTION_FILE, Readout, Selection
from ddae_core.sampling import capped_subset, fraction_label, label_subsets, too_few_labels
from tasks.services.outputs.feature_store import FeatureIndex, load_selection, read_readout
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import StageError, stage_main
from tasks.services.tracking.runs import stage_run

log = logging.getLogger("ddae")

MODELS = ("ddae_finetune", "scratch_finetune")  # metric names: pretrained weights / random weights
_STATS_IMAGES = 1024  # images whose random-network features set the scratch head's standardisation


def random_denoiser(network_dir, seed: int) -> torch.nn.Module:
    """The pretrained network's architecture (ours or imported) with fresh random weights (seeded, global
    RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return denoiser_from_meta(read_network_config(network_dir))


def scratch_head(denoiser, split, rows: np.ndarray, readout: Readout, num_classes: int, seed: int,
                 device: str | torch.device = "cpu"):
    """A zero head standardised by the random network's readout (on ``device``, where the network lives)
    on (up to 1024 of) ``rows``."""
    rows = np.sort(rows[np.random.default_rng([seed, 6]).permutation(len(rows))[:_STATS_IMAGES]])
    feats = extract_all(denoiser, np.asarray(split.images[rows]), np.asarray(split.sample_ids)[rows],
                        taps=readout.taps, levels=[readout.level], pools=[readout.pool], seed=readout.seed,
                        progress=False, device=device, precision=readout.precision)
    return zero_head(readout.concat(feats), num_classes)


def probe_head(paths: Paths, x_train: np.ndarray, y_train: np.ndarray, rows: np.ndarray, selection: Selection,
               num_classes: int, max_iter: int, device: str | torch.device = "cpu") -> LinearProbe:
    """The pretrained model's head: a probe on the cached features of ``rows`` (all rows: the probe stage's),
    fitted on ``device``."""
    if len(rows) == len(y_train):
        return LinearProbe.from_state_dict(load_file(str(paths.probe / "probe.safetensors")))
    return fit_logistic(x_train[rows], y_train[rows], num_classes=num_classes, l2=selection.l2, max_iter=max_iter,
                        device=device)


def disabled(paths: Paths) -> dict:
    """What the stage records when fine-tuning is off: no model, a metrics file saying so."""
    with atomic_directory(paths.root / "outputs" / "finetune") as staging:
        write_json_atomic(staging / "status.json", {"enabled": False})
    metrics = {"enabled": False}
    write_json_atomic(paths.metrics / "finetune.json", metrics)
    return metrics


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Fine-tune (and train from scratch) at every label fraction; returns metrics/finetune.json."""
    cfg = config.finetune
    if not cfg.enabled:
        return disabled(paths)
    device = stage_device("finetune", log)
    selection = load_selection(paths)
    readout = selection.readout
    index = FeatureIndex.load(paths.features)
    checkpoint = network_hash(paths.network)
    _manifest, splits = load_prepared(paths.prepared)
    num_classes = len(selection.class_names)
    x_train, y_train = read_readout(paths.features, readout, "train", checkpoint)
    if not np.array_equal(y_train, splits["train"].labels):
        raise StageError(f"{paths.features}: train features do not match {paths.prepared}; rerun the extract stage")
    subsets = label_subsets(y_train, config.label_efficiency.fractions, config.label_efficiency.seed)
    skipped = too_few_labels(config.label_efficiency.fractions, y_train)  # left out, as evaluate leaves them
    val_rows = capped_subset(splits["val"].labels, cfg.val_max, cfg.seed)
    test_rows = capped_subset(splits["test"].labels, cfg.test_max, cfg.seed)
    cells, best_model = [], None
    for fraction, rows in sorted(subsets.items()):
        for model_name in MODELS if cfg.scratch else MODELS[:1]:
            if model_name == "ddae_finetune":
                denoiser = load_network(paths.network, device=device)
                head = probe_head(paths, x_train, y_train, rows, selection, num_classes, config.probe.max_iter,
                                  device)
            else:
                denoiser = random_denoiser(paths.network, cfg.seed).to(device)
                head = scratch_head(denoiser, splits["train"], rows, readout, num_classes, cfg.seed, device)
            model = ReadoutClassifier(denoiser, head, readout).to(device)
            log.info("finetune: %s on %s of the labels (%d images)", model_name, fraction_label(fraction), len(rows))
            result = finetune(model, splits["train"], rows, splits["val"], val_rows, cfg, progress=True)
            test_acc = accuracy(result.model, splits["test"], test_rows)
            cells.append({"model": model_name, "fraction": fraction, "labels": int(len(rows)),
                          "val_acc": result.val_acc, "test_acc": test_acc, "steps": result.steps,
                          "best_step": result.best_step, "stopped_early": result.stopped_early,
                          "wall_s": round(result.wall_s, 1)})
            log.info("finetune: %s", cells[-1])
            if model_name == "ddae_finetune":
                best_model = result.model  # the largest fraction's, as fractions ascend
    metrics = {"enabled": True, "readout": readout.label, "cells": cells, "val_images": int(len(val_rows)),
               "test_images": int(len(test_rows)),
               "skipped_fractions": {fraction_label(f): n for f, n in skipped.items()},
               "test_acc": next(c["test_acc"] for c in reversed(cells) if c["model"] == "ddae_finetune")}
    save_model(paths, best_model, selection, index, checkpoint, metrics["test_acc"])
    write_json_atomic(paths.metrics / "finetune.json", metrics)
    with stage_run(paths.root, "finetune", {"ddae.network_hash": checkpoint,
                                            "ddae.data_checksum": index.data_checksum}):
        import mlflow

        from ddae_core.config import as_dict

        mlflow.log_params({f"finetune.{k}": v for k, v in as_dict(cfg).items()} | {"readout": readout.label})
        mlflow.log_metrics({f"{c['model']}.{fraction_label(c['fraction']).rstrip('%')}pct.test_acc": c["test_acc"]
                            for c in cells})
        mlflow.log_dict(metrics, "finetune.json")
    return metrics


def save_model(paths: Paths, model: ReadoutClassifier, probed: Selection, index: FeatureIndex, base_hash: str,
               test_acc: float) -> None:
    """``outputs/finetune/{network,head}``: the fine-tuned network and the head, as a probe directory.

    The head's ``selection.json``: the probe's readout and classes, the features' level kind and data,
    its own test accuracy and the fine-tuned network's hash (``kind="finetune"``; no L2 or validation score).
    """
    with atomic_directory(paths.root / "outputs" / "finetune") as staging:
        save_network(staging / "network", model.denoiser, {"diffusion": read_network_config(paths.network)["diffusion"],
                                                           "finetuned_from": base_hash})
        (staging / "head").mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in model.to_probe().state_dict().items()},
                  str(staging / "head" / "probe.safetensors"))
        head = Selection(readout=probed.readout, class_names=probed.class_names, level_kind=index.level_kind,
                         test_acc=test_acc, network_hash=network_hash(staging / "network"),
                         data_checksum=index.data_checksum, kind="finetune")
        write_json_atomic(staging / "head" / SELECTION_FILE, head.to_json())
        write_json_atomic(staging / "status.json", {"enabled": True})


if __name__ == "__main__":
    stage_main("finetune", run)
