"""Feature service: the registered model's readout for a folder or archive of images, as Parquet.

The rows have the extract stage's columns (``tasks.services.outputs.feature_store.FEATURE_COLUMNS``) plus ``path``:
``sample_id`` is the image's content id (the id the deployed model draws its feature noise from),
``split`` is ``"embed"``, ``label`` is -1, ``tap`` the readout's ``tap_name`` (``a+b`` when the probe
chose a concatenation), and ``feature`` exactly the vector the classifier's probe reads; last,
``novelty``: the classifier's novelty score of that vector (nan for a model without a novelty model;
the metadata's ``novelty_threshold`` is the one it is flagged above). Images that cannot be decoded are
left out and listed in the file's metadata and the summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ddae_core.atomic import atomic_file
from ddae_core.classifier import content_ids
from ddae_core.data import preprocess_image
from ddae_core.data.image_files import count_images
from ddae_core.readout import Readout
from tasks.services.outputs.feature_store import feature_table
from tasks.services.params.loading import load_params
from tasks.services.serving.predict import batches, novelty_threshold_of
from tasks.services.tracking.model_source import load_model, model_uri


def feature_schema(dim: int, metadata: dict) -> pa.Schema:
    """The columns ``embed_table`` writes, declared for a writer that may get no rows (dim 0 when so)."""
    return pa.schema([
        pa.field("sample_id", pa.int64()), pa.field("split", pa.string()), pa.field("label", pa.int64()),
        pa.field("tap", pa.string()), pa.field("level", pa.float64()), pa.field("pool", pa.int32()),
        pa.field("copy", pa.int32()), pa.field("feature", pa.list_(pa.float32(), dim)),
        pa.field("path", pa.string()), pa.field("novelty", pa.float64()),
    ], metadata={b"ddae": json.dumps(metadata, sort_keys=True).encode()})


def embed_table(readout: Readout, names: list[str], ids: np.ndarray, features: np.ndarray,
                novelty: np.ndarray) -> pa.Table:
    """The extract stage's columns for these images (split "embed", label -1, copy 0), plus their paths
    and novelty (N,)."""
    table = feature_table(readout, "embed", 0, ids, np.full(len(names), -1), features)
    table = table.append_column(pa.field("path", pa.string()), pa.array(names, type=pa.string()))
    return table.append_column(pa.field("novelty", pa.float64()), pa.array(novelty, type=pa.float64()))


def novelty_of(classifier, features: np.ndarray) -> np.ndarray:
    """The classifier's novelty (n,) of its probe inputs; nan for a model whose code predates novelty."""
    score = getattr(classifier, "novelty_of", None)
    return score(features) if callable(score) else np.full(len(features), np.nan)


def decode(names: list[str], payloads: list[bytes], spec) -> tuple[list[str], list[bytes], list[np.ndarray], list[dict]]:
    """Preprocess each image; unreadable ones go to the skipped list with their error."""
    kept_names, kept_payloads, pixels, skipped = [], [], [], []
    for name, payload in zip(names, payloads):
        try:
            pixels.append(preprocess_image(payload, spec))
        except Exception as err:  # noqa: BLE001 - reported, never fatal
            skipped.append({"path": name, "error": f"{type(err).__name__}: {err}"})
            continue
        kept_names.append(name)
        kept_payloads.append(payload)
    return kept_names, kept_payloads, pixels, skipped


def run_embed(root: Path, source: str, output: str, *, model: str | None = None, version: int | None = None,
              batch_size: int | None = None, progress: bool = True) -> dict:
    """Write the readout features of every image of ``source`` to ``output``; returns a summary."""
    settings = load_params(root / "params.yaml")
    size = batch_size or settings.predict.batch_size
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    total = count_images(source)
    loaded = load_model(root, model_uri(settings.register.model_name, model, version))
    classifier = loaded.classifier
    readout = classifier.readout
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables, skipped = [], []
    start = time.perf_counter()
    with atomic_file(out) as tmp:  # readers never see a partial file
        with tqdm(total=total, unit="img", desc="embed", disable=not progress) as bar:
            for batch in batches(source, size):
                names, payloads, pixels, bad = decode([n for n, _ in batch], [b for _, b in batch],
                                                      classifier.preprocess)
                skipped += bad
                bar.update(len(batch))
                if not names:
                    continue
                ids = content_ids(payloads)
                features = classifier.features(np.stack(pixels), ids)  # (n, D) float32
                tables.append((names, ids, features, novelty_of(classifier, features)))
        dim = tables[0][2].shape[1] if tables else 0
        metadata = {"model_uri": loaded.uri, "model_version": loaded.version, "source": str(source),
                    "taps": list(readout.taps),
                    "level": readout.level, "pool": readout.pool, "skipped": skipped,
                    "novelty_threshold": novelty_threshold_of(classifier)}
        schema = feature_schema(dim, metadata)
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for names, ids, features, novelty in tables:
                writer.write_table(embed_table(readout, names, ids, features, novelty))
    seconds = time.perf_counter() - start
    embedded = sum(len(t[0]) for t in tables)
    return {"output": str(out), "images": embedded, "unreadable": len(skipped), "tap": readout.tap_name, "dim": dim,
            "seconds": round(seconds, 2), "images_per_s": round(embedded / seconds, 1) if seconds > 0 else 0.0,
            "model_uri": loaded.uri, "model_version": loaded.version, "device": loaded.device}
