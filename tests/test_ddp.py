"""Two gloo processes under `accelerate launch` (2 micro-batches of 2 blocks each per step) train
the same routers as one process on the same 8-block global batch: every block has its own number
of target and real tokens, and each rank routes different text, so only a loss normalised by the
whole step's tokens on all ranks, with expert counts reduced over ranks, can agree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from router_tune.training.checkpoints import is_complete
from tests.cli_runs import free_port, write_recipe
from tests.rank_reports import read_reports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "ddp_script.py"


# dense: the estimator's term is a sum over tokens, so it splits over ranks like the CE (default_moe's
# running means depend on each rank's micro-batch, so they do not).
@pytest.mark.parametrize("router_gradient", ["sparse", pytest.param("dense", marks=pytest.mark.slow)])
def test_two_cpu_processes_equal_one(router_gradient, mixtral_legacy, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/cpu-ddp.yaml"),
        "--main_process_port",
        str(free_port()),
    ]
    two = subprocess.run(
        accelerate + [str(SCRIPT), str(mixtral_legacy), str(tmp_path / "two"), "2", "2", router_gradient],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world=2 step=3" in two.stdout
    one = subprocess.run(
        [sys.executable, str(SCRIPT), str(mixtral_legacy), str(tmp_path / "one"), "8", "1", router_gradient],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "world=1 step=3" in one.stdout
    a = load_file(tmp_path / "two" / "routers.safetensors")
    b = load_file(tmp_path / "one" / "routers.safetensors")
    source = load_file(next(Path(mixtral_legacy).glob("*.safetensors")))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
        legacy = name.replace("mlp.gate", "block_sparse_moe.gate")
        assert not torch.equal(a[name], source[legacy].float()), "routers did not train"


PROBE = """import sys
import torch.distributed as dist
from router_tune.cli import main
rc = main(sys.argv[1:])
print(f"RANK_EXIT rc={rc} process_group_alive={dist.is_initialized()}", flush=True)
sys.exit(rc)
"""


def test_launched_train_command_tears_down_its_process_group(mixtral_legacy, tmp_path):
    """`accelerate launch -m router_tune train` on 2 ranks, as users run it. The command destroys its
    process group before returning: left to interpreter exit, gloo's worker threads can abort a
    finished run (CI saw SIGABRT, "terminate called without an active exception", ~1 run in 6)."""
    recipe = write_recipe(tmp_path, mixtral_legacy, max_steps=2, save_steps=100, routing_log_every=0)
    probe = tmp_path / "probe.py"  # router_tune's own entry point, with one line after it returns
    probe.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "recipes/accelerate/cpu-ddp.yaml"), "--main_process_port", str(free_port())]
    proc = subprocess.run(
        launch + [str(probe), "train", str(recipe), "--output_dir", str(tmp_path / "out")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "router-tune train: finished at step 2" in proc.stdout
    exits = sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK_EXIT"))
    assert exits == ["RANK_EXIT rc=0 process_group_alive=False"] * 2, proc.stdout[-2000:]


def test_a_ddp_launch_that_is_not_distributed_stops_with_the_fix(mixtral_legacy, tmp_path):
    """The demo recipe's launch line on a CPU without ACCELERATE_USE_CPU: accelerate starts two processes
    but no distributed run (no GPU for `multi_gpu`); each would train alone into one output_dir."""
    recipe = write_recipe(tmp_path, mixtral_legacy, max_steps=2, use_cpu=False)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "recipes/accelerate/cpu-ddp.yaml"), "--main_process_port", str(free_port())]
    proc = subprocess.run(
        launch + ["-m", "router_tune", "train", str(recipe)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "launched as 2 processes" in proc.stderr and "ACCELERATE_USE_CPU=1" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # three runs, two of them launched: about 2 minutes
def test_resume_with_the_checkpoint_on_rank_0s_disk_only(mixtral_legacy, tmp_path):
    """Ranks on separate machines with node-local output directories: only rank 0 writes checkpoints, so
    only rank 0's disk has one to resume from. Rank 0 chooses it, rank 1 gets its files, and the resumed
    run ends with the routers of an uninterrupted one (each rank choosing on its own disk hung: rank 1
    found no checkpoint and started at step 0)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    script = ROOT / "tests" / "node_local_script.py"

    def run(out, steps: int, resume: str | None = None, ranks: int = 2) -> list[dict]:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        launch += [str(ROOT / "recipes/accelerate/cpu-ddp.yaml"), "--main_process_port", str(free_port())]
        batch = ["2", "2"] if ranks == 2 else ["8", "1"]  # the same 8-block global batch
        cmd = (launch if ranks == 2 else [sys.executable]) + [str(script), str(mixtral_legacy), str(out), *batch]
        cmd += [str(steps)] + ([resume] if resume else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return read_reports(proc.stdout)

    out = tmp_path / "split"
    run(out, 2)
    assert is_complete(out / "rank-0" / "checkpoint-2") and not is_complete(out / "rank-1" / "checkpoint-2")
    resumed = run(out, 4, "last")
    assert [r["step"] for r in resumed] == [4, 4]
    assert resumed[0]["router_sums"] == resumed[1]["router_sums"]
    copy = out / "rank-1" / "checkpoint-2"
    assert is_complete(copy) and (copy / "rng_state_1.pth").is_file()  # rank 1 kept its own RNG state
    for name in ("routers.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (copy / name).read_bytes() == (out / "rank-0" / "checkpoint-2" / name).read_bytes()

    straight = run(tmp_path / "straight", 4, ranks=1)
    assert straight[0]["step"] == 4
    a = load_file(out / "rank-0" / "routers.safetensors")
    b = load_file(tmp_path / "straight" / "rank-0" / "routers.safetensors")
    moved = load_file(out / "rank-0" / "checkpoint-2" / "routers.safetensors")
    for name in a:
        assert not torch.equal(a[name], moved[name])  # steps 3-4 changed the routers
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
