"""Batch inference: a folder or archive of images -> one Parquet file of predictions.

Streams the images in batches through the registered pyfunc model (the champion, or a version the
user names), with a progress bar. Each row: path, class, class id, confidence, ``needs_review``
(confidence below the review threshold, novelty above the model's calibrated threshold, or the image
could not be read), one probability column per class, the model version, the error for an unreadable
image (which never stops the run), ``novelty`` and ``review_reason`` (which of those held, "" for none).
The file is written under a temporary name and renamed at the end: no half-written output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from ddae_core.atomic import atomic_file
from ddae_core.data.image_files import count_images, iter_images
from ddae_core.heads.selective import review_reason
from tasks.services.params.loading import load_params
from tasks.services.tracking.model_source import LoadedModel, load_model, model_uri


@dataclass(frozen=True)
class PredictSummary:
    """What a batch run did; ``line()`` is the one-line report ``ddae predict`` prints."""

    output: str
    images: int
    unreadable: int
    needs_review: int
    review_threshold: float
    seconds: float
    images_per_s: float
    model_uri: str
    model_version: str
    device: str = "cpu"  # where the model ran
    novel: int = 0  # images flagged for novelty (also counted in needs_review)
    novelty_threshold: float | None = None  # the model's, calibrated on validation; None: a model without one

    def line(self) -> str:
        novelty = "" if self.novelty_threshold is None else f", novelty > {self.novelty_threshold:.4g}"
        return (f"predicted {self.images} images ({self.unreadable} unreadable) in {self.seconds:.1f} s: "
                f"{self.images_per_s:.1f} images/s; {self.needs_review} need review (confidence < "
                f"{self.review_threshold:g}{novelty} or unreadable; {self.novel} novel); model {self.model_uri} "
                f"(version {self.model_version or '-'}, {self.device}) -> {self.output}")


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


def prediction_schema(class_names: list[str], metadata: dict) -> pa.Schema:
    """Columns of the predictions file; ``metadata`` (model, threshold, source) goes in the footer."""
    fields = [
        pa.field("path", pa.string()), pa.field("class_name", pa.string()), pa.field("class_id", pa.int64()),
        pa.field("confidence", pa.float64()), pa.field("needs_review", pa.bool_()),
        *(pa.field(probability_column(c), pa.float64()) for c in class_names),
        pa.field("model_version", pa.string()), pa.field("error", pa.string()),
        pa.field("novelty", pa.float64()), pa.field("review_reason", pa.string()),
    ]
    return pa.schema(fields, metadata={b"ddae": json.dumps(metadata, sort_keys=True).encode()})


def batches(source: str, size: int) -> Iterator[list[tuple[str, bytes]]]:
    images = iter_images(source)
    while batch := list(islice(images, size)):
        yield batch


def predict_batch(pyfunc, payloads: list[bytes]) -> tuple[list[dict | None], list[str | None]]:
    """Model outputs per image: the model's error rows as they are; when an older version fails the
    batch, image by image, so one bad file costs one row."""
    def rows(frame: pd.DataFrame) -> list[dict]:
        return frame.to_dict("records")

    try:
        frame = pyfunc.predict(pd.DataFrame({"image": payloads}))
    except Exception:  # noqa: BLE001 - find the unreadable images one by one
        pass
    else:  # the model reports an unreadable image in its row (versions logged before that raise)
        errors = [None if pd.isna(e) else str(e) for e in frame["error"]] if "error" in frame.columns \
            else [None] * len(payloads)
        return [None if e is not None else row for row, e in zip(rows(frame), errors)], errors
    outputs: list[dict | None] = []
    errors: list[str | None] = []
    for payload in payloads:
        try:
            outputs += rows(pyfunc.predict(pd.DataFrame({"image": [payload]})))
            errors.append(None)
        except Exception as err:  # noqa: BLE001 - reported in the row, never fatal
            outputs.append(None)
            errors.append(f"{type(err).__name__}: {err}")
    return outputs, errors


def batch_table(names: list[str], outputs: list[dict | None], errors: list[str | None], class_names: list[str],
                threshold: float, version: str, schema: pa.Schema, novelty_threshold: float | None = None) -> pa.Table:
    """One batch as rows of the predictions file; the review rule applied with this run's ``threshold``
    and the model's ``novelty_threshold`` (novelty is nan for a model without one)."""
    probs = np.array([o["probabilities"] if o else [np.nan] * len(class_names) for o in outputs], dtype=np.float64)
    confidence = [o["confidence"] if o else None for o in outputs]
    novelty = [o.get("novelty") if o else None for o in outputs]  # models logged before novelty: none
    reasons = [review_reason(c, n, threshold, novelty_threshold) for c, n in zip(confidence, novelty)]
    columns = {
        "path": names,
        "class_name": [o["class_name"] if o else None for o in outputs],
        "class_id": [int(o["class_id"]) if o else None for o in outputs],
        "confidence": confidence,
        "needs_review": [r != "" for r in reasons],
        **{probability_column(c): pa.array(probs[:, k], from_pandas=True) for k, c in enumerate(class_names)},
        "model_version": [version] * len(names),
        "error": errors,
        "novelty": pa.array(novelty, type=pa.float64(), from_pandas=False),
        "review_reason": reasons,
    }
    return pa.table(columns, schema=schema)


def run_predict(root: Path, source: str, output: str, *, model: str | None = None, version: int | None = None,
                review_threshold: float | None = None, batch_size: int | None = None,
                progress: bool = True) -> PredictSummary:
    """Predict every image of ``source`` into ``output`` (Parquet); returns the summary."""
    settings = load_params(root / "params.yaml")
    threshold = settings.predict.review_threshold if review_threshold is None else review_threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"review threshold must be in [0, 1], got {threshold}")
    size = batch_size or settings.predict.batch_size
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    total = count_images(source)  # also checks that the source exists and is readable
    loaded: LoadedModel = load_model(root, model_uri(settings.register.model_name, model, version))
    class_names = list(loaded.classifier.class_names)
    novelty_threshold = novelty_threshold_of(loaded.classifier)
    schema = prediction_schema(class_names, {"model_uri": loaded.uri, "model_version": loaded.version,
                                             "review_threshold": threshold, "novelty_threshold": novelty_threshold,
                                             "source": str(source), "class_names": class_names})
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "unreadable": 0, "needs_review": 0, "novel": 0}
    start = time.perf_counter()
    with atomic_file(out) as tmp:  # readers never see a partial file
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer, \
                tqdm(total=total, unit="img", desc="predict", disable=not progress) as bar:
            for batch in batches(source, size):
                names, payloads = [n for n, _ in batch], [b for _, b in batch]
                outputs, errors = predict_batch(loaded.pyfunc, payloads)
                table = batch_table(names, outputs, errors, class_names, threshold, loaded.version, schema,
                                    novelty_threshold)
                writer.write_table(table)
                counts["images"] += len(names)
                counts["unreadable"] += sum(e is not None for e in errors)
                counts["needs_review"] += sum(table.column("needs_review").to_pylist())
                counts["novel"] += sum("novel" in r.split("+") for r in table.column("review_reason").to_pylist())
                bar.update(len(names))
    seconds = time.perf_counter() - start
    return PredictSummary(output=str(out), review_threshold=threshold, seconds=seconds,
                          images_per_s=counts["images"] / seconds if seconds > 0 else 0.0,
                          model_uri=loaded.uri, model_version=loaded.version, device=loaded.device,
                          novelty_threshold=novelty_threshold, **counts)


def novelty_threshold_of(classifier) -> float | None:
    """The served classifier's calibrated novelty threshold; None for a model without a novelty model
    (a finetune version, or one whose code predates novelty)."""
    threshold = getattr(classifier, "novelty_threshold", None)
    return threshold() if callable(threshold) else None
