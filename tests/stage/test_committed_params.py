"""The scheduled retrain runs the params committed in git, and always puts the working copy back."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.services.params.committed import BACKUP, committed_params, on_committed_params, recover_working_params
from tasks.services.runner.run_lock import recorded_holder

REPO = Path(__file__).resolve().parents[2]
COMMITTED = b"pretrain:\n  train:\n    lr: 0.0005          # the committed value\n"
WORKING = b"pretrain:\n  train:\n    lr: 0.0009          # a one-off override\n"
log = logging.getLogger("test")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false",
                    *args], cwd=root, check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A git repository whose committed params.yaml differs from the working one."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "params.yaml").write_bytes(COMMITTED)
    git(root, "add", "params.yaml")
    git(root, "commit", "-q", "-m", "params")
    (root / "params.yaml").write_bytes(WORKING)
    return root


def test_the_block_runs_on_the_committed_params_and_the_working_copy_comes_back(repo, caplog):
    with caplog.at_level(logging.WARNING, logger="test"):
        with on_committed_params(repo, log) as swapped:
            assert swapped and (repo / "params.yaml").read_bytes() == COMMITTED
            assert (repo / BACKUP).read_bytes() == WORKING
    assert (repo / "params.yaml").read_bytes() == WORKING and not (repo / BACKUP).exists()
    assert "differs from the committed one" in caplog.text


def test_a_failing_run_still_gets_the_working_copy_back(repo):
    with pytest.raises(RuntimeError, match="stage failed"):
        with on_committed_params(repo, log):
            raise RuntimeError("stage failed")
    assert (repo / "params.yaml").read_bytes() == WORKING and not (repo / BACKUP).exists()


def test_equal_params_are_left_alone(repo):
    (repo / "params.yaml").write_bytes(COMMITTED)
    with on_committed_params(repo, log) as swapped:
        assert not swapped and not (repo / BACKUP).exists()
    assert (repo / "params.yaml").read_bytes() == COMMITTED


@pytest.mark.parametrize("setup", ["no-git", "no-commit"])
def test_without_a_commit_the_working_params_run_with_a_warning(tmp_path, caplog, setup):
    root = tmp_path / setup
    root.mkdir()
    if setup == "no-commit":
        git(root, "init", "-q")
    (root / "params.yaml").write_bytes(WORKING)
    assert committed_params(root) is None
    with caplog.at_level(logging.WARNING, logger="test"):
        with on_committed_params(root, log) as swapped:
            assert not swapped and (root / "params.yaml").read_bytes() == WORKING
    assert "no committed params.yaml" in caplog.text


SWAP_AND_HANG = """
import logging, sys
from pathlib import Path
from tasks.services.params.committed import on_committed_params
with on_committed_params(Path(sys.argv[1]), logging.getLogger("retrain")):
    print("swapped", flush=True)
    sys.stdin.readline()
"""


def test_a_killed_retrain_leaves_a_backup_that_the_next_lock_holder_puts_back(repo, caplog):
    process = subprocess.Popen([sys.executable, "-c", SWAP_AND_HANG, str(repo)], env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "swapped"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert (repo / "params.yaml").read_bytes() == COMMITTED and (repo / BACKUP).read_bytes() == WORKING
    with caplog.at_level(logging.WARNING, logger="test"):
        assert recover_working_params(repo, log)
    assert (repo / "params.yaml").read_bytes() == WORKING and not (repo / BACKUP).exists()
    assert "restored the working params.yaml" in caplog.text
    assert not recover_working_params(repo, log)  # nothing left to do


def test_ddae_profile_puts_back_a_killed_retrain_backup_before_applying(repo, capsys):
    """`ddae profile` takes the run lock: it first restores the working copy, then writes the profile into it."""
    from flows.cli import main

    (repo / "profiles").mkdir()
    (repo / "profiles" / "fast.yaml").write_text("pretrain:\n  train:\n    steps: 5\n")
    (repo / "params.yaml").write_bytes(COMMITTED)
    (repo / BACKUP).parent.mkdir(parents=True, exist_ok=True)
    (repo / BACKUP).write_bytes(WORKING)  # as a killed retrain leaves it
    assert main(["profile", "fast", "--repo", str(repo)]) == 0
    assert (repo / "params.yaml").read_text() == WORKING.decode() + "    steps: 5\n"
    assert not (repo / BACKUP).exists()
    assert "pretrain.train.steps: None -> 5" in capsys.readouterr().out


def test_the_retrain_flow_runs_the_pipeline_on_committed_params_holding_the_lock(repo, monkeypatch):
    import flows.retrain as retrain

    seen = {}

    def fake_pipeline(repo: str) -> dict:
        seen["params"] = (Path(repo) / "params.yaml").read_bytes()
        seen["holder"] = recorded_holder(Path(repo))
        return {"stages": []}

    monkeypatch.setattr(retrain, "ddae_pipeline", fake_pipeline)
    assert retrain.pipeline_on_committed_params(repo, log) == {"stages": []}
    assert seen["params"] == COMMITTED and seen["holder"].pid == os.getpid()
    assert (repo / "params.yaml").read_bytes() == WORKING and recorded_holder(repo) is None
