"""``python -m tasks.services.tracking.score_model URI FRAME.parquet``: one model's test accuracy, in a process of its own.

Loading a pyfunc model puts the code it was logged with (``code_paths``: its own ``ddae_core``) first
on ``sys.path``, but a module already imported stays imported: scored inside the register stage, an
older champion would run the current ``ddae_core``. This module imports nothing of the project before
the model is loaded (the ``tasks`` package is empty), so each version runs its own code.

FRAME holds ``image`` (encoded bytes, as the deployed model receives them) and ``label``, and in
anomaly mode ``anomalous`` (True for an image of no normal class). Prints one JSON line: the URI, the
accuracy (or, with ``anomalous``, ``auroc``: of the served ``novelty`` column), the number of images, the device the model ran on (the model picks
it when loaded: the GPU when there is one) and where ``ddae_core`` was imported from. The ``ddae``
log (the model's device line) goes to stderr. The tracking store comes from ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import json
import logging
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tasks.services.tracking.score_model MODEL_URI FRAME.parquet\n")
        return 2
    uri, frame_path = argv
    import mlflow
    import pandas as pd

    ddae_log = logging.getLogger("ddae")  # only the project's lines, not every library's INFO
    ddae_log.setLevel(logging.INFO)
    ddae_log.addHandler(logging.StreamHandler(sys.stderr))
    frame = pd.read_parquet(frame_path)
    model = mlflow.pyfunc.load_model(uri)
    predicted = model.predict(frame[["image"]])
    if "anomalous" in frame.columns:  # anomaly mode: how well the served novelty separates anomalies
        from sklearn.metrics import roc_auc_score  # not the project's: an older version's ddae_core may lack it

        scores = {"auroc": float(roc_auc_score(frame["anomalous"].to_numpy(bool), predicted["novelty"].to_numpy(float)))}
    else:
        scores = {"accuracy": float((predicted["class_id"].to_numpy() == frame["label"].to_numpy()).mean())}
    code = getattr(sys.modules.get("ddae_core"), "__file__", None)
    classifier = getattr(model.unwrap_python_model(), "classifier", None)
    device = str(getattr(classifier, "device", "cpu"))  # models logged before devices were picked: cpu
    print(json.dumps({"uri": uri, **scores, "images": len(frame), "device": device,
                      "ddae_core": code}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
