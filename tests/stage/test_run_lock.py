"""One pipeline run per repository: the run lock refuses or queues a second run, and dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.services.runner.run_lock import RepositoryBusy, hold_run_lock, recorded_holder

REPO = Path(__file__).resolve().parents[2]

HOLD = """
import sys
from pathlib import Path
from tasks.services.runner.run_lock import hold_run_lock
with hold_run_lock(Path(sys.argv[1]), wait=False, command="holder under test"):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says release
"""

WAIT = """
import sys
from pathlib import Path
from tasks.services.runner.run_lock import hold_run_lock
with hold_run_lock(Path(sys.argv[1]), wait=True,
                   on_wait=lambda h: print(f"waiting for pid {h.pid}: {h.command}", flush=True)):
    print("acquired", flush=True)
"""


def python(code: str, root: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, str(root)], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kwargs)


@pytest.fixture()
def holder(tmp_path):
    """A process holding tmp_path's lock until its stdin gets a line."""
    process = python(HOLD, tmp_path, stdin=subprocess.PIPE)
    assert process.stdout.readline().strip() == "held"
    yield process
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def release(process: subprocess.Popen) -> None:
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.wait(timeout=30) == 0


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path, holder):
    recorded = recorded_holder(tmp_path)
    assert recorded is not None and recorded.pid == holder.pid and recorded.command == "holder under test"
    with pytest.raises(RepositoryBusy, match=rf"another pipeline run holds {tmp_path} \(pid {holder.pid}, since "
                                             r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d.*: holder under test\).*--wait"):
        with hold_run_lock(tmp_path, wait=False):
            pytest.fail("entered a lock another process holds")
    release(holder)
    assert recorded_holder(tmp_path) is None  # released: nobody recorded
    with hold_run_lock(tmp_path, wait=False, command="next") as me:
        assert me.pid == os.getpid() and recorded_holder(tmp_path) == me


def test_a_waiting_run_says_whom_it_waits_for_and_goes_on_after_the_release(tmp_path, holder):
    waiter = python(WAIT, tmp_path)
    try:
        assert waiter.stdout.readline().strip() == f"waiting for pid {holder.pid}: holder under test"
        assert waiter.poll() is None  # blocked in flock while the holder lives
        release(holder)
        assert waiter.stdout.readline().strip() == "acquired"
        assert waiter.wait(timeout=30) == 0
    finally:
        if waiter.poll() is None:
            waiter.kill()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert recorded_holder(tmp_path).pid == holder.pid  # its record stays behind ...
    with hold_run_lock(tmp_path, wait=False) as me:  # ... but the kernel dropped its lock
        assert recorded_holder(tmp_path) == me


def test_the_holding_process_re_enters_and_keeps_the_lock_until_the_outer_block_ends(tmp_path):
    with hold_run_lock(tmp_path, wait=False) as outer:
        with hold_run_lock(tmp_path, wait=False) as inner:  # ddae run -> flow; retrain -> pipeline subflow
            assert inner == outer
        assert recorded_holder(tmp_path) == outer
        other = python(WAIT.replace("wait=True", "wait=False"), tmp_path)
        out, _ = other.communicate(timeout=60)
        assert other.returncode != 0 and f"pid {os.getpid()}" in out, out
    other = python(WAIT.replace("wait=True", "wait=False"), tmp_path)
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0 and out.strip() == "acquired", out


def test_the_lock_lives_in_git_ignored_dvc_tmp(tmp_path):
    with hold_run_lock(tmp_path, wait=False):
        assert (tmp_path / ".dvc" / "tmp" / "ddae-run.lock").is_file()
    ignored = (REPO / ".dvc" / ".gitignore").read_text().split()
    assert "/tmp" in ignored
