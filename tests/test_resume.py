"""A run killed with SIGKILL, several times and at random points, resumes with the documented
command (`--resume_from_checkpoint true`) and ends with the routers of an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from router_tune.training.checkpoints import COMPLETE, checkpoints, is_complete

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "router_tune" / "assets" / "samples"
STEPS, SAVE_EVERY = 40, 4


def write_recipe(path: Path, model_dir: Path) -> Path:
    recipe = {
        "model_name_or_path": str(model_dir),
        "datasets": [
            {"source": "redpajama", "path": str(SAMPLES / "redpajama"), "weight": 0.7},
            {"source": "wizard_vicuna", "path": str(SAMPLES / "wizard_vicuna"), "weight": 0.3},
        ],
        "block_size": 64,
        "per_device_train_batch_size": 2,
        "max_steps": STEPS,
        "save_steps": SAVE_EVERY,
        "save_total_limit": 2,
        "logging_steps": 2,
        "routing_log_every": 0,
        "eval_before_after": False,
        "learning_rate": 0.3,
        "aux_loss_reduce": "global_prev",
        "router_aux_loss_coef": 0.1,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def command(recipe: Path, out: Path, *extra: str) -> list[str]:
    # `router-tune train ...`, as the interrupt hint prints it (python -m: the same entry point)
    return [sys.executable, "-m", "router_tune", "train", str(recipe), "--output_dir", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def latest_complete_step(out: Path) -> int:
    done = [int(p.name.split("-")[1]) for p in checkpoints(out) if is_complete(p)]
    return max(done, default=0)


def kill_after_next_checkpoint(cmd: list[str], out: Path, rng: random.Random) -> int:
    """Start the run, wait for a checkpoint newer than the ones it started with, then SIGKILL it
    at a random moment (possibly mid-save); returns the latest complete step afterwards."""
    start = latest_complete_step(out)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while latest_complete_step(out) <= start and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGKILL, 0), err[-3000:]
    return latest_complete_step(out)


@pytest.mark.slow  # ~2 min: five CLI runs (`make test-slow`)
def test_sigkilled_run_resumes_to_the_uninterrupted_routers(mixtral_legacy, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", mixtral_legacy)
    whole = subprocess.run(command(recipe, tmp_path / "whole"), env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out, rng = tmp_path / "killed", random.Random(1234)
    reached = kill_after_next_checkpoint(command(recipe, out), out, rng)
    for _ in range(2):
        assert 0 < reached < STEPS
        reached = kill_after_next_checkpoint(command(recipe, out, "--resume_from_checkpoint", "true"), out, rng)
    # A kill while saving leaves a checkpoint without its marker: make one for certain, with a
    # truncated routers file, where the next checkpoint would be.
    latest = out / f"checkpoint-{reached}"
    partial = out / f"checkpoint-{reached + SAVE_EVERY}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(latest, partial)
    (partial / COMPLETE).unlink()
    routers = partial / "routers.safetensors"
    routers.write_bytes(routers.read_bytes()[:100])

    final = subprocess.run(
        command(recipe, out, "--resume_from_checkpoint", "true"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"checkpoint-{reached + SAVE_EVERY} is incomplete" in final.stderr
    assert f"resuming from {latest}" in final.stderr
    a, b = load_file(tmp_path / "whole" / "routers.safetensors"), load_file(out / "routers.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7)
