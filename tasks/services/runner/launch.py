"""``python -m tasks.services.runner.launch -m tasks.<stage>``: start a stage on ``launch.processes`` processes.

dvc.yaml runs pretrain and extract through this, so ``dvc repro`` itself trains on N GPUs: one process
execs ``python -m tasks.<stage>``; N > 1 exec ``accelerate launch --multi_gpu --num_processes N
<launch.args> -m tasks.<stage>`` (on a machine without a GPU with ``ACCELERATE_USE_CPU=true``: N gloo
processes; ``--cpu`` alone would start one). ``launch`` is not a param of those stages: their results
do not depend on the process count, so changing it reruns nothing.
"""

from __future__ import annotations

import logging
import os
import sys

from ddae_core.config import ConfigError, LaunchConfig
from tasks.services.outputs.paths import Paths, resolve_root
from tasks.services.params.loading import load_params
from tasks.services.runner.process_env import configure_logging

log = logging.getLogger("ddae")

USAGE = "usage: python -m tasks.services.runner.launch -m MODULE"


def launch_argv(module: str, launch: LaunchConfig, python: str = sys.executable) -> list[str]:
    """The command that runs ``python -m module`` on ``launch.processes`` processes."""
    if launch.processes == 1:
        return [python, "-m", module]
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(launch.processes),
            *launch.arguments(), "-m", module]


def launch_env(launch: LaunchConfig, env: dict[str, str], gpu: bool) -> dict[str, str]:
    """``env`` for the command, the user's settings winning: N CPU processes need ``ACCELERATE_USE_CPU=true``,
    and share the cores, so their OpenMP threads sleep at once when idle (``OMP_WAIT_POLICY=PASSIVE``)
    instead of spinning on a core another process needs. One process keeps OpenMP's default: a short
    spin before sleeping, which its many small ops need (passive costs one CPU process 15% of its
    training steps and a third of its probe fits)."""
    if launch.processes > 1 and not gpu:
        return {"ACCELERATE_USE_CPU": "true", "OMP_WAIT_POLICY": "PASSIVE", **env}
    return dict(env)


def main(argv: list[str]) -> int:
    """Read ``launch`` from params.yaml and exec the command (returns only on a usage or config error)."""
    configure_logging("%(asctime)s %(levelname)s [%(name)s] %(message)s")
    if len(argv) != 2 or argv[0] != "-m":
        sys.stderr.write(USAGE + "\n")
        return 2
    module = argv[1]
    try:
        launch = load_params(Paths(resolve_root()).params).launch
    except (ConfigError, FileNotFoundError) as err:
        log.error("%s: invalid configuration: %s", module, err)
        return 2
    gpu = False
    if launch.processes > 1:
        from ddae_core.devices import pick_device

        gpu = pick_device().type == "cuda"
    command = launch_argv(module, launch)
    log.info("launch: %s on %d process(es): %s", module, launch.processes, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, launch_env(launch, dict(os.environ), gpu))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
