"""Stage 3, extract: features of every (tap, level, pool) for train, val and test, to Parquet.

The feature path is ``ddae_core.features.extract`` (the same one inference uses); this stage only
resolves names and levels, streams the splits through it and writes the parts atomically.
"""

from __future__ import annotations

import numpy as np

from ddae_core.checkpoint import load_network, network_hash, read_network_config
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared
from ddae_core.diffusion import feature_levels, level_kind
from ddae_core.features import extract
from ddae_core.nn import paper_aliases
from ddae_core.validation import resolve_taps
from tasks.common import Paths, StageError, atomic_directory, stage_main, write_json_atomic
from tasks.feature_store import FeatureKey, part_path, write_part
from tasks.tracking import stage_run

SPLITS = ("train", "val", "test")


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Extract all configured features into ``outputs/features`` (replaced atomically at the end).

    Returns:
        A summary dict: number of (tap, level, pool) keys, rows written, levels used.
    """
    if not (paths.network / "network.json").is_file():
        raise StageError(f"{paths.network}/network.json not found: run the pretrain stage first")
    cfg = config.extract
    denoiser = load_network(paths.network).eval()
    checkpoint = network_hash(paths.network)
    taps = resolve_taps(cfg.taps, denoiser.unet.tap_names(), paper_aliases(denoiser.unet.config), "extract.taps")
    levels = feature_levels(config.pretrain.diffusion, cfg.levels, cfg.sigma_indices)
    manifest, splits = load_prepared(paths.prepared)
    keys = [FeatureKey(tap, float(level), pool) for tap in taps for level in levels for pool in cfg.pools]
    metadata = {
        "network_hash": checkpoint,
        "network_config": read_network_config(paths.network),
        "data_checksum": manifest["checksum"],
        "level_kind": level_kind(config.pretrain.diffusion.framework),
        "seed": cfg.seed,
    }
    rows = 0
    with atomic_directory(paths.features) as staging:
        for split in SPLITS:
            data = splits[split]
            copies = 1 + (cfg.augment_copies if split == "train" else 0)
            for copy in range(copies):
                chunks: dict[tuple, list[np.ndarray]] = {}
                for _start, _stop, batch in extract(
                    denoiser, data.images, data.sample_ids, taps=taps, levels=levels, pools=cfg.pools,
                    seed=cfg.seed, batch_size=cfg.batch_size, copy=copy, progress=True,
                ):
                    for k, value in batch.items():
                        chunks.setdefault(k, []).append(value)
                for tap, level, pool in chunks:
                    key = FeatureKey(tap, float(level), pool)
                    features = np.concatenate(chunks[(tap, level, pool)])
                    write_part(part_path(staging, key, split, copy), key, split, copy,
                               data.sample_ids, data.labels, features, metadata)
                    rows += len(features)
        write_json_atomic(staging / "index.json", {
            **metadata,
            "keys": [{"tap": k.tap, "level": k.level, "pool": k.pool} for k in keys],
            "splits": {s: len(splits[s]) for s in SPLITS},
            "train_copies": 1 + cfg.augment_copies,
            "class_names": manifest["class_names"],
        })
    summary = {"keys": len(keys), "rows": rows, "levels": list(levels), "taps": list(taps)}
    with stage_run(paths.root, "extract", {"ddae.data_checksum": manifest["checksum"],
                                           "ddae.network_hash": checkpoint}):
        import mlflow

        mlflow.log_params({"taps": ",".join(taps), "levels": ",".join(f"{v:g}" for v in levels),
                           "pools": ",".join(map(str, cfg.pools)), "augment_copies": cfg.augment_copies})
        mlflow.log_metric("rows", rows)
    return summary


if __name__ == "__main__":
    stage_main("extract", run)
