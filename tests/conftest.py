"""Test-wide settings: quiet, offline, bytecode on, and no OpenMP spin-waiting on a busy 2-core machine;
how many pytest-xdist workers, and each one's share of the cores."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for key, value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(key, value)
# Every subprocess writes __pycache__/ next to the code, as a user's Python does: caching tests must
# see it (this process already imported with the setting it was started with).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

CORES = len(os.sched_getaffinity(0))  # the cores this run may use
# A pytest-xdist worker, and every process it starts, computes on its share of the cores: two workers on
# two cores each with two OpenMP threads would fight over them (this process has not imported torch yet).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, CORES // _workers)))

MAX_AUTO_WORKERS = 4  # beyond this the end-to-end files leave workers idle, and each worker takes ~1 GiB


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's default, with ``--dist loadfile``): a worker a core, at most four.

    A file's tests share a worker, in the order they are written, so module fixtures (test_pipeline_e2e.py's
    tiny project, built by one ``dvc repro``) are built once.
    """
    return max(1, min(MAX_AUTO_WORKERS, CORES))
