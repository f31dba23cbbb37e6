"""llama.cpp's converter reads a legacy-layout export of trained routers (slow: downloads the
llama-cpp-python sdist from PyPI once; `make test-slow`)."""

import subprocess
import sys
from pathlib import Path

import pytest

from router_tune.export.exporter import export_run
from tests.cli_runs import write_recipe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "router_tune" / "assets" / "demo-moe"


@pytest.mark.slow
def test_llama_cpp_converter_reads_the_export(tmp_path):
    from router_tune.cli import main

    recipe = write_recipe(tmp_path, DEMO, max_steps=2, save_steps=100, block_size=256)
    assert main(["train", str(recipe)]) == 0
    out = export_run(tmp_path / "run", tmp_path / "export", layout="legacy")
    check = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "check_gguf.py"),
            str(out),
            "--routers",
            str(tmp_path / "run" / "routers.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-3000:]
    assert "routers of 4 layers equal the export's and the trained routers" in check.stdout
