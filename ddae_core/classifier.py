"""A DDAE classifier: raw image bytes -> preprocessing -> frozen denoiser taps -> linear probe, and
the novelty of each image in the same features (``heads.novelty``, when the probe directory has one).
An anomaly-mode directory (good parts only) has no linear probe: the class probabilities over the
normal classes are the novelty model's own (``NoveltyModel.posterior``: the nearest mean wins).

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
from ddae_core.heads.novelty import NoveltyModel
from ddae_core.heads.probe import LinearProbe
from ddae_core.readout import SELECTION_FILE, Readout


def content_ids(images: Sequence[bytes]) -> np.ndarray:
    """A stable id per image from its bytes, so an image always gets the same feature noise."""
    return np.array([int.from_bytes(hashlib.blake2b(b, digest_size=7).digest(), "little") for b in images],
                    dtype=np.int64)


@dataclass(frozen=True)
class Prediction:
    """Per image: class probabilities (N, K) and novelty (N,) float64, nan without a novelty model."""

    probabilities: np.ndarray
    novelty: np.ndarray


@dataclass
class Classifier:
    """The frozen network read at the chosen readout, plus the probe and, when saved, the novelty model."""

    denoiser: torch.nn.Module
    probe: LinearProbe | None  # None: anomaly mode, the novelty model's posterior classifies
    readout: Readout
    preprocess: PreprocessSpec
    class_names: list[str]
    novelty: NoveltyModel | None = None  # None: a finetune head, or a model registered before novelty

    @classmethod
    def load(cls, network_dir: Path, probe_dir: Path, preprocess: dict,
             device: str | torch.device = "cpu") -> "Classifier":
        """Rebuild from a network directory and a probe directory (safetensors + JSON, no pickle); the
        network runs on ``device`` (the probe on the CPU, on the features brought back).

        Reads only the readout and ``class_names`` of ``selection.json``, so the probe's and the
        finetune stage's files (and those of models registered long ago) load alike; ``novelty.safetensors``
        when the directory has one.
        """
        selection = json.loads((Path(probe_dir) / SELECTION_FILE).read_text())
        weights = Path(probe_dir) / "probe.safetensors"
        novelty = NoveltyModel.load(Path(probe_dir))
        if not weights.is_file() and novelty is None:
            raise FileNotFoundError(f"{probe_dir} holds neither probe.safetensors nor a novelty model")
        return cls(
            denoiser=load_network(Path(network_dir), device=device).eval(),
            probe=LinearProbe.from_state_dict(load_file(str(weights))) if weights.is_file() else None,
            readout=Readout.from_json(selection),
            preprocess=PreprocessSpec.from_dict(preprocess),
            class_names=list(selection["class_names"]),
            novelty=novelty,
        )

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        param = next(self.denoiser.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def features(self, images_uint8: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
        """Probe input for uint8 images (N, H, W, C): the readout's taps pooled and concatenated."""
        x0 = to_model_input(images_uint8).to(self.device)
        readout = self.readout
        out = extract_batch(self.denoiser, x0, sample_ids, taps=readout.taps, levels=(readout.level,),
                            pools=(readout.pool,), seed=readout.seed, precision=readout.precision)
        return readout.concat(out)

    def novelty_of(self, features: np.ndarray) -> np.ndarray:
        """Novelty (N,) float64 of probe inputs (N, D); nan for each row when there is no novelty model."""
        if self.novelty is None:
            return np.full(len(features), np.nan)
        return self.novelty.score(features)

    def novelty_threshold(self) -> float | None:
        """The calibrated threshold a novelty above which is flagged; None without a novelty model."""
        return None if self.novelty is None else self.novelty.threshold

    def predict(self, images: Sequence[bytes], batch_size: int = 256) -> Prediction:
        """Class probabilities and novelty for encoded images (PNG, JPEG, ...), the features computed once."""
        probs, novelty = [], []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            pixels = np.stack([preprocess_image(b, self.preprocess) for b in chunk])
            features = self.features(pixels, content_ids(chunk))
            probs.append(self.probe.predict_proba(features) if self.probe is not None
                         else self.novelty.posterior(features))
            novelty.append(self.novelty_of(features))
        if not probs:
            return Prediction(np.zeros((0, len(self.class_names)), dtype=np.float32), np.zeros(0))
        return Prediction(np.concatenate(probs), np.concatenate(novelty))

    def predict_proba(self, images: Sequence[bytes], batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, K) for encoded images (PNG, JPEG, ...)."""
        return self.predict(images, batch_size).probabilities
