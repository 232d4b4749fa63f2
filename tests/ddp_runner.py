"""Running a 2-process CPU DDP driver script from a test, the one way every DDP test does.

Lightning's ``ddp`` strategy re-launches the driver script for the other ranks, so each driver
is a script of its own (``python <script> <out>``) writing its results under ``out`` for the
test to read. Its environment is this one without the variables a launcher leaves behind
(``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ``PL_*``...), which would make Lightning
believe the ranks were already started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
_LAUNCHER_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_ddp_driver(script: str | Path, out: Path, timeout: float = 300, *args: str) -> None:
    """Run ``python <script> <out> <args>`` from the repository root; fail the test with the
    end of its output if it exits non-zero (or ``timeout`` seconds pass)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARIABLES and not key.startswith("PL_")
    }
    result = subprocess.run(
        [sys.executable, str(script), str(out), *args],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
