"""Batch inference as a Prefect flow: the same code as ``ddae predict``, plus a summary artifact.

Deployed by prefect.yaml as ``ddae-predict/batch``; run it with the source and output as parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.services.outputs.paths import REPO_ENV, resolve_root
from tasks.services.runner.process_env import apply_offline_env


@task(name="predict")
def predict_task(root: str, source: str, output: str, model: str | None, version: int | None,
                 review_threshold: float | None) -> dict:
    """Predict every image of ``source`` into the Parquet file ``output``.

    Returns:
        The run's summary (counts, images/s, model version, the summary line).
    """
    from dataclasses import asdict

    from tasks.services.serving.predict import run_predict

    summary = run_predict(Path(root), source, output, model=model, version=version,
                          review_threshold=review_threshold)
    return {**asdict(summary), "line": summary.line()}


@flow(name="ddae-predict", log_prints=True)
def ddae_predict(source: str, output: str, model: str | None = None, version: int | None = None,
                 review_threshold: float | None = None, repo: str | None = None) -> dict:
    """Predict a folder or archive of images with the champion (or ``model`` / ``version``).

    Args:
        source: folder of images (any depth) or .zip/.tar/.tar.gz archive (relative to the repository).
        output: Parquet file to write (relative paths are relative to the repository).
        model: model URI; default models:/<register.model_name>@champion.
        version: a registered version instead of the champion.
        review_threshold: flag predictions below this confidence; default predict.review_threshold.
        repo: repository root; default: $DDAE_REPO, else the working directory (searched upward).
    """
    apply_offline_env()
    root = resolve_root(repo or os.environ.get(REPO_ENV))
    summary = predict_task(str(root), str(root / source), str(root / output), model, version, review_threshold)
    print(summary["line"])
    create_markdown_artifact(key="ddae-predictions", description="batch inference summary",
                             markdown=f"# ddae batch inference\n\n{summary['line']}\n")
    return summary
