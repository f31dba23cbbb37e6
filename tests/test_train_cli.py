"""`router-tune train` end to end on a tiny MoE with the bundled samples: dry run, training,
checkpoints, plots, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from router_tune.cli import main
from tests.cli_runs import ROOT, run_cli, write_recipe


def test_dry_run_reads_no_weights(mixtral_legacy, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    recipe = write_recipe(tmp_path, mixtral_legacy)
    assert main(["train", str(recipe), "--dry-run", "--max_steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing trained" in out
    assert "256 of" in out  # 2 MoE layers x 4 experts x 32 hidden
    assert "7 (" in out and "redpajama" in out and "wizard_vicuna" in out
    assert not (tmp_path / "run").exists()


def test_train_writes_routers_checkpoints_plots_and_report(mixtral_legacy, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path, mixtral_legacy, eval_before_after=True, eval_max_blocks=4, eval_fraction=0.2, block_size=128
    )
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    assert (run / "routers.safetensors").is_file()
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*run.iterdir(), *run.glob("checkpoint-2/*")] if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes  # routers.safetensors like every other file
    assert {p.name for p in run.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    info = json.loads((run / "router_tune.json").read_text())
    assert info["global_step"] == 4 and info["sources"] == ["redpajama", "wizard_vicuna"]
    assert (run / "plots" / "loss_curves.png").is_file()
    assert (run / "plots" / "usage_start_end.png").is_file()
    out = capsys.readouterr().out
    assert "finished at step 4" in out
    # the last lines say where the results are and what to run next, whatever the log level
    assert f"report: {run / 'eval' / 'report.md'} " in out
    assert f"plots:  {run / 'plots'}/ (" in out and "loss_curves.png" in out
    assert f"next:   router-tune eval {run} " in out and f"router-tune export {run} --out {run}-export " in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["global_step"] == 4
    for name in ("before", "after"):
        assert set(report[name]["perplexity"]) == {"redpajama", "wizard_vicuna", "overall"}
    assert report["before"]["tokens"] == report["after"]["tokens"]  # the same held-out blocks
    assert report["before"]["perplexity"] != report["after"]["perplexity"]  # the routers changed the model
    assert (run / "eval" / "report.md").is_file()


def test_bad_override_is_a_clear_error(mixtral_legacy, tmp_path, capsys):
    recipe = write_recipe(tmp_path, mixtral_legacy)
    assert main(["train", str(recipe), "--learnig_rate", "1"]) == 1
    assert "Did you mean `learning_rate`" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(mixtral_legacy, tmp_path):
    recipe = write_recipe(tmp_path, mixtral_legacy, max_steps=10_000, save_steps=10_000, routing_log_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "router_tune", "train", str(recipe), "--learning_rate", "0.5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:  # wait for the first training log, then interrupt
            if ": loss " in line:
                proc.send_signal(signal.SIGTERM)
                break
        output = proc.stdout.read()
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output  # scripts can tell it from success
    finally:
        proc.kill()
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "routers.safetensors").is_file()
    assert int(checkpoints[0].name.split("-")[1]) < 10_000
    assert "stopped early (interrupted)" in output
    # The hint is the whole command, overrides included, and it works as printed.
    hint = next(line for line in output.splitlines() if line.startswith("resume with: "))
    printed = shlex.split(hint.removeprefix("resume with: "))
    assert printed == [
        "router-tune",
        "train",
        str(recipe),
        "--learning_rate",
        "0.5",
        "--resume_from_checkpoint",
        "true",
    ]
    step = int(checkpoints[0].name.split("-")[1])
    resumed = run_cli(*printed[1:], "--max_steps", str(step + 1), cwd=ROOT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in resumed.stderr and f"finished at step {step + 1}" in resumed.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "does-not-exist.yaml"], "does not exist"),
    ],
)
def test_missing_recipe(argv, message, capsys):
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_run_plots_start_from_the_untrained_routers(mixtral_legacy, tmp_path):
    """With the before/after evaluation on, the "start" heatmap is the untrained routers (step 0)."""
    from router_tune import RouterTrainer, load_recipe

    recipe = write_recipe(
        tmp_path,
        mixtral_legacy,
        eval_before_after=True,
        eval_max_blocks=2,
        eval_fraction=0.2,
        block_size=128,
        max_steps=2,
        routing_log_every=1,
    )
    trainer = RouterTrainer(args=load_recipe(recipe))
    trainer.train()
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert trainer.telemetry.first_step == 0 and trainer.telemetry.last_step == 2
    assert trainer.telemetry.first_summary.tokens == report["before"]["routing"]["tokens"]


def test_inspect_and_dry_run_say_a_bf16_checkpoint_computes_in_fp32_on_this_cpu(
    mixtral_bf16, tmp_path, capsys, monkeypatch
):
    from router_tune.model import loading

    monkeypatch.setattr(loading, "native_half_matmul", lambda dtype: True)
    monkeypatch.setattr(loading, "cpu_matmul_slowdown", lambda dtype: 12.0)
    assert main(["inspect", str(mixtral_bf16)]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "Computed in" in out and "matmul is 12x slower than float32" in out
    recipe = write_recipe(tmp_path, mixtral_bf16)
    assert main(["train", str(recipe), "--dry-run"]) == 0
    assert "weights      float32 (bfloat16 checkpoint computed in float32" in capsys.readouterr().out
    assert main(["train", str(recipe), "--dry-run", "--model_dtype", "bfloat16"]) == 0
    assert "weights      bfloat16\n" in capsys.readouterr().out


def test_every_logging_step_keeps_its_loss_when_routing_logs_on_it(mixtral_legacy, tmp_path):
    """Routing logs on steps 2 and 4, loss logs on the same steps: both reach trainer_state.json and wandb."""
    from tests.wandb_records import offline_history

    recipe = write_recipe(
        tmp_path,
        mixtral_legacy,
        max_steps=4,
        logging_steps=2,
        routing_log_every=2,
        save_steps=100,
        eval_before_after=True,
        eval_max_blocks=2,
        eval_fraction=0.2,
        block_size=128,
        use_cpu=False,  # a CPU machine's default device, as users run it (use_cpu already turns pinning off)
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_DIR"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    run = run_cli("train", str(recipe), "--report_to", "wandb", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    (state,) = (tmp_path / "run").glob("checkpoint-*/trainer_state.json")
    history = json.loads(state.read_text())["log_history"]
    assert sorted(e["step"] for e in history if "lm_loss" in e) == [2, 4]
    assert sorted(e["step"] for e in history if "routing/mean/max_load" in e) == [2, 4]
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")  # in the run, not in the current directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run"]
    rows = offline_history(run_dir)
    assert sorted(r["train/global_step"] for r in rows if "train/lm_loss" in r) == [2, 4]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    (logged,) = [r for r in rows if "eval/perplexity/after/overall" in r]  # the before/after evaluation too
    for name in ("before", "after"):
        assert logged[f"eval/perplexity/{name}/overall"] == pytest.approx(report[name]["perplexity"]["overall"])
    assert "pin_memory" not in run.stderr  # nothing to pin on a CPU


def test_train_refuses_to_replace_a_finished_run_unless_asked(mixtral_legacy, tmp_path, capsys, monkeypatch):
    from router_tune.training import trainer as trainer_module

    recipe = write_recipe(tmp_path, mixtral_legacy, max_steps=4, save_steps=2, routing_log_every=0)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    routers = (run / "routers.safetensors").read_bytes()
    capsys.readouterr()

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the finished run was protected")

    monkeypatch.setattr(trainer_module, "load_moe", refuse)
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume_from_checkpoint true" in err
    assert (run / "routers.safetensors").read_bytes() == routers
    assert main(["train", str(recipe), "--dry-run"]) == 0
    assert "warning: output_dir" in capsys.readouterr().err
    monkeypatch.undo()
    # resume stays one flag (a finished run resumes to a longer max_steps)
    assert main(["train", str(recipe), "--resume_from_checkpoint", "true", "--max_steps", "5"]) == 0
    assert json.loads((run / "router_tune.json").read_text())["global_step"] == 5
    assert main(["train", str(recipe), "--overwrite", "--max_steps", "2"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # none left from the earlier run
    assert json.loads((run / "router_tune.json").read_text())["global_step"] == 2


def test_help_version_and_flag_hints_answer_without_torch(mixtral_legacy, tmp_path, capsys):
    """`train --help` lists the recipe keys without importing torch (10 s before, ~0.1 s now)."""
    probe = (
        "import sys\nfrom router_tune.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
        "    pass\nprint('torch imported:', 'torch' in sys.modules)\n"
    )
    shown = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "router_aux_loss_coef (default 0.01)" in shown.stdout and "--overwrite" in shown.stdout
    assert shown.stdout.rstrip().endswith("torch imported: False")
    pyproject = (ROOT / "pyproject.toml").read_text()
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.split() == ["router-tune", pyproject.split('version = "')[1].split('"')[0]]
    recipe = write_recipe(tmp_path, mixtral_legacy)
    assert main(["train", str(recipe), "--dry_run"]) == 1
    assert "Did you mean --dry-run?" in capsys.readouterr().err


def test_no_wandb_notice_when_the_run_does_not_report_to_wandb(mixtral_legacy, tmp_path):
    """transformers printed "[INFO] Running in WANDB offline mode" on stdout under WANDB_MODE=offline, even with
    report_to none; the variable still reaches wandb when a run asks for it."""
    recipe = write_recipe(tmp_path, mixtral_legacy, report_to="none")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    shown = run_cli("train", str(recipe), "--dry-run", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "dry run: nothing trained" in shown.stdout and "WANDB" not in shown.stdout + shown.stderr
    probe = (
        "import os, sys\nfrom router_tune.cli import hide_wandb_offline_notice\nhide_wandb_offline_notice()\n"
        "print(os.environ['WANDB_MODE'], 'transformers.integrations.integration_utils' in sys.modules)\n"
    )
    kept = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert kept.stdout.split() == ["offline", "True"]


def test_a_cpu_training_run_prints_no_deepspeed_accelerator_guess(mixtral_legacy, tmp_path):
    """DeepSpeed (imported by the Trainer when installed) printed "Setting accelerator to CPU ..." on stdout in
    every CPU training run; the CLI tells it the accelerator on a machine without one."""
    recipe = write_recipe(tmp_path, mixtral_legacy, report_to="none", max_steps=1, eval_before_after=False)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"OMP_NUM_THREADS": "1"}
    run = run_cli("train", str(recipe), cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "finished at step 1" in run.stdout + run.stderr
    assert "Setting accelerator" not in run.stdout + run.stderr


def test_training_logs_are_readable_lines_without_a_streamed_epoch(mixtral_legacy, tmp_path, capsys):
    """The console showed each log as a raw dict with a meaningless `epoch` for streamed data, and every
    routing log as a dict of all per-layer values."""
    recipe = write_recipe(tmp_path, mixtral_legacy, max_steps=2, routing_log_every=2, logging_steps=1)
    assert main(["train", str(recipe), "--disable_tqdm", "false"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step 1/2: loss " in text and "(lm " in text and " lr " in text
    assert "step 2/2: routing " in text and "worst layer L" in text
    assert "{'loss'" not in text and "'routing/L0/max_load'" not in text
    history = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert history and not any("epoch" in entry for entry in history)
