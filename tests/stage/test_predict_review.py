"""The review rule in the served model's output and in ``ddae predict``'s rows: low confidence or novelty."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ddae_core.classifier import Prediction
from tasks.services.serving.predict import batch_table, prediction_schema
from tasks.services.tracking.pyfunc_model import DDAEClassifierModel

CLASSES = ["a", "b"]


class StubClassifier:
    """Fixed probabilities and novelty per image, a novelty threshold of 10 (None: no novelty model)."""

    class_names = CLASSES

    def __init__(self, probabilities, novelty, threshold=10.0):
        self.result = Prediction(np.asarray(probabilities, np.float32), np.asarray(novelty, np.float64))
        self.threshold = threshold

    def predict(self, images):
        assert len(images) == len(self.result.novelty)
        return self.result

    def novelty_threshold(self):
        return self.threshold


def served(classifier, params=None) -> pd.DataFrame:
    model = DDAEClassifierModel()
    model.classifier = classifier
    return model.predict(None, pd.DataFrame({"image": [b"x"] * len(classifier.result.novelty)}), params)


def test_the_served_model_adds_novelty_and_the_reason_beside_its_columns():
    stub = StubClassifier([[0.9, 0.1], [0.45, 0.55], [0.8, 0.2], [0.3, 0.7]], [1.0, 2.0, 11.0, 12.0])
    out = served(stub)
    assert list(out.columns) == ["class_name", "class_id", "confidence", "probabilities", "novelty",
                                 "review_reason", "error"]
    assert out["error"].isna().all()
    assert out["class_id"].tolist() == [0, 1, 0, 1] and out["novelty"].tolist() == [1.0, 2.0, 11.0, 12.0]
    assert out["review_reason"].tolist() == ["", "", "novel", "novel"]  # confidence 0.55 >= 0.5
    assert served(stub, {"review_threshold": 0.75})["review_reason"].tolist() == [
        "", "low_confidence", "novel", "low_confidence+novel"]
    without = served(StubClassifier([[0.9, 0.1], [0.45, 0.55]], [np.nan, np.nan], threshold=None))
    assert np.isnan(without["novelty"]).all() and without["review_reason"].tolist() == ["", ""]


def test_predict_rows_flag_low_confidence_novel_and_unreadable_images():
    outputs = [{"class_name": "a", "class_id": 0, "confidence": 0.9, "probabilities": [0.9, 0.1], "novelty": 3.0},
               {"class_name": "b", "class_id": 1, "confidence": 0.6, "probabilities": [0.4, 0.6], "novelty": 30.0},
               {"class_name": "b", "class_id": 1, "confidence": 0.55, "probabilities": [0.45, 0.55], "novelty": 4.0},
               None,
               {"class_name": "a", "class_id": 0, "confidence": 0.9, "probabilities": [0.9, 0.1]}]  # an old model
    errors = [None, None, None, "ValueError: not an image", None]
    schema = prediction_schema(CLASSES, {})
    table = batch_table([f"{i}.png" for i in range(5)], outputs, errors, CLASSES, 0.58, "3", schema, 10.0)
    rows = table.to_pandas()
    assert list(rows.columns) == ["path", "class_name", "class_id", "confidence", "needs_review", "prob_a", "prob_b",
                                  "model_version", "error", "novelty", "review_reason"]
    assert rows["review_reason"].tolist() == ["", "novel", "low_confidence", "unreadable", ""]
    assert rows["needs_review"].tolist() == [False, True, True, True, False]
    assert rows["novelty"].tolist()[:3] == [3.0, 30.0, 4.0] and rows["novelty"].isna().tolist()[3:] == [True, True]
    # a model without a novelty threshold flags on confidence alone
    plain = batch_table(["0.png", "1.png"], outputs[:2], errors[:2], CLASSES, 0.58, "3", schema, None)
    assert plain.column("review_reason").to_pylist() == ["", ""]
