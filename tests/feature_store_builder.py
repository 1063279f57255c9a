"""Stage-test builders: a saved ddpm-tiny network and a feature store written by the real writer.

The probe and evaluate stage tests build their tiny projects with these, so both read a store laid
out exactly as the extract stage lays it out (parts, schema metadata, ``index.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ddae_core.checkpoint import load_network, network_hash, read_network_config, save_network
from ddae_core.config import DiffusionConfig
from ddae_core.diffusion import build_denoiser
from ddae_core.nn import build_unet
from ddae_core.readout import FeatureKey, Readout
from tasks.services.outputs.feature_store import FeatureIndex, part_path, write_part
from tasks.services.outputs.paths import Paths


def save_tiny_network(paths: Paths, resolution: int = 32, seed: int = 0) -> torch.nn.Module:
    """A seeded grayscale ``ddpm-tiny`` DDPM denoiser, saved where the pretrain stage publishes it."""
    torch.manual_seed(seed)
    denoiser = build_denoiser(DiffusionConfig(framework="ddpm"),
                              build_unet("ddpm-tiny", in_channels=1, resolution=resolution)).eval()
    save_network(paths.network, denoiser, {"diffusion": DiffusionConfig(framework="ddpm")})
    return denoiser


def write_feature_store(paths: Paths, singles: Sequence[Readout], ids: Mapping[str, np.ndarray],
                        labels: Mapping[str, np.ndarray], features: Mapping[str, Mapping[FeatureKey, np.ndarray]],
                        class_names: Sequence[str], data_checksum: str = "data-1") -> dict:
    """Copy 0 of every split for each single-tap readout, plus ``index.json``, for the saved network.

    ``features[split][readout.feature_keys[0]]`` is that readout's (N, D) matrix for the split's
    ``ids`` and ``labels``. Returns the metadata every part (and the index) carries.
    """
    selectors = load_network(paths.network).unet.tap_selectors()
    metadata = {"network_hash": network_hash(paths.network), "network_config": read_network_config(paths.network),
                "selectors": {name: list(blocks) for name, blocks in selectors.items()},
                "data_checksum": data_checksum, "level_kind": "t", "seed": singles[0].seed}
    for split in ids:
        for single in singles:
            write_part(part_path(paths.features, single, split, 0), single, split, 0, ids[split], labels[split],
                       features[split][single.feature_keys[0]], metadata)
    FeatureIndex.write(paths.features / "index.json", metadata, singles, {s: len(ids[s]) for s in ids}, 1,
                       class_names)
    return metadata
