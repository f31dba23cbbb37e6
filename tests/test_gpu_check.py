"""scripts/gpu_check.sh --dry-run: every stage of the GPU check runs on this CPU with tiny sizes, so the
script a lent GPU runs once is known to work before that GPU time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # five fresh training processes: 1-3 minutes on 2 shared cores
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    cmd = [str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        cmd + ["--work-dir", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "check.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert result["dry_run"] and result["provenance"]["commit"] == head

    stages = result["stages"]
    assert list(stages) == ["baseline", "router_tune", "recipe", "fsdp2", "nf4"]
    assert all(s["tokens_per_s"] > 0 for s in stages.values())
    for name in ("router_tune", "recipe", "fsdp2", "nf4"):
        assert stages[name]["router_dtypes"] == stages[name]["router_state_dtypes"] == ["float32"], name
    assert stages["router_tune"]["frozen_dtypes"] == stages["fsdp2"]["frozen_dtypes"] == ["bfloat16"]
    assert "uint8" in stages["nf4"]["frozen_dtypes"]  # the packed nf4 weights
    assert stages["nf4"]["model_bytes"] < 0.6 * stages["router_tune"]["model_bytes"]  # tiny: embeddings weigh more
    # on a CPU: no GPU memory and no MFU to judge, the rest is judged
    assert result["verdicts"]["mfu"] == result["verdicts"]["plan_error"] == "n/a"
    assert result["verdicts"]["routers_fp32"] == "PASS"
    table = (tmp_path / "out" / "check.md").read_text()
    assert all(f"| {name} |" in table for name in stages)
