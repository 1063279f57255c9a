"""The extract stage: features of every (tap, level, pool) for train, val and test, to Parquet.

The feature path is ``ddae_core.features.extract`` (the same one inference uses); this stage only
resolves names and levels and schedules the work. Work is cut into *units* (a block of
``extract.part_rows`` rows of one split and copy), each written atomically to
``outputs/extract-parts/<fingerprint>/``: a killed run keeps its finished units and redoes the rest.
Under ``accelerate launch`` each process takes every N-th unit; the main process then checks that
every sample id appears exactly once and assembles ``outputs/features`` (replaced atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddae_core.atomic import atomic_directory
from ddae_core.checkpoint import load_network, network_hash, read_network_config
from ddae_core.config import PipelineConfig, as_dict
from ddae_core.data import load_prepared
from ddae_core.devices import stage_device
from ddae_core.diffusion import feature_levels, level_kind
from ddae_core.features import extract
from ddae_core.precision import emulated_bf16, resolve_feature_precision
from ddae_core.readout import Readout, resolve_taps
from tasks.services.outputs.feature_store import (
    INDEX_FILE,
    FeatureIndex,
    part_path,
    read_unit,
    unit_rows,
    write_part,
    write_unit,
)
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import StageError, stage_main
from tasks.services.tracking.runs import stage_run

log = logging.getLogger("ddae.extract")

SPLITS = ("train", "val", "test")
PARTS_FORMAT = 1  # bump when the unit file layout changes: old unfinished work is then discarded


@dataclass(frozen=True)
class Unit:
    """One resumable piece of work: rows ``[start, stop)`` of one split's augmented copy."""

    split: str
    copy: int
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"{self.split}-copy{self.copy}-rows{self.start:09d}-{self.stop:09d}.parquet"


def plan_units(split_sizes: dict[str, int], copies: dict[str, int], part_rows: int) -> list[Unit]:
    """Every unit of the extraction, in a fixed order (split, copy, rows): the same on every process."""
    return [Unit(split, copy, start, min(start + part_rows, split_sizes[split]))
            for split in SPLITS for copy in range(copies[split])
            for start in range(0, split_sizes[split], part_rows)]


def work_fingerprint(metadata: dict, keys: list[Readout], config: PipelineConfig) -> str:
    """Finished units are reused only by a run with the same weights, data, keys and unit grid."""
    settings = {k: v for k, v in as_dict(config.extract).items() if k != "batch_size"}  # batch size: same rows
    key = {"format": PARTS_FORMAT, "network": metadata["network_hash"], "data": metadata["data_checksum"],
           "keys": [(k.taps[0], k.level, k.pool) for k in keys], "extract": settings,
           "precision": metadata["precision"]}  # resolved: units of another machine's precision are not reused
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def parts_root(paths: Paths) -> Path:
    """Where unfinished extractions keep their units between runs (not a DVC output)."""
    return paths.root / "outputs" / "extract-parts"


@dataclass(frozen=True)
class ExtractionPlan:
    """What an extraction computes: the single-tap readouts, their metadata, the units and where they go."""

    taps: list[str]
    levels: list[float]
    keys: list[Readout]
    metadata: dict  # network hash and config, data checksum, level kind, seed: written into every part
    copies: dict[str, int]  # split -> copies (train: 1 + augment_copies)
    units: list[Unit]
    work: Path  # parts_root/<fingerprint>


def plan_extraction(config: PipelineConfig, paths: Paths, denoiser: torch.nn.Module, manifest: dict,
                    splits: dict, device: str | torch.device = "cpu") -> ExtractionPlan:
    """Resolve taps (selectors to block names), levels and the precision on ``device``, and cut every split
    and copy into units."""
    cfg = config.extract
    selectors = denoiser.unet.tap_selectors()
    taps = resolve_taps(cfg.taps, denoiser.unet.tap_names(), selectors, "extract.taps")
    levels = feature_levels(config.pretrain.diffusion, cfg.levels, cfg.sigma_indices)
    precision = resolve_feature_precision(cfg.precision, device)
    keys = [Readout((tap,), level, pool, cfg.seed, precision) for tap in taps for level in levels
            for pool in cfg.pools]
    metadata = {
        "network_hash": network_hash(paths.network),
        "network_config": read_network_config(paths.network),
        "selectors": {name: list(blocks) for name, blocks in selectors.items()},  # the probe's concat groups
        "data_checksum": manifest["checksum"],
        "level_kind": level_kind(config.pretrain.diffusion.framework),
        "seed": cfg.seed,
        "precision": precision,  # resolved: "auto" gives bf16 on one machine and fp32 on another
    }
    copies = {split: 1 + (cfg.augment_copies if split == "train" else 0) for split in SPLITS}
    units = plan_units({s: len(splits[s]) for s in SPLITS}, copies, cfg.part_rows)
    work = parts_root(paths) / work_fingerprint(metadata, keys, config)
    return ExtractionPlan(list(taps), list(levels), keys, metadata, copies, units, work)


def remove_other_work(paths: Paths, keep: Path) -> None:
    """Delete unit folders of other weights or settings: they can never be part of this extraction."""
    if parts_root(paths).is_dir():
        for stale in parts_root(paths).iterdir():
            if stale != keep:
                shutil.rmtree(stale, ignore_errors=True)


def extract_units(denoiser: torch.nn.Module, plan: ExtractionPlan, splits: dict, pending: list[Unit],
                  config: PipelineConfig, device: str | torch.device, label: str) -> None:
    """Run the one feature path on each pending unit and write it atomically (``label`` names the bar)."""
    cfg = config.extract
    bar = tqdm(total=sum(u.stop - u.start for u in pending), unit="img", dynamic_ncols=True,
               desc=f"extract ({len(plan.keys)} features, {label})")
    for unit in pending:
        data = splits[unit.split]
        ids = data.sample_ids[unit.start:unit.stop]
        chunks: dict[tuple, list[np.ndarray]] = {}
        for _start, _stop, batch in extract(
            denoiser, data.images[unit.start:unit.stop], ids, taps=plan.taps, levels=plan.levels, pools=cfg.pools,
            seed=cfg.seed, batch_size=cfg.batch_size, copy=unit.copy, progress=False, device=device,
            precision=plan.metadata["precision"],
        ):
            for k, value in batch.items():
                chunks.setdefault(k, []).append(value)
        features = [np.concatenate(chunks[k.feature_keys[0]]) for k in plan.keys]
        write_unit(plan.work / unit.file_name, ids, data.labels[unit.start:unit.stop], features, plan.metadata)
        bar.update(unit.stop - unit.start)
    bar.close()


def build_features(config: PipelineConfig, paths: Paths, *, process_index: int = 0, num_processes: int = 1,
                   device: str | torch.device = "cpu", barrier: Callable[[], None] = lambda: None) -> dict:
    """Extract this process's share of the units, wait for all, then (main process) assemble.

    Returns:
        A summary dict: keys, rows, levels, taps, units (all), units_done (by this process now),
        units_reused (this process's units already finished by an earlier run).
    """
    if not (paths.network / "network.json").is_file():
        raise StageError(f"{paths.network}/network.json not found: run the pretrain stage first")
    denoiser = load_network(paths.network, device=device).eval()
    manifest, splits = load_prepared(paths.prepared)
    plan = plan_extraction(config, paths, denoiser, manifest, splits, device)
    if process_index == 0:
        remove_other_work(paths, plan.work)
    plan.work.mkdir(parents=True, exist_ok=True)

    mine = plan.units[process_index::num_processes]
    pending = [u for u in mine if unit_rows(plan.work / u.file_name) != u.stop - u.start]
    log.info("features in %s (extract.precision: %s)", plan.metadata["precision"], config.extract.precision)
    if emulated_bf16(plan.metadata["precision"], device):
        log.warning("extract: this CPU has no native bf16 (AVX512-BF16 or AMX) and emulates it, many times slower "
                    "than fp32 (extract.precision: auto extracts in fp32 here)")
    log.info("process %d/%d: %d of its %d units already finished, %d to extract (%s)", process_index,
             num_processes, len(mine) - len(pending), len(mine), len(pending), plan.work)
    extract_units(denoiser, plan, splits, pending, config, device, f"process {process_index}")
    summary = {"keys": len(plan.keys), "levels": plan.levels, "taps": plan.taps, "units": len(plan.units),
               "units_done": len(pending), "units_reused": len(mine) - len(pending)}
    barrier()
    if process_index != 0:
        return summary

    with atomic_directory(paths.features) as staging:
        rows = assemble(plan.work, plan.units, plan.keys, splits, staging, plan.metadata)
        FeatureIndex.write(staging / INDEX_FILE, plan.metadata, plan.keys, {s: len(splits[s]) for s in SPLITS},
                           plan.copies["train"], manifest["class_names"])
    shutil.rmtree(plan.work, ignore_errors=True)
    return {**summary, "rows": rows, "data_checksum": manifest["checksum"]}


def assemble(work: Path, units: list[Unit], keys: list[Readout], splits: dict, staging: Path,
             metadata: dict) -> int:
    """Join the units of each (key, split, copy) into one Parquet part; every id exactly once, in order."""
    rows = 0
    groups: dict[tuple[str, int], list[Unit]] = {}
    for unit in units:
        groups.setdefault((unit.split, unit.copy), []).append(unit)
    for index, key in enumerate(keys):
        for (split, copy), members in groups.items():
            pieces = [read_unit(work / u.file_name, index) for u in members]
            ids = np.concatenate([p.sample_ids for p in pieces])
            expected = np.asarray(splits[split].sample_ids)
            if not np.array_equal(ids, expected):
                counts = np.unique(ids, return_counts=True)[1]
                raise StageError(
                    f"{work}: units of {split} copy {copy} hold {len(ids)} rows ({int((counts > 1).sum())} ids "
                    f"repeated) for {len(expected)} images; delete {work} and rerun the extract stage"
                )
            features = np.concatenate([p.features for p in pieces])
            labels = np.concatenate([p.labels for p in pieces])
            write_part(part_path(staging, key, split, copy), key, split, copy, ids, labels, features, metadata)
            rows += len(features)
    return rows


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Extract all configured features into ``outputs/features``; one shard per Accelerate process.

    Returns:
        A summary dict: number of (tap, level, pool) keys, rows written, levels used, units reused.
    """
    from accelerate import PartialState

    state = PartialState(cpu=stage_device("extract", log).type == "cpu")
    summary = build_features(config, paths, process_index=state.process_index, num_processes=state.num_processes,
                             device=state.device, barrier=state.wait_for_everyone)
    if not state.is_main_process:  # other ranks extract; only the main process assembles and logs
        return summary
    with stage_run(paths.root, "extract", {"ddae.data_checksum": summary.pop("data_checksum"),
                                           "ddae.network_hash": network_hash(paths.network)}):
        import mlflow

        cfg = config.extract
        mlflow.log_params({"taps": ",".join(summary["taps"]), "levels": ",".join(f"{v:g}" for v in summary["levels"]),
                           "pools": ",".join(map(str, cfg.pools)), "augment_copies": cfg.augment_copies,
                           "processes": state.num_processes})
        mlflow.log_metrics({"rows": summary["rows"], "units_reused": summary["units_reused"]})
    return summary


if __name__ == "__main__":
    stage_main("extract", run)
