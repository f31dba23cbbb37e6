"""DeepSpeed ZeRO-3 through RouterTrainer on CPU: real gloo processes, real ZeRO-3 partitions.

The 2-rank runs are launched as a user launches them, with the shipped
recipes/accelerate/cpu-deepspeed-zero3.yaml and DS_ACCELERATOR=cpu (accelerate -> Trainer ->
deepspeed.initialize). Each rank must hold half of every decoder layer's frozen weights, train the
same routers as one plain process on the same global batch, write router-only checkpoints, and
resume from one to the same routers as the uninterrupted run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from router_tune.architectures import architecture_for
from router_tune.errors import RouterTuneError
from router_tune.training import sharding
from tests.cli_runs import free_port
from tests.rank_reports import read_reports

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "zero3_train_script.py"
# no ACCELERATE_USE_CPU: accelerate would turn the DeepSpeed request into plain DDP
ENV = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
ENV.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"})


def _run(cmd: list[str], timeout: float = 400) -> list[dict]:
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return read_reports(proc.stdout)


def _two_ranks(model_dir, out, steps, resume=None) -> list[dict]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += ["recipes/accelerate/cpu-deepspeed-zero3.yaml", "--main_process_port", str(free_port())]
    return _run(launch + [str(SCRIPT), str(model_dir), str(out), "2", "2", str(steps)] + ([resume] if resume else []))


def _one_process(model_dir, out, steps, batch=8, ga=1) -> list[dict]:
    return _run([sys.executable, str(SCRIPT), str(model_dir), str(out), str(batch), str(ga), str(steps)])


def _assert_equal_routers(a_dir: Path, b_dir: Path, rtol=1e-5, atol=1e-7) -> dict:
    a, b = load_file(a_dir / "routers.safetensors"), load_file(b_dir / "routers.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol)
    return a


def test_zero3_two_ranks_equal_one_process_and_resume(mixtral_legacy, tmp_path):
    two = _two_ranks(mixtral_legacy, tmp_path / "two", 3)
    assert [r["world"] for r in two] == [2, 2] and all(r["step"] == 3 for r in two)
    for r in two:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED", r
        # every frozen decoder-layer weight is a ZeRO-3 partition (empty outside a gathered forward)
        # and this rank keeps half of their elements
        assert r["layer_partitioned"], r
        assert r["layer_local_numel"] == r["layer_numel"] // 2, r
        assert r["shard_fraction"] == pytest.approx(0.5, abs=0.01), r

    one = _one_process(mixtral_legacy, tmp_path / "one", 3)
    assert one[0]["world"] == 1 and one[0]["shard_fraction"] == 1.0
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    # the router-input probe runs inside the engine, and its rates are the one-process run's on every rank
    for r in two:
        assert r["router_input_l1"] == pytest.approx(one[0]["router_input_l1"], rel=1e-5), r
        assert r["router_adam_rates"] == pytest.approx(one[0]["router_adam_rates"], rel=1e-5), r
    routers = _assert_equal_routers(tmp_path / "two", tmp_path / "one")
    source = load_file(next(Path(mixtral_legacy).glob("*.safetensors")))
    for name, t in routers.items():
        assert t.dtype == torch.float32
        assert not torch.equal(t, source[name.replace("mlp.gate", "block_sparse_moe.gate")].float())

    # router-only checkpoint: routers.safetensors (gathered), and DeepSpeed's own files for what its
    # optimizer holds (the routers' fp32 partitions and Adam moments), not the frozen weights' partitions
    ckpt = tmp_path / "two" / "checkpoint-2"
    router_bytes = sum(t.numel() * 4 for t in routers.values())
    assert (ckpt / "routers.safetensors").stat().st_size < router_bytes + 1024
    optim = [torch.load(f, weights_only=False) for f in sorted(ckpt.glob("global_step2/*optim_states.pt"))]
    assert len(optim) == 2
    partitions = [t for o in optim for t in o["optimizer_state_dict"]["fp32_flat_groups"]]
    assert sum(t.numel() for t in partitions) == router_bytes // 4  # the routers, each rank half
    model_bytes = sum(p.stat().st_size for p in Path(mixtral_legacy).glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in ckpt.rglob("*.pt")) + (ckpt / "routers.safetensors").stat().st_size
    # ~16 KB here, most of it pickling overhead and the DeepSpeed config; the model is 309 KB
    assert weights < 0.1 * model_bytes, (weights, model_bytes)

    # resume from checkpoint-2 on 2 ranks: the same routers as the uninterrupted run
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-2")
    resumed = _two_ranks(mixtral_legacy, tmp_path / "resumed", 3, resume="last")
    assert resumed[0]["step"] == 3
    _assert_equal_routers(tmp_path / "resumed", tmp_path / "two", rtol=1e-6, atol=1e-8)


@pytest.mark.slow  # about 35 s per architecture: a 2-rank and a 1-process run
@pytest.mark.parametrize("fixture", ["qwen2_moe", "qwen3_moe"])
def test_zero3_other_architectures_equal_one_process(fixture, request, tmp_path):
    """Their own MoE-block classes as leaves (Qwen2-MoE also trains its shared-expert gate)."""
    model_dir = request.getfixturevalue(fixture)
    two = _two_ranks(model_dir, tmp_path / "two", 2)
    assert all(r["layer_partitioned"] and r["layer_local_numel"] == r["layer_numel"] // 2 for r in two), two
    one = _one_process(model_dir, tmp_path / "one", 2)
    assert two[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5)
    _assert_equal_routers(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow  # about 30 s: a 2-rank and a 1-process run
def test_zero3_rescales_saturated_routers_as_one_process(mixtral_saturated, tmp_path):
    """router_rescale's probe runs once DeepSpeed's engine exists (a partitioned model has no forward
    before) and writes the rescaled routers into the partitions and the fp32 masters."""
    two = _two_ranks(mixtral_saturated, tmp_path / "two", 1)
    # the same global batch of 8, and the same 2 first blocks (one micro-batch) probed
    one = _one_process(mixtral_saturated, tmp_path / "one", 1, batch=2, ga=4)
    assert one[0]["router_rescaling"], "the fixture's routers should need rescaling"
    for r in two:
        assert [c["layer"] for c in r["router_rescaling"]] == [c["layer"] for c in one[0]["router_rescaling"]]
        for a, b in zip(r["router_rescaling"], one[0]["router_rescaling"]):
            assert a == pytest.approx(b, rel=1e-5)
    _assert_equal_routers(tmp_path / "two", tmp_path / "one")


def test_zero3_forward_keeps_no_gathered_experts_for_backward():
    """ZeRO-3 releases a leaf block after its forward, but autograd saves *views* of its fused expert
    weights (`gate_up_proj[e]`), which would keep every block's gathered experts until backward: on
    each rank, the whole model's experts at the peak. With `saved_views_by_reference` (what
    RouterTrainer's forward uses under ZeRO-3) the forward holds less than one layer's experts, the
    plain forward holds all three layers' (the control: if DeepSpeed stops saving views, this says so),
    and the loss and the router gradients are the same bits. 2 gloo ranks, different tokens per rank."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    reports = _run(run + [str(ROOT / "tests" / "zero3_views_script.py")])
    assert len(reports) == 2
    for r in reports:
        layer = r["layer_expert_bytes"]
        assert r["plain_held_after_forward"] - r["by_reference_held_after_forward"] > 2.5 * layer, r
        assert r["by_reference_held_after_forward"] < 0.75 * layer, r
        assert r["by_reference_loss"] == r["plain_loss"]
        assert r["by_reference_grads_sha256"] == r["plain_grads_sha256"] and r["plain_grads_norm"] > 0
    assert reports[0]["plain_loss"] != reports[1]["plain_loss"]  # the ranks saw different tokens


@pytest.mark.slow  # 2-8 minutes on 2 busy cores: 2 ranks, 4 forward/backward passes of 300 MB layers
@pytest.mark.timeout(1500)
def test_zero3_activation_checkpointing_holds_one_gathered_block():
    """Non-reentrant activation checkpointing (transformers 5's, on in the Raiden recipes) installs its own
    saved-tensor hooks, so `saved_views_by_reference` does nothing inside a checkpointed layer. Measured
    harmless, for two reasons: the checkpointed forward saves nothing of a layer but its input (no views, so
    nothing gathered is held: less than without checkpointing), and DeepSpeed attributes the frozen
    parameters a recompute gathers to the module whose backward triggered it (`update_recompute_parameters`,
    deepspeed/runtime/zero/partitioned_param_coordinator.py), so they stay gathered once until that backward
    releases them: the MoE block's own pre-backward hook finds them there and gathers nothing again. Both
    with the recompute triggered inside the MoE block (Mixtral, Qwen2/3-MoE and OLMoE layers end with the
    residual add, which saves nothing) and, as a control, before it (a tensor saved after the block inside
    the checkpointed layer, as a post-block norm would): the whole step holds no more than without
    checkpointing, loss and gradients are the same bits. Seen failing with DeepSpeed's attribution made a
    no-op: the recompute released the weights before backward read them ("Recomputed values ... have
    different metadata", shape [0])."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    reports = _run(run + [str(ROOT / "tests" / "zero3_views_script.py"), "checkpointing"], timeout=1200)
    assert len(reports) == 2
    for r in reports:
        layer = r["layer_expert_bytes"]
        step = {m: r[f"{m}_held_after_forward"] + r[f"{m}_backward_peak"] for m in MODES_CHECKPOINTING}
        for mode in MODES_CHECKPOINTING[1:]:
            assert r[f"{mode}_held_after_forward"] < 0.1 * layer, (mode, r)  # the layers' inputs only
            assert step[mode] < step["no_checkpointing"] + 0.4 * layer, (mode, r)  # a second gathered block: +1
            assert r[f"{mode}_loss"] == r["no_checkpointing_loss"]
            assert r[f"{mode}_grads_sha256"] == r["no_checkpointing_grads_sha256"], mode
        assert r["no_checkpointing_grads_norm"] > 0


MODES_CHECKPOINTING = ("no_checkpointing", "checkpointing", "checkpointing_saved_after_block")


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_blocks_are_zero3_leaves(fixture, request):
    """Every supported architecture: its MoE blocks, and only they, are ZeRO-3 leaf modules, and the
    embeddings' output requires grad (the first leaf block's input, everything below it frozen)."""
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM

    from router_tune.model.routers import freeze_all_but_routers

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    freeze_all_but_routers(model)
    block = architecture_for(model.config).block_class()
    sharding.prepare_zero3(model, block)
    leaves = [m for m in model.modules() if z3_leaf_module(m)]
    assert leaves and all(isinstance(m, block) for m in leaves)
    assert len(leaves) == len(architecture_for(model.config).moe_layers(model.config))
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_deepspeed_request_never_downgraded(monkeypatch):
    """accelerate turns DeepSpeed with use_cpu into DDP, and counts one process when it is not given a
    backend: both are refused, before any weight is read or after accelerate set up its state."""
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RouterTuneError, match="accelerate then ignores DeepSpeed"):
        sharding.check_request(SimpleNamespace(deepspeed=None, fsdp=None, use_cpu=True))

    def accelerator(kind, processes, stage=3):
        plugin = SimpleNamespace(zero_stage=stage) if kind == DistributedType.DEEPSPEED else None
        return SimpleNamespace(
            distributed_type=kind, num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin)
        )

    sharding.check_wrapped(accelerator(DistributedType.DEEPSPEED, 2), "deepspeed")
    for wrong in (
        accelerator(DistributedType.MULTI_CPU, 2),
        accelerator(DistributedType.DEEPSPEED, 1),
        accelerator(DistributedType.DEEPSPEED, 2, stage=2),
    ):
        with pytest.raises(RouterTuneError, match="asks for DeepSpeed ZeRO-3 over 2 processes"):
            sharding.check_wrapped(wrong, "deepspeed")
