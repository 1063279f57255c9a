"""The scheduled retraining flow: rerun what new data changed, then report the champion gate.

Runs the pipeline flow (every stage through DVC, so an unchanged dataset reruns nothing and registers
nothing) on the params committed in git: a one-off ``ddae run --set`` left in the working params.yaml
is set aside for the run and put back after it (tasks/services/params/committed.py), under the run lock. When
new images arrived, the register stage has registered the new model as ``challenger``, scored it and
the champion on the new test split, moved ``champion`` only on a gain larger than
``register.min_improvement``, and tagged both versions; this flow publishes that decision as a
Prefect markdown artifact. Deployed by prefect.yaml as ``ddae-retrain/weekly-retrain``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import ddae_pipeline
from tasks.services.outputs.paths import REPO_ENV, resolve_root
from tasks.services.params.committed import on_committed_params, recover_working_params
from tasks.services.runner.process_env import apply_offline_env
from tasks.services.runner.run_lock import hold_run_lock, log_waiting


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def decision_markdown(decision: dict | None, data_version: str) -> str:
    """The gate decision as markdown (or why there was none)."""
    if decision is None:
        return ("# ddae retraining\n\nNothing new: the data version "
                f"`{data_version}` and the code are unchanged, so no model was registered and the "
                "champion did not move.\n")
    champion = decision["champion_version"]
    metric = decision.get("metric", "test_acc")  # test_auroc in anomaly mode
    moved = "moved to" if decision["promoted"] else "stays at"
    lines = [
        "# ddae retraining decision", "",
        f"| role | version | {metric.replace('_', ' ')} |", "|---|---|---|",
        f"| challenger | v{decision['version']} | {_accuracy(decision[metric])} |",
        f"| champion before | {'v' + str(champion) if champion else 'none'} | "
        f"{_accuracy(decision['champion_' + metric])} |", "",
        f"Margin required: {decision['margin']:g}. Promoted: **{decision['promoted']}**; champion {moved} "
        f"v{decision['version'] if decision['promoted'] else champion}.", "",
        f"Data version `{decision['data_checksum']}`, git commit `{decision['git_commit']}`.",
    ]
    return "\n".join(lines) + "\n"


@flow(name="ddae-retrain", log_prints=True)
def ddae_retrain(repo: str | None = None) -> dict:
    """Retrain on the current dataset and gate the champion.

    Args:
        repo: repository root; default: $DDAE_REPO, else the working directory (searched upward).

    Returns:
        {"stages", "registered", "decision"}: decision is None when nothing was registered.
    """
    apply_offline_env()
    logger = get_run_logger()
    root = resolve_root(repo or os.environ.get(REPO_ENV))
    result = pipeline_on_committed_params(root, logger)
    # Only a register stage that ran registered a model; one skipped or restored from the run-cache did not.
    registered = next(s for s in result["stages"] if s["stage"] == "register")["status"] == "ran"
    decision = json.loads((root / "metrics" / "register.json").read_text()) if registered else None
    manifest = json.loads((root / "data" / "prepared" / "manifest.json").read_text())
    markdown = decision_markdown(decision, manifest["checksum"])
    logger.info(markdown)
    create_markdown_artifact(markdown=markdown, key="ddae-retrain-decision", description="champion gate decision")
    return {"stages": result["stages"], "registered": registered, "decision": decision}


def pipeline_on_committed_params(root: Path, logger: Any) -> dict:
    """The pipeline subflow on git's params.yaml (HEAD), the repository held for the whole swap."""
    with hold_run_lock(root, wait=True, on_wait=log_waiting(logger, root)):
        recover_working_params(root, logger)
        with on_committed_params(root, logger):
            return ddae_pipeline(repo=str(root))  # re-enters the lock this process holds


if __name__ == "__main__":
    ddae_retrain()
