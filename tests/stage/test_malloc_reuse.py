"""Stage processes keep freed memory for reuse: repeated tensor-sized allocations stop page-faulting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocate and free 76 MB in four arrays (8-28 MB, the sizes of ddpm-cpu activations) seven times and
# count the minor page faults of the last five rounds.
_CHURN = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from tasks.services.runner.process_env import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "reuse" else None
    def churn():
        arrays = [np.ones(n) for n in (1_000_000, 3_000_000, 2_000_000, 3_500_000)]
        del arrays
    churn(); churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        churn()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"applied": applied, "faults": faults}))
""")
_PAGES_PER_ROUND = 9_500_000 * 8 // 4096


def _churn(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_reused_memory_stops_page_faults_that_the_default_malloc_takes() -> None:
    default, reuse = _churn("default"), _churn("reuse")
    assert reuse["applied"] is True
    assert reuse["faults"] <= 0.01 * _PAGES_PER_ROUND, reuse
    assert default["faults"] > 10 * max(reuse["faults"], 1.0), (default, reuse)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_users_own_malloc_tuning_wins() -> None:
    assert _churn("reuse", MALLOC_TRIM_THRESHOLD_="131072")["applied"] is False
