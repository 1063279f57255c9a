"""The Prefect flow: the stages through DVC, one MLflow parent run, a results artifact.

Deployed by prefect.yaml as ``ddae-pipeline/default`` (the scheduled ``weekly-retrain`` wraps it in
flows/retrain.py); called directly by ``ddae run``. It shares DVC's cache with ``dvc repro``: nothing is computed twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.services.outputs.paths import REPO_ENV, resolve_root
from tasks.services.params.committed import recover_working_params
from tasks.services.params.editing import flatten
from tasks.services.params.loading import read_params_file
from tasks.services.params.overrides import apply_overrides
from tasks.services.runner.dvc_stage import STAGES
from tasks.services.runner.prefect_tasks import STAGE_TASKS
from tasks.services.runner.process_env import apply_offline_env
from tasks.services.runner.run_lock import hold_run_lock, log_waiting
from tasks.services.tracking.runs import PARENT_ENV, pipeline_run, ui_url


def results_markdown(root: Path, stages: list[dict]) -> str:
    """The run's summary as markdown: stage timings, headline metrics and the probe table."""
    lines = ["# ddae pipeline run", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
    probe_metrics = root / "metrics" / "probe.json"
    metrics = json.loads(probe_metrics.read_text()) if probe_metrics.is_file() else {}
    if "test_auroc" in metrics:  # anomaly mode (data.normal_classes)
        lines += ["", f"**Test AUROC**: {metrics['test_auroc']:.4f} (readout `{metrics['best']['name']}`, fixed)"]
        if "raw_pixels_test_auroc" in metrics:
            lines.append(f"**Raw pixels, same scoring**: {metrics['raw_pixels_test_auroc']:.4f}")
    elif metrics:
        lines += ["", f"**Test accuracy**: {100 * metrics['test_acc']:.2f}% "
                      f"(readout `{metrics['best']['name']}`, chosen on validation)"]
        if "test_balanced_acc" in metrics:  # mean recall per class: plots/probe/per_class.csv, confusion.png
            lines.append(f"**Balanced accuracy**: {100 * metrics['test_balanced_acc']:.2f}%")
        if "raw_pixels_test_acc" in metrics:
            lines.append(f"**Raw pixels, same probe**: {100 * metrics['raw_pixels_test_acc']:.2f}%")
    table = root / "plots" / "probe" / "table.csv"
    if table.is_file():
        rows = [r.split(",") for r in table.read_text().strip().splitlines()]
        lines += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    efficiency = root / "plots" / "evaluate" / "label_efficiency.md"
    if efficiency.is_file():
        lines += ["", "**Label efficiency**", "", efficiency.read_text().strip()]
    register = root / "metrics" / "register.json"
    if register.is_file():
        decision = json.loads(register.read_text())
        lines += ["", f"**Registered** `{decision['model']}` v{decision['version']}; "
                      f"promoted to champion: {decision['promoted']}"]
    return "\n".join(lines) + "\n"


@flow(name="ddae-pipeline", log_prints=True)
def ddae_pipeline(dataset: str | None = None, overrides: dict[str, Any] | None = None,
                  repo: str | None = None, wait: bool = True) -> dict:
    """Run prepare -> pretrain -> extract -> probe -> finetune -> evaluate -> register.

    The whole run holds the repository's run lock (tasks/services/runner/run_lock.py): a second run waits for it
    (``wait``, the default: a scheduled run must not fail because a user is running) or fails.

    Args:
        dataset: shorthand for the ``data.dataset`` override (fashion-mnist, cifar10, imagefolder).
        overrides: dotted params.yaml keys to set first, e.g. {"pretrain.train.steps": 2000}, and
            ``profile`` to write a profile before them; validated before params.yaml changes.
        repo: repository root; default: $DDAE_REPO, else the working directory (searched upward).
        wait: queue behind another run holding the repository instead of failing.

    Returns:
        Per-stage results and the probe metrics.
    """
    apply_offline_env()
    logger = get_run_logger()
    root = resolve_root(repo or os.environ.get(REPO_ENV))
    changes = dict(overrides or {})
    if dataset:
        changes["data.dataset"] = dataset
    with hold_run_lock(root, wait=wait, on_wait=log_waiting(logger, root)):
        recover_working_params(root, logger)
        return _locked_run(root, changes, logger)


def _locked_run(root: Path, changes: dict[str, Any], logger: Any) -> dict:
    """The run itself, under the lock: overrides written, every stage, the summary artifact."""
    apply_overrides(root / "params.yaml", changes)
    params = flatten(read_params_file(root / "params.yaml"))  # what every stage of this run reads
    stages: list[dict] = []
    with pipeline_run(root, params, changes) as run_id:
        logger.info("MLflow pipeline run %s", run_id)
        for stage in STAGES:
            stages.append(STAGE_TASKS[stage](str(root), {PARENT_ENV: run_id}))
    mlflow_ui = ui_url(root, run_id)
    logger.info("MLflow: %s", mlflow_ui)
    markdown = results_markdown(root, stages)
    create_markdown_artifact(markdown=markdown, key="ddae-results", description="ddae pipeline results")
    metrics_path = root / "metrics" / "probe.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {"stages": stages, "probe": metrics, "mlflow_ui": mlflow_ui}


if __name__ == "__main__":
    ddae_pipeline()
