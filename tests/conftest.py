"""Test-wide settings: quiet, offline, bytecode on, and no OpenMP spin-waiting on a busy 2-core machine."""

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
