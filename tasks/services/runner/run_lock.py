"""One pipeline run per repository, for its whole length: an exclusive ``flock`` on ``.dvc/tmp/ddae-run.lock``.

DVC locks the repository per command, i.e. per stage; between two stages of one run a second run could
rewrite params.yaml. ``ddae run``, the pipeline flows and ``ddae profile`` take this lock before
params.yaml is touched and release it after the last stage (a second one fails at once, or waits). The kernel drops a ``flock`` when its
holder dies, so a killed run leaves no stale lock. The holder records its pid, start time and command
line in the locked file itself (rewritten in place: a renamed-over file would move the lock to a dead
inode), so a refused or waiting run can say whom it waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

LOCK_FILE = Path(".dvc") / "tmp" / "ddae-run.lock"  # .dvc/tmp is git-ignored (.dvc/.gitignore)
BUSY_EXIT_CODE = 75  # EX_TEMPFAIL: nothing is wrong with the request; try again when the holder is done


@dataclass(frozen=True)
class Holder:
    """Who holds the lock: read from the lock file (fields empty when it has not written them yet)."""

    pid: int | None
    since: str
    command: str

    def describe(self) -> str:
        if self.pid is None:
            return "it has not recorded its pid yet"
        return f"pid {self.pid}, since {self.since}: {self.command}"


class RepositoryBusy(RuntimeError):
    """Another pipeline run holds the repository; ``holder`` says who."""

    def __init__(self, root: Path, holder: Holder):
        super().__init__(f"another pipeline run holds {root} ({holder.describe()}); wait for it to finish "
                         f"(`ddae run --wait` queues behind it; the lock: {root / LOCK_FILE})")
        self.holder = holder


def log_waiting(log: logging.Logger | logging.LoggerAdapter, root: Path) -> Callable[[Holder], None]:
    """An ``on_wait`` that says, once, whom this run queues behind."""
    return lambda holder: log.warning("waiting for the pipeline run holding %s (%s)", root, holder.describe())


def _read_holder(fd: int) -> Holder:
    try:
        record = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    pid = record.get("pid")
    return Holder(pid if isinstance(pid, int) else None, str(record.get("since", "")), str(record.get("command", "")))


def _open(root: Path) -> int:
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def recorded_holder(root: Path) -> Holder | None:
    """The holder recorded in ``root``'s lock file, or None when none is (read only; takes no lock)."""
    try:
        fd = os.open(root / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        holder = _read_holder(fd)
    finally:
        os.close(fd)
    return None if holder.pid is None else holder


@contextlib.contextmanager
def hold_run_lock(root: Path, *, wait: bool, command: str | None = None,
                  on_wait: Callable[[Holder], None] | None = None) -> Iterator[Holder]:
    """Hold ``root``'s pipeline lock for the ``with`` block; yields the holder's record.

    A process that holds it already (``ddae run`` around its flow, the retrain flow around the
    pipeline subflow) re-enters it: the inner block neither waits nor releases.

    Args:
        wait: block until the holder is done (calling ``on_wait`` with it first); else raise.
        command: what to record as this run (default: this process's command line).

    Raises:
        RepositoryBusy: the lock is held by another process and ``wait`` is false.
    """
    fd = _open(root)  # not inherited by the stages' subprocesses (PEP 446): only this process holds it
    try:
        if not _try_lock(fd):
            holder = _read_holder(fd)
            if holder.pid == os.getpid():  # recorded while locked, cleared on release: it is ours
                yield holder
                return
            if not wait:
                raise RepositoryBusy(root, holder)
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        me = Holder(os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command or shlex.join(sys.argv))
        record = json.dumps({"pid": me.pid, "since": me.since, "command": me.command}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)  # released: nobody to name
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
