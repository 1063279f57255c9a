"""``python -m tasks.services.runner.dvc_repro STAGE REPORT``: ``dvc repro --single-item STAGE``, and how DVC did it.

``tasks.services.runner.dvc_stage.reproduce`` runs this in a child process instead of the ``dvc`` CLI, so the status
comes from DVC's own decisions rather than from its console text: ``Repo.reproduce`` returns the
stages it brought up to date (none: the stage was unchanged), and the run-cache's ``restore``
succeeds only when DVC checked the outputs out of its cache instead of running the command. The log
(DVC's lines and the stage's own) goes to stdout as under ``dvc repro``; the status goes to REPORT as
JSON. Imports only DVC and the standard library, so starting it costs no more than ``dvc`` does.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

STATUSES = ("ran", "skipped", "restored")
EXIT_DVC_ERROR = 255  # what the dvc CLI exits with on a DvcException (a failed stage, a held lock)
EXIT_INTERRUPTED = 252  # the dvc CLI's code for Ctrl-C


def stage_status(reproduced: bool, restored: bool) -> str:
    """``skipped``: DVC found the stage unchanged; ``restored``: outputs from the run-cache; else ``ran``."""
    if not reproduced:
        return "skipped"
    return "restored" if restored else "ran"


def reproduce_recorded(root: Path, stage: str) -> str:
    """Reproduce ``stage`` alone through DVC's API; return its status. DVC errors propagate."""
    from dvc.repo import Repo
    from dvc.stage.cache import StageCache

    class RecordingStageCache(StageCache):
        """DVC's run-cache, noting each stage whose outputs it checked out instead of a run."""

        def __init__(self, repo):
            super().__init__(repo)
            self.restored: list[str] = []

        def restore(self, stage, *args, **kwargs):  # raises RunCacheNotFoundError when it cannot
            super().restore(stage, *args, **kwargs)
            if not kwargs.get("dry"):
                self.restored.append(stage.addressing)

    with Repo(str(root)) as repo:
        repo.stage_cache = cache = RecordingStageCache(repo)
        reproduced = repo.reproduce(targets=[stage], single_item=True)
        return stage_status(bool(reproduced), bool(cache.restored))  # single item: only this stage


def main(argv: list[str]) -> int:
    """Run the repro in the working directory's repository; exit codes as the ``dvc`` CLI's."""
    from dvc.exceptions import DvcException
    from dvc.ui import ui

    logger = logging.getLogger("dvc")  # the logger `import dvc` gave DVC's console handlers

    if len(argv) != 2:
        sys.stderr.write("usage: python -m tasks.services.runner.dvc_repro STAGE REPORT.json\n")
        return 2
    stage, report = argv
    ui.enable()  # DVC's hints (git add dvc.lock ...), as the CLI prints them
    try:
        status = reproduce_recorded(Path.cwd(), stage)
    except DvcException:
        logger.exception("")  # "ERROR: failed to reproduce ...", "ERROR: Unable to acquire lock ..."
        return EXIT_DVC_ERROR
    except KeyboardInterrupt:
        logger.exception("interrupted by the user")
        return EXIT_INTERRUPTED
    # A private file the parent reads once this process has exited: no reader can see it half-written.
    Path(report).write_text(json.dumps({"stage": stage, "status": status}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
