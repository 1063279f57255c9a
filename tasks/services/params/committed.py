"""Run on the params committed in git: the scheduled retrain must not inherit the last one-off override.

``ddae run --set`` and deployment overrides stay in the working params.yaml. The retrain flow, holding
the repository's run lock (tasks/services/runner/run_lock.py), puts ``git show HEAD:params.yaml`` in its place for the
run and the working copy back afterwards, kept meanwhile in ``.dvc/tmp/ddae-params.working.yaml``.
A retrain killed mid-run leaves that backup behind; whoever takes the lock next puts it back first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

from ddae_core.atomic import write_bytes_atomic

BACKUP = Path(".dvc") / "tmp" / "ddae-params.working.yaml"
PARAMS = "params.yaml"


def committed_params(root: Path) -> bytes | None:
    """params.yaml as committed at HEAD, or None (no git, no commit, not tracked)."""
    try:
        result = subprocess.run(["git", "show", f"HEAD:./{PARAMS}"], cwd=root, capture_output=True,
                                timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def recover_working_params(root: Path, log: logging.Logger | logging.LoggerAdapter) -> bool:
    """Put back a working params.yaml that a killed run left aside; True if there was one.

    Call it holding the run lock, before params.yaml is read.
    """
    if not _restore(root):
        return False
    log.warning("restored the working %s that an interrupted run on the committed params had kept in %s",
                PARAMS, BACKUP)
    return True


def _restore(root: Path) -> bool:
    backup = root / BACKUP
    if not backup.is_file():
        return False
    write_bytes_atomic(root / PARAMS, backup.read_bytes())
    os.unlink(backup)
    return True


@contextlib.contextmanager
def on_committed_params(root: Path, log: logging.Logger | logging.LoggerAdapter) -> Iterator[bool]:
    """Within the block, params.yaml is HEAD's; afterwards (even on errors) the working copy is back.

    Yields whether the file was swapped. Without git or a commit, the working params are used, with
    a warning. Call it holding the run lock, after ``recover_working_params``.
    """
    params = root / PARAMS
    committed = committed_params(root)
    if committed is None:
        log.warning("no committed %s (not a git repository, or no commit yet): running the working copy",
                    PARAMS)
        yield False
        return
    working = params.read_bytes()
    if working == committed:
        yield False
        return
    log.warning("the working %s differs from the committed one (git diff %s shows how): this run uses "
                "the committed params; the working copy is kept in %s and put back afterwards",
                PARAMS, PARAMS, BACKUP)
    write_bytes_atomic(root / BACKUP, working)
    write_bytes_atomic(params, committed)
    try:
        yield True
    finally:
        _restore(root)
        log.info("put the working %s back", PARAMS)
