"""The MLflow pyfunc model (logged as code, so loading it unpickles nothing).

Input: a DataFrame with a column ``image`` of encoded image bytes (or base64 text, as the REST
server delivers them). Output: ``class_name``, ``class_id``, ``confidence``, ``probabilities``, then
``novelty`` (nan for a model without a novelty model) and ``review_reason`` (``ddae_core.heads.selective.
review_reason``: confidence below ``params["review_threshold"]``, default ``predict.review_threshold``'s
default, or novelty above the threshold calibrated on validation; "" when neither).
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
        from ddae_core.config import PredictConfig
        from ddae_core.heads.selective import review_reason

        images = [as_bytes(v) for v in model_input["image"]]
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
