"""``python -m tasks.<stage>``: validate params, run the stage, and exit with a code that says what happened.

Stages are what DVC runs and what the Prefect flow reproduces through DVC; both load ``params.yaml``
through ``load_params`` here, so a bad value fails before any work, naming the key. ``--help``
prints what the stage does (its module docstring) and the exit codes; a stage takes no other argument.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Any, Callable, Sequence

from ddae_core.config import ConfigError, PipelineConfig
from tasks.services.outputs.paths import Paths, resolve_root
from tasks.services.params.loading import load_params
from tasks.services.runner.process_env import apply_offline_env, configure_logging, keep_freed_memory

log = logging.getLogger("ddae")

TRANSIENT_MARKER = "failed on I/O (retrying may help)"
EXIT_CODES = {0: "done", 1: "the stage failed (the log says why)", 2: "invalid configuration or arguments",
              75: "transient I/O, e.g. the tracking server did not answer (worth a retry)",
              130: "interrupted (completed checkpoints and outputs are kept)"}


def stage_parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    """``python -m tasks.<stage> [--help]``: the help is the stage module's docstring and the exit codes."""
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())
    return argparse.ArgumentParser(
        prog=f"python -m tasks.{stage}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(doc or f"The {stage} stage.").strip(),
        epilog=f"It takes no other argument: its params come from params.yaml (dvc.yaml runs it so).\n\n"
               f"exit codes:\n{codes}")


def is_transient(err: BaseException) -> bool:
    """I/O that may work on a retry: network errors, an unreachable tracking server."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return type(err).__module__.startswith("mlflow") and "request" in str(err).lower()


def stage_main(stage: str, run: Callable[[PipelineConfig, Paths], dict], argv: Sequence[str] | None = None) -> None:
    """Entry point shared by ``python -m tasks.<stage>``: validate params, run, exit non-zero on error.

    Exit codes (``EXIT_CODES``): 2 invalid configuration (or an argument: ``--help`` is the only one,
    and exits 0 without running), 1 the stage failed, 75 transient I/O (worth a retry), 130 interrupted
    (completed checkpoints and outputs are kept).
    """
    stage_parser(stage, sys.modules[run.__module__].__doc__).parse_args(sys.argv[1:] if argv is None else argv)
    from ddae_core.checkpoint import CheckpointError
    from ddae_core.data import DatasetError
    from ddae_core.pretrained.errors import ImportSourceError
    from tasks.services.tracking.runs import check_reachable

    configure_logging("%(asctime)s %(levelname)s [%(name)s] %(message)s")  # INFO, or what `ddae -v`/`-q` set
    apply_offline_env()
    keep_freed_memory()
    try:
        paths = Paths(resolve_root())
        config = load_params(paths.params)
    except (ConfigError, FileNotFoundError) as err:
        log.error("%s: invalid configuration: %s", stage, err)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops as cleanly as Ctrl-C
    try:
        check_reachable(paths.root)  # a dead tracking server fails the stage before any work
        summary = run(config, paths)
    except KeyboardInterrupt:
        log.error("%s: interrupted; completed checkpoints and outputs are kept", stage)
        sys.exit(130)
    except ConfigError as err:
        log.error("%s: invalid configuration: %s", stage, err)
        sys.exit(2)
    except (StageError, DatasetError, CheckpointError, ImportSourceError) as err:
        log.error("%s failed: %s", stage, err)
        sys.exit(1)
    except Exception as err:
        if is_transient(err):
            log.error("%s %s: %s", stage, TRANSIENT_MARKER, err)
            sys.exit(75)
        raise
    log.info("%s done: %s", stage, json.dumps(summary, default=str))


def _interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so temporary files are removed and finished parts kept."""
    raise KeyboardInterrupt(f"signal {signum}")


class StageError(RuntimeError):
    """A stage cannot proceed (missing input, bad data); the message tells the user what to do."""
