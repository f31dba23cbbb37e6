"""Sharded training (FSDP2) through RouterTrainer on CPU: real gloo processes, real DTensors.

The 2-rank FSDP2 run is launched with the shipped recipes/accelerate/cpu-fsdp2.yaml; it must hold
about half of every decoder layer's frozen weights per rank, train the same routers as one plain
process on the same global batch, write router-only checkpoints, and resume from one to the same
routers as the uninterrupted run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from router_tune.errors import RouterTuneError
from router_tune.model.routers import (
    find_routers,
    freeze_all_but_routers,
    load_router_state_dict,
    router_state_dict,
    routers_to_fp32,
)
from router_tune.training import sharding
from tests.cli_runs import free_port
from tests.rank_reports import CPU_RANKS_ENV, run_and_read_reports
from tests.trainers import make_trainer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "fsdp_script.py"
ENV = CPU_RANKS_ENV


def _run(cmd: list[str]) -> list[dict]:
    return run_and_read_reports(cmd, timeout=400)


def _two_ranks(model_dir, out, steps, resume=None, mixed_precision="no", settings=()) -> list[dict]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "recipes/accelerate/cpu-fsdp2.yaml"), "--main_process_port", str(free_port())]
    launch += ["--mixed_precision", mixed_precision]
    args = [str(SCRIPT), str(model_dir), str(out), "2", "2", str(steps)] + ([resume] if resume else [])
    return _run(launch + args + list(settings))


def test_fsdp2_two_ranks_equal_one_process_and_resume(mixtral_legacy, tmp_path):
    two = _two_ranks(mixtral_legacy, tmp_path / "two", 3)
    assert [r["world"] for r in two] == [2, 2] and all(r["step"] == 3 for r in two)
    for r in two:
        # every frozen decoder-layer weight is a DTensor with half of its rows on this rank
        assert r["layer_weights_dtensor"], r
        assert r["layer_shard_fraction"] == pytest.approx(0.5, abs=0.02), r
        assert r["shard_fraction"] < 0.6, r  # the whole model (the LM head stays whole: transformers' plan)

    one = _run([sys.executable, str(SCRIPT), str(mixtral_legacy), str(tmp_path / "one"), "8", "1", "3"])
    assert one[0]["world"] == 1 and one[0]["shard_fraction"] == 1.0
    # expert fingerprints hashed once, on the main process, and broadcast
    assert [r["fingerprint_calls"] for r in two] == [1, 0]
    assert two[0]["fingerprints"] == two[1]["fingerprints"] == one[0]["fingerprints"]
    assert two[0]["startup_phases"] == ["fingerprints", "load", "rescale probe", "router input probe", "twin experts"]
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)

    a, b = load_file(tmp_path / "two" / "routers.safetensors"), load_file(tmp_path / "one" / "routers.safetensors")
    source = load_file(next(Path(mixtral_legacy).glob("*.safetensors")))
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
        assert not torch.equal(a[name], source[name.replace("mlp.gate", "block_sparse_moe.gate")].float())

    # router-only checkpoint: the routers, their optimizer state (whole, not rank 0's shard) and
    # the small trainer files; no model weights
    ckpt = tmp_path / "two" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {
        "routers.safetensors",
        "router_tune.json",
        "router_tune_complete",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    router_bytes = sum(t.numel() * 4 for t in a.values())
    assert (ckpt / "routers.safetensors").stat().st_size < router_bytes + 1024
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    shapes = sorted(tuple(t.shape) for s in state.values() for k, t in s.items() if k != "step")
    assert shapes == [tuple(t.shape) for t in a.values() for _ in ("exp_avg", "exp_avg_sq")]
    model_bytes = sum(p.stat().st_size for p in Path(mixtral_legacy).glob("*.safetensors"))
    weights = (ckpt / "routers.safetensors").stat().st_size + (ckpt / "optimizer.pt").stat().st_size
    assert weights < 0.05 * model_bytes, (weights, model_bytes)

    # resume from checkpoint-2 on 2 ranks: the same routers as the uninterrupted run
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-2")
    resumed = _two_ranks(mixtral_legacy, tmp_path / "resumed", 3, resume="last")
    assert resumed[0]["step"] == 3
    c = load_file(tmp_path / "resumed" / "routers.safetensors")
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-6, atol=1e-8)


@pytest.mark.slow  # about 25 s more of 2-process start-up
def test_fsdp2_bf16_mixed_precision_trains_fp32_routers(mixtral_legacy, tmp_path):
    """accelerate's bf16 gives transformers' FSDP2 a bf16 MixedPrecisionPolicy: every layer computes
    in bf16 and the routers still train (their forward casts the weight to fp32). With the weights
    loaded in bf16 (the shipped recipes' model_dtype), the routers' master weights and Adam state are
    fp32 beside bf16 frozen weights (they stayed bf16 before)."""
    two = _two_ranks(mixtral_legacy, tmp_path / "bf16", 3, mixed_precision="bf16", settings=["model_dtype=bfloat16"])
    assert all(r["step"] == 3 and r["layer_weights_dtensor"] for r in two)
    for r in two:
        assert r["router_dtypes"] == r["router_state_dtypes"] == ["torch.float32"], r
        assert r["frozen_dtypes"] == ["torch.bfloat16"], r
    routers = load_file(tmp_path / "bf16" / "routers.safetensors")
    source = load_file(next(Path(mixtral_legacy).glob("*.safetensors")))
    for name, t in routers.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert not torch.equal(t, source[name.replace("mlp.gate", "block_sparse_moe.gate")].float())


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A real one-process gloo world, so fully_shard makes real DTensors in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fp32_routers_and_router_state_under_fsdp2_bf16_policy(mixtral_legacy, gloo_world_of_one):
    """bf16 MixedPrecisionPolicy hands the fp32 router a bf16 weight: the forward casts it (else
    F.linear raises a dtype mismatch). Router state dicts read and write DTensor parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32)
    routers_to_fp32(model)
    freeze_all_but_routers(model)
    mesh = init_device_mesh("cpu", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    router = find_routers(model)[0].module
    assert isinstance(router.weight, DTensor) and router.weight.dtype == torch.float32

    logits = []
    router.register_forward_hook(lambda m, a, out: logits.append(out[0]))
    ids = torch.arange(16).reshape(1, 16)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert logits[0].dtype == torch.float32 and torch.isfinite(out.loss)
    assert router.weight.grad is not None and torch.isfinite(router.weight.grad.full_tensor()).all()

    saved = router_state_dict(model)
    assert all(type(t) is torch.Tensor and t.shape == (4, 32) for t in saved.values())
    changed = {n: t + 1.0 for n, t in saved.items()}
    load_router_state_dict(model, changed)
    for n, t in router_state_dict(model).items():
        torch.testing.assert_close(t, changed[n])


def test_twins_of_sharded_experts_come_from_fingerprints(mixtral_legacy, gloo_world_of_one):
    """FSDP2's expert weights are DTensors: no expert runs alone (torch's grouped mm refuses DTensor mixed
    with tensors), so the twin groups come from the fingerprints, or every expert stands alone, before any
    forward (each rank may ask alone; a forward would wait on the others)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from router_tune.routing.twins import measure_twins

    model = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32)
    ids = {"input_ids": torch.arange(16).reshape(1, 16)}
    assert measure_twins(model, ids).method == "output cosine"  # unsharded: measured
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.register_forward_pre_hook(lambda *a: pytest.fail("a forward ran"))

    twins = measure_twins(model, ids, fingerprints=[["a", "b", "a", "c"], ["d", "e", "f", "g"]])
    assert twins.method == "identical weights" and twins.groups == [[[0, 2], [1], [3]], [[0], [1], [2], [3]]]
    alone = measure_twins(model, ids)
    assert alone.method == "not measured" and alone.groups == [[[0], [1], [2], [3]]] * 2
    assert "not measured" in alone.describe()


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "qwen2_moe"])
def test_router_shapes_from_ds_shape(fixture, request):
    """ZeRO-3 partitions have local shape [0]; routers, and Qwen2-MoE's shared-expert gates, are
    found by their full `ds_shape` (by local shape the gates were silently left frozen)."""
    from transformers import AutoModelForCausalLM

    from router_tune.model.routers import router_param_names

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    whole = router_param_names(model)
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert router_param_names(model) == whole and len(whole) == (4 if fixture == "qwen2_moe" else 2)


def test_no_silent_downgrade(mixtral_legacy, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr("router_tune.training.trainer.load_moe", no_load)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RouterTuneError, match="asks for FSDP but has 1 process"):
        make_trainer(mixtral_legacy, tmp_path / "fsdp")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    # (TrainingArguments itself imports deepspeed under this variable: checked on the request alone)
    with pytest.raises(RouterTuneError, match="asks for DeepSpeed but has 1 process"):
        sharding.check_request(SimpleNamespace(deepspeed=None, fsdp=None))
    monkeypatch.setenv("WORLD_SIZE", "2")  # the fold needs whole router weights: refused before any weight is read
    with pytest.raises(RouterTuneError, match="loss_free_fold: true.*DeepSpeed holds sharded"):
        sharding.check_request(SimpleNamespace(deepspeed=None, fsdp=None, loss_free_fold=True, balancing="loss_free"))

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(mixtral_legacy)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RouterTuneError, match="not sharded"):
        sharding.check_sharded(plain, "fsdp")


def test_unsharded_runs_load_straight_to_their_accelerator():
    """One process or DDP on an accelerator loads the weights onto this rank's device (no whole model
    in host RAM, the rescale probe runs there); a CPU run, a quantized base (quantized on the way to
    the device) and DeepSpeed (partitioned at load by zero.Init) get no device_map. No GPU needed: the
    arguments only, as `from_pretrained` receives them."""
    args = lambda device, quantize="none": SimpleNamespace(device=device, quantize=quantize)  # noqa: E731
    assert sharding.load_kwargs(args(torch.device("cuda", 1)), None) == {"device_map": {"": "cuda:1"}}
    assert sharding.load_kwargs(args("mps"), None) == {"device_map": {"": "mps"}}
    assert sharding.load_kwargs(args(torch.device("cpu")), None) == {}
    assert sharding.load_kwargs(args(torch.device("cuda", 0), "nf4"), None) == {}
    assert sharding.load_kwargs(args(torch.device("cuda", 0)), "deepspeed") == {}


# about 13 s each (deepspeed start-up on 2 processes); fp32 is also covered by tests/test_zero3.py
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "bf16"])
def test_zero3_routers_found_read_and_written(mixtral_legacy, precision):
    """Real ZeRO-3 partitions (local shape [0]) on 2 gloo ranks: routers found by `ds_shape`,
    gathered alone for their state dict, and written back through GatheredParameters and into
    DeepSpeed's fp32 masters. bf16: after a step, read from the fp32 masters, not the bf16 copy."""
    pytest.importorskip("deepspeed")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(
        run
        + [str(ROOT / "tests" / "zero3_script.py"), str(mixtral_legacy)]
        + (["bf16"] if precision == "bf16" else []),
        env={**ENV, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ZERO3 OK") == 2
