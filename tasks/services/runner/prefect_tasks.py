"""One named Prefect task per pipeline stage; each reproduces its stage through DVC.

Only I/O failures are retried (a stage exits 75 when the tracking server or network failed);
a bad dataset or a failed training run is not retried, since it would fail the same way again.
"""

from __future__ import annotations

from pathlib import Path

from prefect import Task, get_run_logger, task

from tasks.services.runner.dvc_stage import STAGES, StageFailed, reproduce


def _retry_on_io(task_: Task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything else is not an I/O hiccup
        return False
    return False


def _make_stage_task(stage: str) -> Task:
    @task(name=stage, retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_on_io,
          task_run_name=f"{stage}")
    def run_stage(root: str, env: dict[str, str] | None = None) -> dict:
        """Reproduce the stage via DVC, streaming its log.

        Args:
            root: repository root (holds params.yaml and dvc.yaml).
            env: extra environment for the stage (the pipeline's MLflow run id).

        Returns:
            {"stage", "status", "seconds"}; status: "ran", "skipped" (unchanged) or "restored"
            (outputs from DVC's run-cache), as DVC decided.
        """
        logger = get_run_logger()
        result = reproduce(stage, Path(root), env=env, log_line=logger.info)
        return {"stage": result.stage, "status": result.status, "seconds": round(result.seconds, 1)}

    run_stage.__name__ = f"{stage}_task"
    return run_stage


STAGE_TASKS: dict[str, Task] = {stage: _make_stage_task(stage) for stage in STAGES}
