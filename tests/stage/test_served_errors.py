"""The served model answers every row: a prediction, or that row's own short ``error``.

The model is logged as register logs it (code, artifacts, signature) into a temporary store, loaded
back as MLflow loads it, and asked directly and through MLflow's scoring-server app (in process).
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tasks import register
from tasks.services.outputs.paths import Paths
from tasks.services.serving.predict import predict_batch

from served_model import build_project, png, preprocess_file

REPO = Path(__file__).resolve().parents[2]
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"not really a png"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model logged with register's ``log_classifier`` and loaded with ``mlflow.pyfunc.load_model``."""
    from tasks.services.tracking.runs import configure

    root = tmp_path_factory.mktemp("served")
    paths = build_project(root / "project")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), list(sys.path)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            configure(paths.root)  # sqlite and artifacts under the project, as the stages track
        with mlflow.start_run():
            info = register.log_classifier(Paths(REPO), paths.network, paths.probe, preprocess_file(paths, root),
                                           pd.DataFrame({"image": [png(40), png(200)]}), "model")
        yield mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        sys.path[:] = before[2]  # loading a model prepends its code path


def test_one_corrupt_image_costs_its_own_row_only(served):
    answer = served.predict(pd.DataFrame({"image": [png(90), CORRUPT, "not base64 !"]}))
    assert len(answer) == 3
    good, corrupt, text = answer.to_dict("records")
    assert good["error"] is None and good["class_name"] in ("a", "b", "c") and 0 < good["confidence"] <= 1
    assert corrupt["class_name"] is None and corrupt["probabilities"] is None
    assert corrupt["error"].startswith("cannot decode image: ") and "Traceback" not in corrupt["error"]
    assert "base64" in text["error"] and text["class_id"] is None
    assert corrupt["review_reason"] == text["review_reason"] == "unreadable" != good["review_reason"]
    # The good row is what the model answers for that image alone.
    alone = served.predict(pd.DataFrame({"image": [png(90)]})).iloc[0]
    assert alone["class_id"] == good["class_id"] and alone["confidence"] == pytest.approx(good["confidence"])
    assert alone["error"] is None


def test_a_batch_of_readable_images_keeps_its_types(served):
    answer = served.predict(pd.DataFrame({"image": [png(30), png(220)]}))
    assert answer["class_id"].dtype == "int64" and answer["error"].isna().all()


def test_ddae_predict_reads_the_models_error_rows(served):
    outputs, errors = predict_batch(served, [png(90), CORRUPT])
    assert outputs[0] is not None and errors[0] is None
    assert outputs[1] is None and errors[1].startswith("cannot decode image: ")


def test_the_scoring_server_answers_every_row_with_no_stack_trace(served):
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(served))
    rows = [[base64.b64encode(png(90)).decode()], [base64.b64encode(CORRUPT).decode()]]
    response = client.post("/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows}})
    assert response.status_code == 200, response.text
    assert "Traceback" not in response.text and "stack_trace" not in response.text
    good, corrupt = response.json()["predictions"]
    assert good["error"] is None and good["class_name"] in ("a", "b", "c")
    assert corrupt["class_name"] is None and corrupt["error"].startswith("cannot decode image: ")
