"""Stage runs through DVC: the reported status is DVC's decision; progress-bar redraws are throttled."""

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.services.runner.dvc_repro import stage_status
from tasks.services.runner.dvc_stage import ProgressThrottle, StageFailed, reproduce

REPO = Path(__file__).resolve().parents[2]


def test_progress_redraws_are_throttled_but_messages_and_completion_pass():
    throttle = ProgressThrottle(interval=3600)
    bars = [f"pretrain:  {i}%|#   | {i}/100 [00:01<00:10]" for i in range(1, 100)]
    kept = [line for line in ["Running stage 'pretrain':", *bars, "pretrain: 100%|####| 100/100", "done", ""]
            if throttle.keep(line)]
    assert kept == ["Running stage 'pretrain':", bars[0], "pretrain: 100%|####| 100/100", "done"]


def test_progress_passes_again_after_the_interval():
    throttle = ProgressThrottle(interval=0.0)
    assert all(throttle.keep(f"x: {i}%| {i}/9") for i in range(3))


def test_status_is_skipped_unless_reproduced_and_restored_only_from_the_run_cache():
    assert stage_status(reproduced=False, restored=False) == "skipped"
    assert stage_status(reproduced=True, restored=False) == "ran"
    assert stage_status(reproduced=True, restored=True) == "restored"


# One trivial stage (named like a pipeline stage): writes params.yaml's n to out.txt and appends a
# line to runs.log (not tracked by DVC) each time its command really runs.
STAGE_CMD = ("python -c \"import pathlib, yaml; n = yaml.safe_load(open('params.yaml'))['n']; "
             "pathlib.Path('out.txt').write_text(str(n)); open('runs.log', 'a').write('run\\n')\"")


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=root,
                   check=True, capture_output=True)


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "params.yaml").write_text("n: 1\n")
    (root / "dvc.yaml").write_text(
        f"stages:\n  prepare:\n    cmd: {STAGE_CMD}\n    params:\n      - n\n    outs:\n      - out.txt\n")
    return root


def _reproduce(root: Path, lines: list[str] | None = None) -> str:
    env = {"PYTHONPATH": str(REPO)}  # the tiny repository has no tasks/ of its own
    return reproduce("prepare", root, env=env, log_line=(lines.append if lines is not None else lambda _: None)).status


def _runs(root: Path) -> int:
    return len((root / "runs.log").read_text().splitlines())


def test_status_follows_what_dvc_did_ran_skipped_restored(tiny_repo):
    """A run, a no-op rerun, a param change, then the param reverted: DVC restores the first outputs."""
    lines: list[str] = []
    assert _reproduce(tiny_repo, lines) == "ran" and _runs(tiny_repo) == 1
    assert any("Running stage 'prepare'" in line for line in lines), lines  # DVC's log is streamed
    assert _reproduce(tiny_repo) == "skipped" and _runs(tiny_repo) == 1

    (tiny_repo / "params.yaml").write_text("n: 2\n")
    assert _reproduce(tiny_repo) == "ran" and _runs(tiny_repo) == 2
    assert (tiny_repo / "out.txt").read_text() == "2"

    (tiny_repo / "params.yaml").write_text("n: 1\n")  # a reverted param: the run-cache holds its outputs
    assert _reproduce(tiny_repo) == "restored"
    assert _runs(tiny_repo) == 2 and (tiny_repo / "out.txt").read_text() == "1"


def test_a_clone_without_outputs_restores_them_from_the_run_cache(tiny_repo):
    """As on a second machine that pulled the run-cache: no dvc.lock, no outputs, nothing recomputed."""
    assert _reproduce(tiny_repo) == "ran"
    (tiny_repo / "dvc.lock").unlink()
    (tiny_repo / "out.txt").unlink()
    assert _reproduce(tiny_repo) == "restored"
    assert _runs(tiny_repo) == 1 and (tiny_repo / "out.txt").read_text() == "1"


def test_a_failing_stage_raises_with_dvc_error_in_the_log(tiny_repo):
    (tiny_repo / "params.yaml").write_text("m: 1\n")  # the command's KeyError; DVC: param missing
    lines: list[str] = []
    with pytest.raises(StageFailed) as info:
        _reproduce(tiny_repo, lines)
    assert info.value.returncode == 255 and not (tiny_repo / "runs.log").exists()
    assert any(line.startswith("ERROR") for line in lines), lines


def test_ddae_run_has_words_for_every_status():
    from flows.cli import STATUS_WORDS
    from tasks.services.runner.dvc_repro import STATUSES

    assert set(STATUS_WORDS) == set(STATUSES)
