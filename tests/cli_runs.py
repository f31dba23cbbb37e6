"""Running `router-tune` as users do, shared by the CLI tests: a small recipe on a tiny model and the
bundled samples, and a free port for launched ranks."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "router_tune" / "assets" / "samples"


def write_recipe(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    recipe = {
        "model_name_or_path": str(model_dir),
        "datasets": [
            {"source": "redpajama", "path": str(SAMPLES / "redpajama"), "weight": 0.75, "max_documents": 200},
            {"source": "wizard_vicuna", "path": str(SAMPLES / "wizard_vicuna"), "weight": 0.25, "max_documents": 200},
        ],
        "block_size": 64,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 0.3,
        "save_steps": 2,
        "logging_steps": 1,
        "routing_log_every": 2,
        "output_dir": str(tmp_path / "run"),
        "use_cpu": True,
        "eval_before_after": False,
        "dataloader_num_workers": 0,
    }
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m router_tune ARGS` in a fresh process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "router_tune", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
