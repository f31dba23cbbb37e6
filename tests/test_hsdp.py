"""Hybrid sharding (HSDP) for FSDP2: replicate across machines, shard within one.

A real 4-rank gloo launch with the shipped recipes/accelerate/cpu-hsdp.yaml (2 replicas x 2 shards, as
two machines of two GPUs would be) must lay the frozen weights out on a ("dp_replicate", "fsdp") mesh,
shard groups of consecutive ranks, and train the same routers as one process on the same global batch,
with every rank on its own blocks (different target-token counts, different routing)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from router_tune.errors import RouterTuneError
from router_tune.training import sharding
from tests.cli_runs import free_port
from tests.rank_reports import CPU_RANKS_ENV, run_and_read_reports

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "fsdp_script.py"
ENV = CPU_RANKS_ENV


def _run(cmd: list[str]) -> list[dict]:
    return run_and_read_reports(cmd, timeout=1200)


@pytest.mark.slow  # four ranks on two cores: 2.5 minutes here, over 10 on a busy machine
@pytest.mark.timeout(1500)
def test_hsdp_2x2_mesh_trains_as_one_process(mixtral_legacy, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "recipes/accelerate/cpu-hsdp.yaml"), "--main_process_port", str(free_port())]
    # micro-batch 2 on each of 4 ranks against 8 in one process: the same 8 blocks per step
    four = _run(launch + [str(SCRIPT), str(mixtral_legacy), str(tmp_path / "four"), "2", "1", "3"])
    assert [r["rank"] for r in four] == [0, 1, 2, 3] and all(r["world"] == 4 and r["step"] == 3 for r in four)
    for r in four:
        assert r["mesh"] == {"dp_replicate": 2, "fsdp": 2}, r
        assert r["layer_weights_dtensor"] and r["layer_shard_fraction"] == pytest.approx(0.5, abs=0.02), r
    # shard groups are consecutive ranks (one machine's GPUs): ranks 0 and 1 hold different halves, rank 2
    # holds rank 0's half (its replica)
    sums = [r["local_sum"] for r in four]
    assert sums[0] == sums[2] and sums[1] == sums[3] and sums[0] != sums[1], sums
    # every rank trains on its own blocks: unequal target tokens, different routing
    assert len({r["first_targets"] for r in four}) == 4, [r["first_targets"] for r in four]
    assert len({tuple(r["first_top1"]) for r in four}) == 4, [r["first_top1"] for r in four]

    one = _run([sys.executable, str(SCRIPT), str(mixtral_legacy), str(tmp_path / "one"), "8", "1", "3"])
    assert one[0]["world"] == 1 and one[0]["mesh"] == {}
    assert sum(r["first_targets"] for r in four) == one[0]["first_targets"]
    for r in four:
        assert r["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    a, b = load_file(tmp_path / "four" / "routers.safetensors"), load_file(tmp_path / "one" / "routers.safetensors")
    source = load_file(next(Path(mixtral_legacy).glob("*.safetensors")))
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
        moved = (b[name] - source[name.replace("mlp.gate", "block_sparse_moe.gate")].float()).abs().max()
        assert moved > 1e3 * (a[name] - b[name]).abs().max().clamp_min(1e-8), name  # a wrong reduction shows


def _parallelism(monkeypatch, world: int, **sizes: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for name in ("DP_REPLICATE_SIZE", "DP_SHARD_SIZE", "TP_SIZE", "CP_SIZE", "SP_SIZE"):
        monkeypatch.delenv("PARALLELISM_CONFIG_" + name, raising=False)
    for name, size in sizes.items():
        monkeypatch.setenv("PARALLELISM_CONFIG_" + name.upper(), str(size))


def test_mesh_sizes_from_accelerate_parallelism_config(monkeypatch):
    _parallelism(monkeypatch, 8)
    assert sharding.fsdp_mesh_sizes() == (1, 8)  # no parallelism_config: plain FSDP2 over every rank
    _parallelism(monkeypatch, 16, dp_replicate_size=2, dp_shard_size=8)
    assert sharding.fsdp_mesh_sizes() == (2, 8)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    config = sharding.load_kwargs(SimpleNamespace(bf16=True), "fsdp")["distributed_config"]
    assert (config.dp_replicate_size, config.fsdp_size, config.fsdp_mixed_precision) == (2, 8, True)
    # accelerate's own mesh is left out: transformers' load-time mesh owns the reduction (and accelerate
    # refuses a parallelism_config on a CPU)
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    sharding.configure_process_group(SimpleNamespace(deepspeed=None, fsdp=""))
    assert "ACCELERATE_USE_PARALLELISM_CONFIG" not in os.environ
    assert sharding.fsdp_mesh_sizes() == (2, 8)


@pytest.mark.parametrize(
    "world, sizes, says",
    [
        (6, {"dp_replicate_size": 4, "dp_shard_size": 2}, "does not divide the 6 processes"),
        (8, {"dp_replicate_size": 2, "dp_shard_size": 2}, "set dp_shard_size to 4"),
        (4, {"dp_replicate_size": 4, "dp_shard_size": 1}, "shards nothing"),
        (4, {"dp_shard_size": 2, "tp_size": 2}, "{'tp_size': 2}"),
        (4, {"dp_replicate_size": 0, "dp_shard_size": 4}, "must be >= 1"),
    ],
)
def test_bad_mesh_sizes_stop_before_loading(monkeypatch, world, sizes, says):
    _parallelism(monkeypatch, world, **sizes)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = SimpleNamespace(deepspeed=None, fsdp="", use_cpu=True)
    with pytest.raises(RouterTuneError, match="parallelism_config") as error:
        sharding.check_request(args)
    assert says in str(error.value)
