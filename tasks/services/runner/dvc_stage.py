"""Run one pipeline stage through DVC, so a stage the cache already holds is skipped or restored.

Both the Prefect flow and ``ddae run`` call this; the stage code itself runs as DVC's command
(``python -m tasks.<stage>``), exactly as under ``dvc repro``: one cache, nothing computed twice.
The report (ran, skipped or restored) is DVC's own decision, recorded by ``tasks.services.runner.dvc_repro``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.services.runner.process_env import apply_offline_env
from tasks.services.runner.stage_main import TRANSIENT_MARKER

STAGES = ("snapshot", "prepare", "pretrain", "extract", "probe", "finetune", "evaluate", "register")
DVC_LOCK_ERROR = "Unable to acquire lock"  # what DVC prints when another DVC command holds the repo
LOCKED_MESSAGE = ("another DVC command holds this repository's lock (a second pipeline run?); "
                  "wait for it to finish and rerun")


class StageFailed(RuntimeError):
    """The stage's command failed; its own log above says why. ``transient``: it failed on I/O."""

    def __init__(self, stage: str, returncode: int, transient: bool = False, locked: bool = False):
        super().__init__(f"stage {stage!r} failed with exit code {returncode}"
                         + (" (I/O error; a retry may help)" if transient else "")
                         + (f": {LOCKED_MESSAGE}" if locked else ""))
        self.stage = stage
        self.returncode = returncode
        self.transient = transient


@dataclass(frozen=True)
class StageResult:
    """How DVC brought one stage up to date: ``status`` is one of ``tasks.services.runner.dvc_repro.STATUSES``.

    ``ran``: DVC ran its command; ``skipped``: nothing it depends on changed; ``restored``: DVC
    checked its outputs out of the run-cache (computed before, in this DVC cache or a shared one).
    """

    stage: str
    status: str
    seconds: float


class ProgressThrottle:
    """Pass every log line, but a progress-bar redraw only every ``interval`` s (and at 100%)."""

    def __init__(self, interval: float = 15.0):
        self.interval = interval
        self.last = -float("inf")

    def keep(self, line: str) -> bool:
        if "%|" not in line:
            return bool(line)
        now = time.monotonic()
        if "100%|" in line or now - self.last >= self.interval:
            self.last = now
            return True
        return False


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment stages run in: this interpreter's bin first on PATH, telemetry off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    apply_offline_env(env)
    env.update(extra or {})
    return env


def reproduce(stage: str, root: Path, *, env: dict[str, str] | None = None,
              log_line: Callable[[str], None] = print) -> StageResult:
    """``dvc repro --single-item <stage>``, streaming its output line by line to ``log_line``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddae-stage-") as tmp:
        report = Path(tmp) / "status.json"
        command = [sys.executable, "-m", "tasks.services.runner.dvc_repro", stage, str(report)]
        process = subprocess.Popen(command, cwd=root, env=stage_env(env), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        transient = locked = False
        progress = ProgressThrottle()
        assert process.stdout is not None
        for line in process.stdout:  # universal newlines: each tqdm redraw (\r) arrives as a line
            line = line.rstrip()
            transient = transient or TRANSIENT_MARKER in line
            locked = locked or DVC_LOCK_ERROR in line
            if progress.keep(line):
                log_line(line)
        returncode = process.wait()
        if returncode != 0:
            raise StageFailed(stage, returncode, transient, locked)
        status = json.loads(report.read_text())["status"]
    return StageResult(stage, status, time.perf_counter() - start)
