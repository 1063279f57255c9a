"""``python -m tasks.services.tracking.score_model URI FRAME.parquet``: one model's test accuracy, in a process of its own.

Loading a pyfunc model puts the code it was logged with (``code_paths``: its own ``ddae_core``) first
on ``sys.path``, but a module already imported stays imported: scored inside the register stage, an
older champion would run the current ``ddae_core``. This module imports nothing of the project before
the model is loaded (the ``tasks`` package is empty), so each version runs its own code.

FRAME holds ``image`` (encoded bytes, as the deployed model receives them) and ``label``. Prints one
JSON line: the URI, the accuracy, the number of images, the device the model ran on (the model picks
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
    predicted = model.predict(frame[["image"]])["class_id"].to_numpy()
    accuracy = float((predicted == frame["label"].to_numpy()).mean())
    code = getattr(sys.modules.get("ddae_core"), "__file__", None)
    classifier = getattr(model.unwrap_python_model(), "classifier", None)
    device = str(getattr(classifier, "device", "cpu"))  # models logged before devices were picked: cpu
    print(json.dumps({"uri": uri, "accuracy": accuracy, "images": len(frame), "device": device,
                      "ddae_core": code}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
