"""One JSON report per rank of a launched test script, printed by the ranks and read back by the test.

All ranks write to the one stdout pipe the test captures. A plain `print(..., flush=True)` flushes
whatever the rank's buffer already holds (DeepSpeed logs to stdout) together with the report, and a
pipe write over PIPE_BUF (4096 bytes) is not atomic: another rank's report then lands inside the
line (seen once in tests/test_zero3.py: two reports joined on one line). So the buffer is flushed
first and the report goes out as one write of its own, well under PIPE_BUF.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

PREFIX = "REPORT "
# launched CPU ranks: accelerate on gloo, one thread each (two ranks share the 2 cores), wandb offline
CPU_RANKS_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def print_report(report: dict) -> None:
    sys.stdout.flush()
    line = (PREFIX + json.dumps(report) + "\n").encode()
    if len(line) >= 4096:
        raise ValueError(f"a rank report must stay under PIPE_BUF (4096 bytes) to be written atomically: {len(line)}")
    os.write(sys.stdout.fileno(), line)


def read_reports(stdout: str) -> list[dict]:
    """The reports in a launch's captured stdout, by rank."""
    reports = (json.loads(line[len(PREFIX) :]) for line in stdout.splitlines() if line.startswith(PREFIX))
    return sorted(reports, key=lambda r: r["rank"])


def run_and_read_reports(cmd: list[str], timeout: int, env: dict | None = None) -> list[dict]:
    """Run a launch (or one process) of a test script to the end and return its ranks' reports."""
    proc = subprocess.run(cmd, env=env or CPU_RANKS_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return read_reports(proc.stdout)
