"""The MLflow pyfunc model (logged as code, so loading it unpickles nothing).

Input: a DataFrame with a column ``image`` of encoded image bytes (or base64 text, as the REST
server delivers them). Output: ``class_name``, ``class_id``, ``confidence``, ``probabilities``, then
``novelty`` (nan for a model without a novelty model) and ``review_reason`` (``ddae_core.heads.selective.
review_reason``: confidence below ``params["review_threshold"]``, default ``predict.review_threshold``'s
default, or novelty above the threshold calibrated on validation; "" when neither), and ``error``: None,
or for an image that cannot be read a short message (its review reason "unreadable", its other columns
empty). One bad image costs its own row, never the request.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


def as_bytes(value) -> bytes:
    """Image bytes from bytes or base64 text; anything else is an error naming the type."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise ValueError(f"image: a string must be base64-encoded image bytes ({err})") from None
    raise TypeError(f"image: expected bytes or base64 text, got {type(value).__name__}")


MAX_ERROR_CHARS = 300  # an error row says what is wrong in a line, never a stack trace


def read_rows(values) -> tuple[list[bytes], list[str | None]]:
    """Each row's image bytes (empty when unusable) and its error (None when it is image bytes)."""
    images: list[bytes] = []
    errors: list[str | None] = []
    for value in values:
        try:
            images.append(as_bytes(value))
            errors.append(None)
        except (TypeError, ValueError) as err:
            images.append(b"")
            errors.append(str(err)[:MAX_ERROR_CHARS])
    return images, errors


def decode_error(image: bytes, preprocess) -> str | None:
    """Why ``image`` cannot be decoded and preprocessed, or None when it can."""
    from ddae_core.data import preprocess_image

    try:
        preprocess_image(image, preprocess)
    except Exception as err:  # noqa: BLE001 - whatever the decoder raises is this image's problem
        return f"cannot decode image: {err}"[:MAX_ERROR_CHARS]
    return None


def with_error_rows(frame: pd.DataFrame, errors: list[str | None]) -> pd.DataFrame:
    """One row per input row: ``frame``'s rows (one per readable image, in order) and an empty row,
    with its ``error``, for each unreadable one."""
    if all(e is None for e in errors):
        return frame.assign(error=pd.Series([None] * len(frame), dtype=object, index=frame.index))
    readable = iter(frame.to_dict("records"))
    rows = [next(readable) if e is None else dict.fromkeys(frame.columns) for e in errors]
    columns = {c: pd.Series([row[c] for row in rows], dtype=object) for c in frame.columns}
    return pd.DataFrame({**columns, "error": pd.Series(errors, dtype=object)})


class DDAEClassifierModel(PythonModel):
    """Adapts ``ddae_core.classifier.Classifier`` to MLflow's DataFrame interface."""

    def load_context(self, context) -> None:
        from ddae_core.classifier import Classifier
        from ddae_core.devices import stage_device

        preprocess = json.loads(open(context.artifacts["preprocess"]).read())
        device = stage_device("model", logging.getLogger("ddae"))  # served on the GPU when there is one
        self.classifier = Classifier.load(context.artifacts["network"], context.artifacts["probe"], preprocess,
                                          device=device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image" not in model_input.columns:
            raise ValueError(f"input needs a column 'image'; got columns {list(model_input.columns)}")
        images, errors = read_rows(model_input["image"])
        try:
            frame = self.predict_images([b for b, e in zip(images, errors) if e is None], params)
        except Exception:
            # Find the images that cannot be decoded; when every image decodes, the failure is not theirs.
            found = [e or decode_error(b, self.classifier.preprocess) for b, e in zip(images, errors)]
            if found == errors:
                raise
            errors = found
            frame = self.predict_images([b for b, e in zip(images, errors) if e is None], params)
        out = with_error_rows(frame, errors)
        out.loc[out["error"].notna(), "review_reason"] = "unreadable"
        return out

    def predict_images(self, images: list[bytes], params=None) -> pd.DataFrame:
        """Predictions for images that are all readable, one row each."""
        from ddae_core.config import PredictConfig
        from ddae_core.heads.selective import review_reason

        prediction = self.classifier.predict(images)
        probs = prediction.probabilities
        ids = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        names = self.classifier.class_names
        confidence = probs.max(axis=1).astype(np.float64) if len(probs) else np.zeros(0)
        threshold = float((params or {}).get("review_threshold", PredictConfig().review_threshold))
        novelty_threshold = self.classifier.novelty_threshold()
        return pd.DataFrame({
            "class_name": [names[i] for i in ids],
            "class_id": ids.astype(np.int64),
            "confidence": confidence,
            "probabilities": [row.astype(np.float64).tolist() for row in probs],
            "novelty": prediction.novelty.astype(np.float64),
            "review_reason": [review_reason(float(c), float(n), threshold, novelty_threshold)
                              for c, n in zip(confidence, prediction.novelty)],
        })


mlflow.models.set_model(DDAEClassifierModel())
