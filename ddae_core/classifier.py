"""A DDAE classifier: raw image bytes -> preprocessing -> frozen denoiser taps -> linear probe.

Everything the deployed model does lives here (the MLflow wrapper only adapts DataFrames), and it
reuses the one feature path, ``features.extract_batch``, so serving sees exactly what probing saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.numpy import load_file

from ddae_core.checkpoint import load_network
from ddae_core.data import PreprocessSpec, preprocess_image, to_model_input
from ddae_core.features import extract_batch
from ddae_core.probe import LinearProbe


def content_ids(images: Sequence[bytes]) -> np.ndarray:
    """A stable id per image from its bytes, so an image always gets the same feature noise."""
    return np.array([int.from_bytes(hashlib.blake2b(b, digest_size=7).digest(), "little") for b in images],
                    dtype=np.int64)


@dataclass
class Classifier:
    """The frozen network up to the chosen taps at one noise level, plus the probe."""

    denoiser: torch.nn.Module
    probe: LinearProbe
    taps: tuple[str, ...]
    level: float
    pool: int
    seed: int
    preprocess: PreprocessSpec
    class_names: list[str]

    @classmethod
    def load(cls, network_dir: Path, probe_dir: Path, preprocess: dict) -> "Classifier":
        """Rebuild from a network directory and a probe directory (safetensors + JSON, no pickle)."""
        selection = json.loads((Path(probe_dir) / "selection.json").read_text())
        probe = LinearProbe.from_state_dict(load_file(str(Path(probe_dir) / "probe.safetensors")))
        return cls(
            denoiser=load_network(Path(network_dir)).eval(),
            probe=probe,
            taps=tuple(selection["taps"]),
            level=float(selection["level"]),
            pool=int(selection["pool"]),
            seed=int(selection["seed"]),
            preprocess=PreprocessSpec.from_dict(preprocess),
            class_names=list(selection["class_names"]),
        )

    def features(self, images_uint8: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        """Probe input for uint8 images (N, H, W, C): taps pooled and concatenated in order."""
        x0 = to_model_input(images_uint8)
        out = extract_batch(self.denoiser, x0, sample_ids, taps=self.taps, levels=(self.level,),
                            pools=(self.pool,), seed=self.seed)
        return np.concatenate([out[(tap, self.level, self.pool)] for tap in self.taps], axis=1)

    def predict_proba(self, images: Sequence[bytes], batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, K) for encoded images (PNG, JPEG, ...)."""
        probs = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            pixels = np.stack([preprocess_image(b, self.preprocess) for b in chunk])
            probs.append(self.probe.predict_proba(self.features(pixels, content_ids(chunk))))
        if not probs:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return np.concatenate(probs)
