"""The launcher dvc.yaml starts pretrain and extract with: one process, or accelerate launch over N."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import stage_code as sc
from ddae_core.config import ConfigError, LaunchConfig, PipelineConfig
from tasks.services.runner.launch import launch_argv, launch_env

REPO = Path(__file__).resolve().parents[2]


def test_one_process_is_the_stage_module_itself():
    assert launch_argv("tasks.pretrain", LaunchConfig(), python="py") == ["py", "-m", "tasks.pretrain"]


def test_n_processes_go_through_accelerate_launch_with_the_users_arguments():
    launch = LaunchConfig(processes=4, args="--num_machines 2 --machine_rank 1 --main_process_ip '10.0.0.1'")
    assert launch_argv("tasks.extract", launch, python="py") == [
        "py", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4",
        "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "-m", "tasks.extract"]


def test_n_cpu_processes_need_accelerate_use_cpu_and_passive_openmp_and_gpus_do_not():
    four = LaunchConfig(processes=4)
    assert launch_env(four, {"A": "1"}, gpu=False) == {"A": "1", "ACCELERATE_USE_CPU": "true",
                                                       "OMP_WAIT_POLICY": "PASSIVE"}
    assert launch_env(four, {"A": "1"}, gpu=True) == {"A": "1"}
    theirs = {"ACCELERATE_USE_CPU": "false", "OMP_WAIT_POLICY": "ACTIVE"}
    assert launch_env(four, theirs, gpu=False) == theirs
    one = launch_env(LaunchConfig(), {}, gpu=False)
    assert "ACCELERATE_USE_CPU" not in one and "OMP_WAIT_POLICY" not in one  # one process: OpenMP's default


def test_every_entry_points_environment_leaves_openmp_waiting_to_openmp():
    from tasks.services.runner.process_env import apply_offline_env

    env = apply_offline_env({})
    assert env["DO_NOT_TRACK"] == "true" and env["DVC_NO_ANALYTICS"] == "1"
    assert "OMP_WAIT_POLICY" not in env  # a passive wait made one process's fits a third slower


def test_the_temporary_prefect_server_gets_time_to_start_unless_the_user_says_otherwise():
    from tasks.services.runner.process_env import apply_offline_env

    assert apply_offline_env({})["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"  # Prefect's: 20
    theirs = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "30"}
    assert apply_offline_env(dict(theirs)) == {**apply_offline_env({}), **theirs}


@pytest.mark.parametrize("section, key", [({"processes": 0}, "launch.processes"),
                                          ({"args": "--main_process_ip '10.0"}, "launch.args")])
def test_a_bad_launch_setting_is_named(section, key):
    with pytest.raises(ConfigError, match=key):
        PipelineConfig.from_dict({"launch": section})


def test_dvc_runs_pretrain_and_extract_through_the_launcher_without_the_count_as_a_param():
    stages = sc.dvc_stages()
    for stage in ("pretrain", "extract"):
        assert sc.entry_modules(stages[stage]) == ["tasks.services.runner.launch", f"tasks.{stage}"]
        params = [p if isinstance(p, str) else next(iter(p)) for p in stages[stage].get("params", [])]
        assert not any(p == "launch" or p.startswith("launch.") for p in params)
        assert "tasks/services/runner/launch.py" in sc.stage_code(stage)
    assert not any("launch" in str(spec.get("params", [])) for spec in stages.values())


STUB = """
import json, os, sys
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "module": __name__,
                  "use_cpu": os.environ.get("ACCELERATE_USE_CPU")}))
"""


def run_launcher(root: Path, module: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(root)])}
    return subprocess.run([sys.executable, "-m", "tasks.services.runner.launch", "-m", module], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_one_process_runs_the_module_in_the_launchers_own_process(tmp_path):
    (tmp_path / "params.yaml").write_text("launch:\n  processes: 1\n")
    (tmp_path / "stub_stage.py").write_text(STUB)
    process = subprocess.Popen([sys.executable, "-m", "tasks.services.runner.launch", "-m", "stub_stage"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])})
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"pid": process.pid, "argv": [], "module": "__main__", "use_cpu": None}  # exec'd, not a child
    assert "launch: stub_stage on 1 process(es)" in err


def test_an_invalid_params_file_stops_the_launcher_with_exit_code_2(tmp_path):
    (tmp_path / "params.yaml").write_text("launch:\n  processes: -1\n")
    result = run_launcher(tmp_path, "stub_stage")
    assert result.returncode == 2 and "launch.processes: must be >= 1, got -1" in result.stderr
