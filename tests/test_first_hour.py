"""The first hour of a new user, scripted: the README's main flow on the embedded demo, run as commands in a
fresh directory (inspect, dry run, a bad key, train, Ctrl-C, the printed resume command, the printed eval
and export commands), checking what a person looks for after each one.

Few steps and one held-out block per source keep it to a few minutes; the flow, the recipe and the model
are the shipped ones.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_runs import ROOT

RECIPE = ROOT / "recipes" / "demo.yaml"
MODEL = ROOT / "router_tune" / "assets" / "demo-moe"
# The demo recipe made short: 6 steps of 2 x 128 tokens, loss every step, routing every 3 (the routing and
# loss logs coincide at steps 3 and 6), one held-out block per source before and after.
SHORT = [
    "--max_steps", "6", "--per_device_train_batch_size", "2", "--block_size", "128", "--logging_steps", "1",
    "--routing_log_every", "3", "--save_steps", "100", "--eval_max_blocks", "1", "--output_dir", "run",
]  # fmt: skip


def command(argv: list[str]) -> list[str]:
    """`router-tune ...` as this interpreter runs it (the printed commands start with `router-tune`)."""
    assert argv[0] == "router-tune", argv
    return [sys.executable, "-m", "router_tune", *argv[1:]]


@pytest.fixture
def user(tmp_path):
    """Run commands in a fresh directory with a user's environment: no WANDB_DIR, wandb offline (the
    variable that made transformers announce "WANDB offline mode" to runs with report_to none)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_DIR", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    home = tmp_path / "work"
    home.mkdir()

    def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command(argv), cwd=home, env=env, capture_output=True, text=True, timeout=600, **kwargs)

    run.cwd, run.env = home, env
    return run


def last_lines(stdout: str) -> dict[str, str]:
    """The closing lines of `train`, by their label (report:, plots:, next:, resume with:)."""
    lines = {}
    for line in stdout.splitlines():
        label, sep, rest = line.partition(":")
        if sep and label in ("report", "plots", "next", "resume with"):
            lines[label] = rest.strip()
    return lines


@pytest.mark.slow
def test_first_hour_on_the_demo(user):
    home = user.cwd
    shown = user(["router-tune", "inspect", str(MODEL)])
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "experts" in shown.stdout

    dry = user(["router-tune", "train", str(RECIPE), "--dry-run", *SHORT])
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "dry run: nothing trained" in dry.stdout and not (home / "run").exists()

    typo = user(["router-tune", "train", str(RECIPE), "--max_step", "6"])  # a bad input: one line, exit 1
    assert typo.returncode == 1 and "Did you mean `max_steps`?" in typo.stderr
    assert "Traceback" not in typo.stderr

    # train, Ctrl-C after the first logged loss: a checkpoint, exit 130, the resume command printed
    proc = subprocess.Popen(
        command(["router-tune", "train", str(RECIPE), *SHORT]),
        cwd=home,
        env=user.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = []
        for line in proc.stdout:
            first.append(line)
            if ": loss " in line:
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    out = "".join(first) + out
    assert proc.returncode == 130, err[-3000:]
    (checkpoint,) = (home / "run").glob("checkpoint-*")
    assert int(checkpoint.name.split("-")[1]) < 6 and (checkpoint / "routers.safetensors").is_file()
    assert "stopped early (interrupted)" in out
    resume = shlex.split(last_lines(out)["resume with"])

    resumed = user(resume)  # exactly as printed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint.relative_to(home)}" in resumed.stderr, resumed.stderr[-3000:]
    assert "finished at step 6" in resumed.stdout
    state = json.loads((home / "run" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert sorted(e["step"] for e in state if "lm_loss" in e) == [1, 2, 3, 4, 5, 6]  # every logged step
    assert {3, 6} <= {e["step"] for e in state if "routing/mean/max_load" in e}
    closing = last_lines(resumed.stdout)
    assert closing["report"].startswith(f"{Path('run') / 'eval' / 'report.md'} ")
    assert (home / "run" / "eval" / "report.md").is_file()
    assert closing["plots"].startswith("run/plots/ (loss_curves.png, balance.png")
    assert all((home / "run" / "plots" / name).is_file() for name in ("loss_curves.png", "balance.png"))
    assert closing["next"].startswith("router-tune eval run ")

    nexts = [line for line in resumed.stdout.splitlines() if "router-tune eval" in line or "router-tune export" in line]
    evaluate, export = (shlex.split(line.split("next:")[-1].split("(")[0]) for line in nexts)
    evaluated = user(evaluate)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (home / "run" / "eval-2" / "report.md").is_file()  # the run's own report is kept
    exported = user(export)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "verified" in exported.stdout
    card = (home / "run-export" / "README.md").read_text()
    assert "# demo-moe with trained routers" in card and f"`{MODEL}`" in card

    # nothing outside the run directory and the export it was asked for (no ./wandb, no stray reports)
    assert sorted(p.name for p in home.iterdir()) == ["run", "run-export"]
    for result in (shown, dry, resumed, evaluated, exported):
        assert "WANDB" not in result.stdout  # report_to none: no word of wandb
    assert "WANDB" not in out


def test_mergekit_found_from_a_relative_python_path(monkeypatch):
    """`make demo-real` on a fresh clone: a Python started through a relative PATH entry has a relative
    sys.executable, and the merge runs mergekit-moe from its work dir: the script's path must be absolute."""
    from scripts.make_demo_model import mergekit_cli

    venv_python = Path(sys.executable).absolute()
    monkeypatch.chdir(venv_python.parent.parent)
    monkeypatch.setattr(sys, "executable", os.path.relpath(venv_python))
    cli = mergekit_cli()
    assert cli.is_absolute() and cli.exists()
    assert cli.parent == venv_python.parent  # the venv's bin, not where its python symlink points
