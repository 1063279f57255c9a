"""The entry points' own arguments: ``python -m tasks.<stage> --help`` and ``ddae -v`` / ``-q``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.probe
from flows import cli
from tasks.services.runner.process_env import LOG_LEVEL_ENV
from tasks.services.runner.stage_main import EXIT_CODES

REPO = Path(__file__).resolve().parents[2]


def _python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    environ.pop(LOG_LEVEL_ENV, None) if LOG_LEVEL_ENV not in env else None
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)


def test_stage_help_prints_what_the_stage_does_and_its_exit_codes_without_running(tmp_path):
    """In a folder with no params.yaml: a stage that started would exit 2 (invalid configuration)."""
    done = _python(["-m", "tasks.probe", "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "python -m tasks.probe" in done.stdout
    assert tasks.probe.__doc__.splitlines()[0] in done.stdout  # what it reads and writes
    assert "exit codes" in done.stdout and all(f"{code:>3}  {text}" in done.stdout for code, text in EXIT_CODES.items())
    assert done.stderr == "" and not (tmp_path / "metrics").exists()  # no log line: nothing started


def test_a_stage_refuses_an_unknown_argument(tmp_path):
    done = _python(["-m", "tasks.probe", "--epochs", "3"], tmp_path)
    assert done.returncode == 2
    assert "unrecognized arguments: --epochs 3" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv, level", [(["networks"], logging.INFO), (["-v", "networks"], logging.DEBUG),
                                         (["networks", "-q"], logging.WARNING)])
def test_ddae_v_and_q_set_the_log_level_and_hand_it_to_the_stages(argv, level, monkeypatch):
    seen = {}

    def handler(_args, _out) -> int:
        seen["level"] = logging.getLogger("ddae").getEffectiveLevel()
        seen["env"] = os.environ.get(LOG_LEVEL_ENV)
        return 0

    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, "networks", cli.SUBCOMMANDS["networks"].__class__(
        help="", configure=cli.SUBCOMMANDS["networks"].configure, run=handler))
    ddae_log = logging.getLogger("ddae")
    monkeypatch.setattr(ddae_log, "level", ddae_log.level)  # put back after
    assert cli.main(argv) == 0
    assert seen == {"level": level, "env": None if level == logging.INFO else logging.getLevelName(level)}


def test_ddae_refuses_v_with_q():
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["networks", "-v", "-q"])
    assert exit_.value.code == 2


LOGS = ("import logging; from tasks.services.runner.process_env import configure_logging; "
        "configure_logging('%(levelname)s %(name)s %(message)s'); "
        "[logging.getLogger(n).log(level, 'x') for n in ('ddae', 'other') for level in (10, 20, 30)]")


@pytest.mark.parametrize("env, expected", [
    ({}, {"INFO ddae", "WARNING ddae", "INFO other", "WARNING other"}),
    ({LOG_LEVEL_ENV: "DEBUG"}, {"DEBUG ddae", "INFO ddae", "WARNING ddae", "INFO other", "WARNING other"}),
    ({LOG_LEVEL_ENV: "WARNING"}, {"WARNING ddae", "WARNING other"}),
])
def test_a_stage_process_logs_at_the_level_it_was_handed(env, expected, tmp_path):
    done = _python(["-c", LOGS], tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert {line.rsplit(" ", 1)[0] for line in done.stderr.splitlines()} == expected
