"""The probe grid's cost: the official ``linear.py --grid`` against our cached grid, on the same images.

The official grid trains one linear layer per (block, noise level) for 15 epochs, re-running the frozen
network on every training image at every level each epoch (``ddae_core.heads.probe_online.online_grid``).
Ours runs the network once per image and level (``ddae_core.features.extract``, the extract stage's path),
then chooses among every single block, pooling and concatenation on validation from the cached features
(``ddae_core.heads.probe.screen_and_select``, the probe stage's search). Both read the same blocks at the
same levels; the official layers see global pooling only, as in ``linear.py``.

Three walls are measured on one machine in one process: the network's bare forward passes over the
same images and levels (the floor any extraction pays), our extraction of the grid, and our selection.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ddae_core.config import PipelineConfig
from ddae_core.data import to_model_input
from ddae_core.diffusion import feature_levels
from ddae_core.features import extract_all, running_in
from ddae_core.heads.probe import screen_and_select
from ddae_core.heads.probe_online import online_grid
from ddae_core.precision import resolve_feature_precision
from ddae_core.readout import Readout, candidates, resolve_taps

log = logging.getLogger("bench")

OFFICIAL_LEVELS = {"ddpm": (1.0, 11.0, 21.0), "edm": ()}  # linear.py --grid: t in {1, 11, 21}; EDM: sigma indices
OFFICIAL_SIGMA_INDICES = {"ddpm": (), "edm": (3, 4, 5)}
SPLITS = ("train", "val", "test")


def grid_levels(config: PipelineConfig) -> tuple[float, ...]:
    """The official grid's noise levels for the configured framework, as feature level values."""
    framework = config.pretrain.diffusion.framework
    return feature_levels(config.pretrain.diffusion, OFFICIAL_LEVELS[framework], OFFICIAL_SIGMA_INDICES[framework])


def forward_wall(denoiser: nn.Module, splits: dict[str, Any], levels: tuple[float, ...], batch_size: int,
                 precision: str) -> float:
    """Seconds of the bare network forward over every image of ``splits`` at every level: no hooks,
    pooling or keyed noise (a fixed draw), in ``precision``: one forward pass per image per level."""
    device = next(denoiser.parameters()).device
    started = time.perf_counter()
    with torch.inference_mode(), running_in(precision, device):
        for split in splits.values():
            for start in range(0, len(split.labels), batch_size):
                x0 = to_model_input(np.asarray(split.images[start:start + batch_size])).to(device)
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(start)).to(device)
                for level in levels:
                    label = torch.full((len(x0),), level, device=device)
                    denoiser(denoiser.add_noise(x0, label, noise), label)
    return time.perf_counter() - started


def cached_grid(denoiser: nn.Module, splits: dict[str, Any], config: PipelineConfig, levels: tuple[float, ...],
                precision: str, num_classes: int) -> dict[str, Any]:
    """Our grid: extract every (tap, level, pool) once, then select among singles and concatenations."""
    cfg = config.extract
    unet = denoiser.unet
    taps = list(resolve_taps(cfg.taps, unet.tap_names(), unet.tap_selectors(), "extract.taps"))
    started = time.perf_counter()
    blocks = {name: extract_all(denoiser, split.images, split.sample_ids, taps=taps, levels=levels, pools=cfg.pools,
                                seed=cfg.seed, batch_size=cfg.batch_size, progress=False,
                                device=next(denoiser.parameters()).device, precision=precision)
              for name, split in splits.items()}
    extract_s = time.perf_counter() - started
    singles = [Readout((tap,), level, pool, cfg.seed, precision) for tap in taps for level in levels for pool in cfg.pools]
    chosen = candidates(singles, config.probe.concat, unet.tap_selectors())
    features = {r.label: tuple(r.concat(blocks[s]) for s in ("train", "val")) for r in chosen}
    started = time.perf_counter()
    label, l2, probe, table = screen_and_select(
        features, splits["train"].labels, splits["val"].labels, num_classes=num_classes,
        l2_grid=config.probe.l2_grid, max_iter=config.probe.max_iter, l2_extend=config.probe.l2_extend,
        l2_bounds=config.probe.l2_bounds, screen_size=config.probe.screen_train, finalists=config.probe.finalists,
        seed=cfg.seed, progress=False)
    probe_s = time.perf_counter() - started
    best = next(r for r in chosen if r.label == label)
    row = next(r for r in table if r["key"] == label and r["l2"] == l2 and r["phase"] == "full")
    return {"taps": taps, "levels": list(levels), "pools": list(cfg.pools), "candidates": len(chosen),
            "fits": len(table), "extract_wall_s": extract_s, "probe_wall_s": probe_s, "chosen": best.label,
            "l2": l2, "val_acc": row["val_acc"],
            "test_acc": float(probe.accuracy(best.concat(blocks["test"]), splits["test"].labels))}


def official_grid(denoiser: nn.Module, splits: dict[str, Any], config: PipelineConfig, taps: list[str],
                  levels: tuple[float, ...], precision: str, num_classes: int, progress: bool) -> dict[str, Any]:
    """``linear.py --grid``: a layer per (block, level) on globally pooled raw features, 15 epochs of fresh
    flips, crops and noise, every block of a level from one network run per batch."""
    cfg = config.probe
    readouts = [Readout((tap,), level, 1, config.extract.seed, precision) for level in levels for tap in taps]
    results = online_grid(denoiser, splits["train"], splits["val"], splits["test"], readouts=readouts,
                          num_classes=num_classes, epochs=cfg.online_epochs, lr=cfg.online_lr,
                          batch_size=cfg.online_batch_size, eval_batch_size=config.extract.batch_size,
                          device=next(denoiser.parameters()).device, progress=progress)
    by_val = max(results, key=lambda r: results[r].val_acc)
    by_test = max(results, key=lambda r: results[r].test_acc)  # what the official script reports
    any_result = results[readouts[0]]
    return {"layers": len(readouts), "epochs": cfg.online_epochs, "batch_size": cfg.online_batch_size,
            "lr": cfg.online_lr, "forward_passes": any_result.forward_passes, "wall_s": any_result.wall_s,
            "chosen_on_val": by_val.label, "chosen_on_val_test_acc": results[by_val].test_acc,
            "best_test": by_test.label, "best_test_acc": results[by_test].test_acc}


def grid_cost(denoiser: nn.Module, splits: dict[str, Any], config: PipelineConfig, num_classes: int, *,
              official: bool = True, progress: bool = True) -> dict[str, Any]:
    """Forward floor, our extraction and selection, and (``official``) the official grid, on ``splits``."""
    denoiser = denoiser.eval()
    device = next(denoiser.parameters()).device
    precision = resolve_feature_precision(config.extract.precision, device)
    levels = grid_levels(config)
    sizes = {name: len(split.labels) for name, split in splits.items()}
    log.info("grid cost: %s images, levels %s, %s", sizes, levels, precision)
    floor = forward_wall(denoiser, splits, levels, config.extract.batch_size, precision)
    ours = cached_grid(denoiser, splits, config, levels, precision, num_classes)
    result: dict[str, Any] = {
        "splits": sizes, "precision": precision, "forward_wall_s": floor, "cached": ours,
        "extract_over_forward": ours["extract_wall_s"] / floor,
        "forward_passes": len(levels) * sum(sizes.values()),
    }
    log.info("grid cost: forward %.1f s, extract %.1f s, probe %.1f s (%d candidates)", floor,
             ours["extract_wall_s"], ours["probe_wall_s"], ours["candidates"])
    if official:
        result["official"] = official_grid(denoiser, splits, config, ours["taps"], levels, precision, num_classes,
                                           progress)
        result["official_over_cached_wall"] = result["official"]["wall_s"] / (
            ours["extract_wall_s"] + ours["probe_wall_s"])
    return result


__all__ = ["cached_grid", "forward_wall", "grid_cost", "grid_levels", "official_grid"]
