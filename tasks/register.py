"""The register stage: log the winning classifier as an MLflow pyfunc model and gate ``champion``.

Outside a DVC experiment the new version gets alias ``challenger``; ``champion`` moves to it only when
there is no champion yet or the new test accuracy beats the champion's by more than
``register.min_improvement``, both measured on the same test split, each version scored in a process
of its own with its own logged code (``tasks.services.tracking.score_model``). The decision (both scores, margin, data
version, git commit, why) is tagged on both versions. Inside ``dvc exp run`` the version is registered
and tagged with the experiment, but no alias moves: only a pipeline run outside experiments promotes.
Every version's run gets a model card (``model_card.md``: data, network, readout, scores, review
threshold, known limits; ``tasks.services.tracking.model_card``) and, for the probe, the test confusion PNG.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from PIL import Image

from ddae_core.atomic import write_json_atomic
from ddae_core.checkpoint import network_hash, read_network_config
from ddae_core.config import PipelineConfig, PredictConfig
from ddae_core.data import load_prepared, normal_classes
from ddae_core.readout import SELECTION_FILE, Selection
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import StageError, log, stage_main
from tasks.services.tracking.model_card import CONFUSION_FILE, card_sections, log_card, read_json, render_card
from tasks.services.tracking.runs import (
    check_reachable,
    content_key,
    git_commit,
    register_once,
    stage_run,
    tracking_uri,
)

CLASSIFIER_CODE = Path(__file__).parent / "services" / "tracking" / "pyfunc_model.py"
# What the classifier's code (tasks/services/tracking/pyfunc_model.py, ddae_core) imports when MLflow loads it
MODEL_DISTRIBUTIONS = ("torch", "numpy", "pillow", "safetensors", "pandas", "tqdm", "mlflow")


@functools.cache
def model_requirements(kind: str = "unet") -> tuple[str, ...]:
    """``name==version`` of each of ``MODEL_DISTRIBUTIONS`` as installed here (the model's build), and
    diffusers for a network of another ``kind`` than our own UNet (a wrapped UNet2DModel, a DiT).

    The public version is pinned: a local build label (torch's ``+cpu``) is dropped, so the pin
    installs from PyPI and still matches the build the model was made with.
    """
    names = MODEL_DISTRIBUTIONS + (() if kind == "unet" else ("diffusers",))
    return tuple(f"{name}=={metadata.version(name).split('+')[0]}" for name in names)


@dataclass(frozen=True)
class Experiment:
    """The ``dvc exp run`` a stage runs inside: DVC sets these variables for every stage command."""

    name: str
    baseline_rev: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Experiment | None:
        baseline = env.get("DVC_EXP_BASELINE_REV")
        return cls(env.get("DVC_EXP_NAME", ""), baseline) if baseline else None


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 (H, W, C) image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_inputs(test) -> tuple[pd.DataFrame, np.ndarray]:
    """The prepared test split as PNG bytes (what the deployed model receives) and labels."""
    frame = pd.DataFrame({"image": [encode_png(np.asarray(image)) for image in test.images]})
    return frame, np.asarray(test.labels)


def write_scoring_frame(path: Path, frame: pd.DataFrame, labels: np.ndarray,
                        anomalous: np.ndarray | None = None) -> Path:
    """The test images and labels as the Parquet file ``tasks.services.tracking.score_model`` reads; in anomaly
    mode also ``anomalous`` (the versions are then scored by the AUROC of their novelty)."""
    frame = frame.assign(label=labels)
    (frame if anomalous is None else frame.assign(anomalous=anomalous)).to_parquet(path)
    return path


def score(root: Path, uri: str, frame_path: Path) -> float:
    """Accuracy of ``uri`` on the scoring frame (AUROC of its novelty when the frame has ``anomalous``), from a
    fresh ``python -m tasks.services.tracking.score_model``.

    Its log goes to this stage's; a failure re-checks the tracking server (unreachable: transient).
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root)}
    result = subprocess.run([sys.executable, "-m", "tasks.services.tracking.score_model", uri, str(frame_path)], cwd=root,
                            env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        check_reachable(root)
        raise StageError(f"scoring {uri} failed with exit code {result.returncode} (its log is above)")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    metric = "auroc" if "auroc" in report else "accuracy"
    log.info("register scoring: %s: test %s %.4f on %d images, device %s (ddae_core from %s)", uri, metric,
             report[metric], report["images"], report.get("device", "cpu"), report["ddae_core"])
    return report[metric]


def log_classifier(paths: Paths, network: Path, probe: Path, preprocess: Path, example: pd.DataFrame, name: str):
    """Log network + probe directory as a pyfunc model (from code) in the active run; returns its info."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.services.tracking.pyfunc_model import DDAEClassifierModel  # in-process copy, for the signature

    artifacts = {"network": str(network), "probe": str(probe), "preprocess": str(preprocess)}
    local = DDAEClassifierModel()
    local.load_context(type("Context", (), {"artifacts": artifacts})())
    params = {"review_threshold": PredictConfig().review_threshold}  # a request may pass its own
    signature = infer_signature(example, local.predict(None, example, params), params=params)
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(CLASSIFIER_CODE), artifacts=artifacts,
        code_paths=[str(paths.root / "ddae_core")],
        pip_requirements=list(model_requirements(read_network_config(network).get("kind", "unet"))),
        signature=signature, input_example=example,
    )


def log_version_card(paths: Paths, name: str, version, manifest: dict, selection: Selection, network: Path,
                     registered_acc: float, *, probe: bool) -> list[str]:
    """Log the model card (and for a probe version the test confusion PNG) to the version's run.

    A finetune version's head has its own test accuracy and no review threshold of its own.
    """
    from mlflow import MlflowClient

    probe_metrics = read_json(paths.metrics / "probe.json") if probe else {"test_acc": selection.test_acc}
    sections = card_sections(
        manifest=manifest, selection=selection, network_meta=read_network_config(network),
        network_hash=network_hash(network), probe_metrics=probe_metrics,
        evaluate_metrics=read_json(paths.metrics / "evaluate.json"), registered_acc=registered_acc,
        selective=probe_metrics.get("selective") if probe else None)
    card = render_card(f"{name} version {version.version}", sections,
                       facts={"kind": selection.kind, "git commit": git_commit(paths.root)})
    confusion = paths.plots / "probe" / CONFUSION_FILE if probe else None
    return log_card(MlflowClient(), version.run_id, card, confusion)


def register_finetuned(paths: Paths, name: str, tags: dict, preprocess: Path, frame: pd.DataFrame,
                       scoring: Path, experiment: Experiment | None, manifest: dict) -> dict | None:
    """When the finetune stage saved a model: a second version (tag ``ddae.kind=finetune``, alias ``finetune``).

    It is the same pyfunc flavour (network + head as a probe directory); the champion gate stays
    with the probe versions, so enabling fine-tuning never moves ``champion`` on its own. Inside a
    DVC experiment the alias does not move either.
    """
    from mlflow import MlflowClient

    network, head = paths.root / "outputs" / "finetune" / "network", paths.root / "outputs" / "finetune" / "head"
    if not (head / SELECTION_FILE).is_file():
        return None
    selection = Selection.read(head)
    info = log_classifier(paths, network, head, preprocess, frame.head(2), "finetune_model")
    key = content_key([network, head], extra=preprocess.read_text())
    version = register_once(info.model_uri, name, {  # a retried stage registers nothing twice
        **tags, "ddae.network_hash": network_hash(network), "ddae.finetune_test_acc": f"{selection.test_acc:.6f}"}, key)
    client = MlflowClient()
    if experiment is None:
        client.set_registered_model_alias(name, "finetune", version.version)
    test_acc = score(paths.root, f"models:/{name}/{version.version}", scoring)
    client.set_model_version_tag(name, version.version, "ddae.gate.test_acc", str(test_acc))
    log_version_card(paths, name, version, manifest, selection, network, test_acc, probe=False)
    return {"version": int(version.version), "test_acc": test_acc}


def decision_tags(decision: dict) -> dict[str, str]:
    """The gate decision as tags set on the versions it compared (the champion's keep its latest)."""
    metric = decision.get("metric", "test_acc")
    tags = {
        "ddae.gate.challenger_version": str(decision["version"]),
        f"ddae.gate.challenger_{metric}": str(decision[metric]),
        "ddae.gate.champion_version": str(decision["champion_version"]),
        f"ddae.gate.champion_{metric}": str(decision[f"champion_{metric}"]),
        "ddae.gate.margin": str(decision["margin"]),
        "ddae.gate.promoted": str(decision["promoted"]),
        "ddae.gate.reason": decision["reason"],
        "ddae.gate.data_version": decision["data_checksum"],
        "ddae.gate.git_commit": decision["git_commit"],
    }
    if decision["experiment"]:
        tags["ddae.gate.experiment"] = decision["experiment"]["name"]
        tags["ddae.gate.experiment_baseline"] = decision["experiment"]["baseline_rev"]
    return tags


METRIC_WORDS = {"test_acc": "test accuracy", "test_auroc": "test AUROC"}  # what the gate compares, by mode


def promotion(new_acc: float, champion_acc: float | None, margin: float,
              experiment: Experiment | None, metric: str = "test_acc") -> tuple[bool, str]:
    """Whether the new version becomes ``champion``, and why. An experiment never promotes."""
    if experiment is not None:
        return False, (f"registered by the DVC experiment {experiment.name!r} (baseline "
                       f"{experiment.baseline_rev[:7]}); experiments move no alias: to gate this model, "
                       "rerun register outside an experiment (dvc repro --force --single-item register)")
    if champion_acc is None:
        return True, "no champion yet"
    verdict = "beats" if new_acc > champion_acc + margin else "does not beat"
    return new_acc > champion_acc + margin, (f"{METRIC_WORDS[metric]} {new_acc:.4f} {verdict} the champion's "
                                             f"{champion_acc:.4f} by more than {margin:g}")


def gate_version(client, name: str, version: str, *, score_uri: Callable[[str], float], margin: float,
                 experiment: Experiment | None, facts: dict, metric: str = "test_acc") -> dict:
    """Score ``version`` and the champion, decide, tag the decision and move aliases; the decision.

    Outside an experiment ``challenger`` moves to ``version``, ``champion`` too when it wins, and the
    decision is tagged on both versions. Inside one no alias moves and only ``version`` is tagged.
    ``facts`` (model, data_checksum, git_commit) go into the decision as they are. ``metric`` names what
    ``score_uri`` measures (``test_acc``; ``test_auroc`` in anomaly mode): the decision's keys for both scores.
    """
    from mlflow.exceptions import MlflowException

    version = str(version)  # MLflow hands versions out as int or str
    new_acc = score_uri(f"models:/{name}/{version}")
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    champion_acc = None
    if champion is not None:  # the same content registered again is the same version: scored once
        champion_acc = new_acc if str(champion.version) == version else score_uri(f"models:/{name}/{champion.version}")
    promoted, reason = promotion(new_acc, champion_acc, margin, experiment, metric)
    decision = {
        **facts, "version": int(version), "metric": metric, metric: new_acc,
        "champion_version": int(champion.version) if champion else None, f"champion_{metric}": champion_acc,
        "margin": margin, "promoted": promoted, "reason": reason,
        "experiment": {"name": experiment.name, "baseline_rev": experiment.baseline_rev} if experiment else None,
    }
    client.set_model_version_tag(name, version, f"ddae.gate.{metric}", str(new_acc))
    tagged = [version] + ([str(champion.version)] if champion is not None and experiment is None else [])
    for each in dict.fromkeys(tagged):
        for key, value in decision_tags(decision).items():
            client.set_model_version_tag(name, each, key, value)
    if experiment is None:
        client.set_registered_model_alias(name, "challenger", version)
        if promoted:
            client.set_registered_model_alias(name, "champion", version)
    log.info("register: version %s %s (%s)", version, "promoted to champion" if promoted else "not promoted", reason)
    return decision


def source_tags(network_meta: dict) -> dict[str, str]:
    """Where the network came from: ``ddae.init.*`` tags for an imported one (``pretrain.init``), else none."""
    init = network_meta.get("init") or {}
    return {f"ddae.init.{key}": str(value)[:500] for key, value in init.items()}


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Log, register, alias and gate. Returns the decision written to metrics/register.json."""
    import mlflow
    from mlflow import MlflowClient

    for required in (paths.network / "network.json", paths.probe / SELECTION_FILE):
        if not required.is_file():
            raise StageError(f"{required} not found: run the pretrain and probe stages first")
    manifest, splits = load_prepared(paths.prepared)
    selection = Selection.read(paths.probe)
    name = config.register.model_name
    experiment = Experiment.from_env(os.environ)
    anomaly = selection.kind == "anomaly"  # one-class: gated by the AUROC of the served novelty
    metric = "test_auroc" if anomaly else "test_acc"
    tags = {
        "ddae.kind": selection.kind,
        "ddae.data_checksum": manifest["checksum"],
        "ddae.network_hash": network_hash(paths.network),
        f"ddae.probe_{metric}": f"{getattr(selection, metric):.6f}",  # on cached features (probe stage)
        "ddae.readout": selection.readout.label,
        "ddae.git_commit": git_commit(paths.root),
        **source_tags(read_network_config(paths.network)),
    }
    if experiment is not None:
        tags |= {"ddae.experiment": experiment.name, "ddae.experiment_baseline": experiment.baseline_rev}
        log.info("register: inside the DVC experiment %r: the version is registered, no alias moves",
                 experiment.name)
    frame, labels = test_inputs(splits["test"])
    with stage_run(paths.root, "register", tags) as run, tempfile.TemporaryDirectory() as tmp:
        preprocess = Path(tmp) / "preprocess.json"
        preprocess.write_text(json.dumps(manifest["preprocess"]))
        normal = [manifest["class_names"].index(c) for c in normal_classes(manifest)]
        scoring = write_scoring_frame(Path(tmp) / "test.parquet", frame, labels,
                                      ~np.isin(labels, normal) if anomaly else None)
        info = log_classifier(paths, paths.network, paths.probe, preprocess, frame.head(2), "model")
        key = content_key([paths.network, paths.probe], extra=json.dumps(manifest["preprocess"], sort_keys=True))
        version = register_once(info.model_uri, name, tags, key)  # a retried stage registers nothing twice
        decision = gate_version(
            MlflowClient(), name, version.version, score_uri=lambda uri: score(paths.root, uri, scoring),
            margin=config.register.min_improvement, experiment=experiment,
            facts={"model": name, "data_checksum": manifest["checksum"], "git_commit": tags["ddae.git_commit"]},
            metric=metric)
        log_version_card(paths, name, version, manifest, selection, paths.network, decision[metric], probe=True)
        finetuned = register_finetuned(paths, name, {**tags, "ddae.kind": "finetune"}, preprocess, frame,
                                       scoring, experiment, manifest)
        if finetuned is not None:
            decision["finetune"] = finetuned
        mlflow.log_metrics({f"registered_{metric}": decision[metric], "promoted": float(decision["promoted"])})
        mlflow.log_dict(decision, "decision.json")
        decision["run_id"] = run.info.run_id
    write_json_atomic(paths.metrics / "register.json", {k: v for k, v in decision.items() if k != "run_id"})
    return decision


if __name__ == "__main__":
    stage_main("register", run)
