"""The process settings every ddae entry point applies: no telemetry, a patient Prefect start, freed
memory kept, and the log level (``ddae -v`` / ``-q``, handed to the stages it starts)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

OFFLINE_SAFE_ENV = {
    # None of the stack's defaults may phone home (and hang) on an offline machine.
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}
PATIENT_START_ENV = {
    # `ddae run` without a Prefect server starts a temporary one and gives up after Prefect's 20 s; its
    # first start on a new machine creates the database, and on two busy cores it timed out.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_offline_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the telemetry-off and patient-start defaults (without overriding the user's choices) and
    return the env."""
    target = os.environ if env is None else env
    for key, value in {**OFFLINE_SAFE_ENV, **PATIENT_START_ENV}.items():
        target.setdefault(key, value)
    return target  # type: ignore[return-value]


LOG_LEVEL_ENV = "DDAE_LOG_LEVEL"  # DEBUG / INFO / WARNING: `ddae -v` / `-q` set it for the stages they start


def configure_logging(fmt: str, level: int | None = None) -> int:
    """Log ``ddae`` at ``level`` (default: ``LOG_LEVEL_ENV``, else INFO); other libraries at INFO, or
    at ``level`` when it is quieter (their DEBUG floods the log). Returns the level."""
    if level is None:
        named = logging.getLevelName(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
        level = named if isinstance(named, int) else logging.INFO
    logging.basicConfig(level=max(level, logging.INFO), format=fmt)
    logging.getLogger("ddae").setLevel(level)
    return level


# glibc malloc settings (mallopt parameter -> value): keep freed memory for reuse instead of handing it
# back to the kernel (trim) or serving mid-size tensors from fresh mappings (mmap threshold at its 32 MiB
# maximum). A training step frees and re-allocates hundreds of MiB; by default each time the pages come
# back zeroed through page faults. Measured on ddpm-cpu: 7x fewer faults, +7% training images/s, the
# same peak memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_REUSE = {_M_TRIM_THRESHOLD: 1 << 30, _M_MMAP_THRESHOLD: 32 << 20}
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
               "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Apply ``MALLOC_REUSE`` to this process; True if glibc took it.

    A no-op (False) off glibc, or when the user set malloc tuning in the environment (theirs wins).
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    return all(mallopt(param, value) == 1 for param, value in MALLOC_REUSE.items())
