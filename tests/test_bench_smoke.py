"""Every benchmark of scripts/ runs end to end with --smoke (one tiny step of every part) and writes its
JSON and markdown, so a benchmark is known to work before hours of machine time are spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = {  # module: (output name, extra arguments)
    "bench": ("results", []),
    "bench_export": ("export", []),
    "bench_cpu_dtype": ("cpu-dtype", []),
    "compare_balancing": ("balancing", []),
    "saturated_demo": ("saturated", []),
    "bench_quality": ("quality", []),
    "bench_balance": ("balance", []),
    "bench_quant": ("quant", []),
    "bench_scale": ("scale", ["--configs", "single", "fsdp2", "zero3", "baseline", "export", "peak", "activations"]),
}


@pytest.mark.slow  # fresh training processes: up to a few minutes each on 2 shared cores
@pytest.mark.parametrize("module", list(BENCHMARKS))
def test_benchmark_smoke(module, tmp_path):
    name, extra = BENCHMARKS[module]
    work_flag = "--work" if module in ("bench_quant", "bench_scale", "bench_balance") else "--work-dir"
    work = [work_flag, str(tmp_path / "work")]
    cmd = [sys.executable, "-m", f"scripts.{module}", "--smoke", "--out", str(tmp_path / "out"), *work, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert data and (tmp_path / "out" / f"{name}.md").read_text().strip()
    if module == "bench_scale":
        assert not any(c.get("failed") for c in data["configs"].values()), data["configs"]
    # the markdown renders again from the JSON alone
    again = subprocess.run(
        [sys.executable, "-m", f"scripts.{module}", "--render", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
