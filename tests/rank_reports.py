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
import sys

PREFIX = "REPORT "


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
