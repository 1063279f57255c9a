"""MLflow wiring shared by the stages: where runs go, how a stage run links to its pipeline run.

Defaults work offline: ``sqlite:///<repo>/mlflow.db`` with artifacts under ``<repo>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides. A pipeline run (the Prefect flow) exports its run id in
``DDAE_PIPELINE_RUN_ID``; each stage then opens a nested run under it. Under a bare ``dvc repro``
each stage opens its own run, linked to the others by the ``ddae.git_commit`` and data tags.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

EXPERIMENT = "ddae"
# The experiment's kind for MLflow UIs that read it (Databricks; the open-source UI up to its GenAI/Model
# training switch); MLflow 3.17's open-source UI reads the switch instead: see ``ui_url``
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17's UI shows an experiment as a training pipeline (runs, charts, models) for this URL parameter;
# without it, or the switch clicked once in that browser, it opens the GenAI view (traces, "Detect Issues")
UI_VIEW = "workflowType=machine_learning"
UI_LOCAL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
PARENT_ENV = "DDAE_PIPELINE_RUN_ID"
# MLflow's own HTTP retries default to 7 with a doubling backoff (minutes on a dead server): bound them
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
REACH_ATTEMPTS = 3
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 5000  # ... and a comfortable bound for a tag's
CONTENT_TAG = "ddae.content_key"  # identifies what a model version holds, so it is registered once


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server does not answer; nothing was logged or registered."""


def tracking_uri(root: Path) -> str:
    """The tracking URI: the user's ``MLFLOW_TRACKING_URI`` or the repo's own SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def check_reachable(root: Path, attempts: int = REACH_ATTEMPTS, delay_s: float = 0.5) -> None:
    """For an http(s) tracking URI, ask its ``/health`` up to ``attempts`` times (backing off), else raise.

    Local stores (sqlite, files) need no check. Also bounds MLflow's own HTTP retries for later calls.
    """
    uri = tracking_uri(root)
    if not uri.startswith(("http://", "https://")):
        return
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
                error = RuntimeError(f"/health answered {response.status}")
        except (urllib.error.URLError, OSError) as err:
            error = err
        if attempt + 1 < attempts:
            time.sleep(delay_s * 2**attempt)
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} unreachable after {attempts} attempts ({error}); nothing was logged "
        f"or registered. Start the server, or unset MLFLOW_TRACKING_URI to track in {root / 'mlflow.db'}"
    )


def configure(root: Path) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists, with ``EXPERIMENT_TAGS``
    (set once, also on an experiment made before them); return its id."""
    import mlflow

    check_reachable(root)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        artifacts = None
        if uri.startswith("sqlite:"):
            artifacts = (root / "mlartifacts").resolve().as_uri()
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
    else:
        experiment_id = experiment.experiment_id
        for key, value in EXPERIMENT_TAGS.items():
            if experiment.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ui_url(root: Path, run_id: str) -> str:
    """The MLflow UI page of ``run_id``'s experiment in its model-training view: on the tracking server when
    there is one, else where ``mlflow ui`` on the repository's store serves."""
    import mlflow

    uri = tracking_uri(root)
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_LOCAL
    experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment_id}?{UI_VIEW}"


def git_commit(root: Path) -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@contextlib.contextmanager
def stage_run(root: Path, stage: str, tags: dict[str, str] | None = None) -> Iterator[object]:
    """Open the MLflow run of one stage, nested under the pipeline run when there is one."""
    import mlflow

    configure(root)
    parent = os.environ.get(PARENT_ENV)
    all_tags = {"ddae.stage": stage, "ddae.git_commit": git_commit(root), **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
        all_tags["ddae.pipeline_run"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        yield run


@contextlib.contextmanager
def pipeline_run(root: Path, params: dict[str, object], overrides: dict[str, object] | None = None) -> Iterator[str]:
    """Open the parent MLflow run of one pipeline run; yields its id for the stages to nest under.

    Args:
        params: every param the stages read, by dotted key (params.yaml as this run wrote it).
        overrides: the run's own overrides, also kept as the tag ``ddae.overrides`` (JSON).
    """
    import json

    import mlflow

    configure(root)
    tags = {"ddae.stage": "pipeline", "ddae.git_commit": git_commit(root),
            "ddae.overrides": json.dumps(overrides or {}, sort_keys=True, default=str)[:MAX_TAG_CHARS]}
    with mlflow.start_run(run_name="pipeline", tags=tags) as run:
        if params:
            mlflow.log_params({k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()})
        yield run.info.run_id
        mlflow.set_tags(dvc_output_hashes(root))


def dvc_output_hashes(root: Path) -> dict[str, str]:
    """``dvc.<path>`` -> the md5 DVC recorded for each stage output in dvc.lock (data, checkpoint, ...)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.{out['path']}": out["md5"] for stage in stages.values()
            for out in stage.get("outs", []) if "md5" in out}


def content_key(sources: Sequence[Path], extra: str = "") -> str:
    """sha256 over every file under ``sources`` (relative names and bytes, sorted) plus ``extra``."""
    digest = hashlib.sha256(extra.encode())
    for source in sources:
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            digest.update(str(path.relative_to(source.parent)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def register_once(model_uri: str, name: str, tags: dict[str, str], key: str) -> Any:
    """Register ``model_uri`` as a version of ``name`` unless a version with content ``key`` exists.

    A register stage retried after a failure (the tracking server dropped mid-way) returns the version
    it registered before instead of a duplicate.
    """
    import mlflow
    from mlflow import MlflowClient

    existing = MlflowClient().search_model_versions(f"name='{name}' and tags.`{CONTENT_TAG}`='{key}'")
    if existing:
        return min(existing, key=lambda v: int(v.version))
    return mlflow.register_model(model_uri, name, tags={**tags, CONTENT_TAG: key})
