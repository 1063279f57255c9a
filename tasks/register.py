"""Stage 5, register: log the winning classifier as an MLflow pyfunc model and gate ``champion``.

The new version always gets alias ``challenger``; ``champion`` moves to it only when there is no
champion yet or the new test accuracy beats the champion's by more than ``register.min_improvement``,
both measured on the same test split (the champion is re-scored when its data version differs).
The decision (both scores, margin, data version, git commit) is tagged on both versions.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ddae_core.checkpoint import network_hash
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared
from ddae_core.readout import Readout
from tasks.common import Paths, StageError, stage_main, write_json_atomic
from tasks.tracking import content_key, git_commit, register_once, stage_run

CLASSIFIER_CODE = Path(__file__).with_name("classifier_model.py")
PIP_REQUIREMENTS = ["torch", "numpy", "pillow", "safetensors", "pandas", "mlflow==3.17.2"]


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_inputs(test) -> tuple[pd.DataFrame, np.ndarray]:
    """The prepared test split as PNG bytes (what the deployed model receives) and labels."""
    frame = pd.DataFrame({"image": [encode_png(np.asarray(image)) for image in test.images]})
    return frame, np.asarray(test.labels)


def score(model, frame: pd.DataFrame, labels: np.ndarray) -> float:
    """Accuracy of a pyfunc model on encoded images."""
    predicted = model.predict(frame)["class_id"].to_numpy()
    return float((predicted == labels).mean())


def log_classifier(paths: Paths, network: Path, probe: Path, preprocess: Path, example: pd.DataFrame, name: str):
    """Log network + probe directory as a pyfunc model (from code) in the active run; returns its info."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.classifier_model import DDAEClassifierModel  # in-process copy, for the signature

    artifacts = {"network": str(network), "probe": str(probe), "preprocess": str(preprocess)}
    local = DDAEClassifierModel()
    local.load_context(type("Context", (), {"artifacts": artifacts})())
    signature = infer_signature(example, local.predict(None, example))
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(CLASSIFIER_CODE), artifacts=artifacts,
        code_paths=[str(paths.root / "ddae_core")], pip_requirements=PIP_REQUIREMENTS,
        signature=signature, input_example=example,
    )


def register_finetuned(paths: Paths, name: str, tags: dict, preprocess: Path, frame: pd.DataFrame,
                       labels: np.ndarray) -> dict | None:
    """When the finetune stage saved a model: a second version (tag ``ddae.kind=finetune``, alias ``finetune``).

    It is the same pyfunc flavour (network + head as a probe directory); the champion gate stays
    with the probe versions, so enabling fine-tuning never moves ``champion`` on its own.
    """
    import mlflow
    from mlflow import MlflowClient

    network, head = paths.root / "outputs" / "finetune" / "network", paths.root / "outputs" / "finetune" / "head"
    if not (head / "selection.json").is_file():
        return None
    selection = json.loads((head / "selection.json").read_text())
    info = log_classifier(paths, network, head, preprocess, frame.head(2), "finetune_model")
    key = content_key([network, head], extra=preprocess.read_text())
    version = register_once(info.model_uri, name, {  # a retried stage registers nothing twice
        **tags, "ddae.network_hash": network_hash(network), "ddae.finetune_test_acc": f"{selection['test_acc']:.6f}"}, key)
    MlflowClient().set_registered_model_alias(name, "finetune", version.version)
    test_acc = score(mlflow.pyfunc.load_model(f"models:/{name}/{version.version}"), frame, labels)
    MlflowClient().set_model_version_tag(name, version.version, "ddae.gate.test_acc", str(test_acc))
    return {"version": int(version.version), "test_acc": test_acc}


def decision_tags(decision: dict) -> dict[str, str]:
    """The gate decision as tags set on both versions it compared (the champion's keep its latest)."""
    return {
        "ddae.gate.challenger_version": str(decision["version"]),
        "ddae.gate.challenger_test_acc": str(decision["test_acc"]),
        "ddae.gate.champion_version": str(decision["champion_version"]),
        "ddae.gate.champion_test_acc": str(decision["champion_test_acc"]),
        "ddae.gate.margin": str(decision["margin"]),
        "ddae.gate.promoted": str(decision["promoted"]),
        "ddae.gate.data_version": decision["data_checksum"],
        "ddae.gate.git_commit": decision["git_commit"],
    }


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Log, register, alias and gate. Returns the decision written to metrics/register.json."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for required in (paths.network / "network.json", paths.probe / "selection.json"):
        if not required.is_file():
            raise StageError(f"{required} not found: run the pretrain and probe stages first")
    manifest, splits = load_prepared(paths.prepared)
    selection = json.loads((paths.probe / "selection.json").read_text())
    name = config.register.model_name
    tags = {
        "ddae.kind": "probe",
        "ddae.data_checksum": manifest["checksum"],
        "ddae.network_hash": network_hash(paths.network),
        "ddae.probe_test_acc": f"{selection['test_acc']:.6f}",  # on cached features (probe stage)
        "ddae.readout": Readout.from_json(selection).label,
        "ddae.git_commit": git_commit(paths.root),
    }
    frame, labels = test_inputs(splits["test"])
    with stage_run(paths.root, "register", tags) as run, tempfile.TemporaryDirectory() as tmp:
        preprocess = Path(tmp) / "preprocess.json"
        preprocess.write_text(json.dumps(manifest["preprocess"]))
        info = log_classifier(paths, paths.network, paths.probe, preprocess, frame.head(2), "model")
        key = content_key([paths.network, paths.probe], extra=json.dumps(manifest["preprocess"], sort_keys=True))
        version = register_once(info.model_uri, name, tags, key)  # a retried stage registers nothing twice
        client = MlflowClient()
        client.set_registered_model_alias(name, "challenger", version.version)

        new_acc = score(mlflow.pyfunc.load_model(f"models:/{name}/{version.version}"), frame, labels)
        try:
            champion = client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champion = None
        champion_acc = None
        if champion is not None:
            champion_acc = score(mlflow.pyfunc.load_model(f"models:/{name}@champion"), frame, labels)
        promote = champion_acc is None or new_acc > champion_acc + config.register.min_improvement
        decision = {
            "model": name, "version": int(version.version), "test_acc": new_acc,
            "champion_version": int(champion.version) if champion else None,
            "champion_test_acc": champion_acc, "margin": config.register.min_improvement,
            "promoted": promote, "data_checksum": manifest["checksum"], "git_commit": tags["ddae.git_commit"],
        }
        client.set_model_version_tag(name, version.version, "ddae.gate.test_acc", str(new_acc))
        for tagged in [version.version] + ([champion.version] if champion is not None else []):
            for key, value in decision_tags(decision).items():
                client.set_model_version_tag(name, tagged, key, value)
        if promote:
            client.set_registered_model_alias(name, "champion", version.version)
        finetuned = register_finetuned(paths, name, {**tags, "ddae.kind": "finetune"}, preprocess, frame, labels)
        if finetuned is not None:
            decision["finetune"] = finetuned
        mlflow.log_metrics({"registered_test_acc": new_acc, "promoted": float(promote)})
        mlflow.log_dict(decision, "decision.json")
        decision["run_id"] = run.info.run_id
    write_json_atomic(paths.metrics / "register.json", {k: v for k, v in decision.items() if k != "run_id"})
    return decision


if __name__ == "__main__":
    stage_main("register", run)
