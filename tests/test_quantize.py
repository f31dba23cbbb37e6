"""quantize: nf4 | int8 — frozen weights in bitsandbytes layers, routers fp32 (CPU, bitsandbytes >= 0.46)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from router_tune.errors import RouterTuneError
from router_tune.evaluation.evaluate import load_for_eval
from router_tune.export.exporter import export_run
from router_tune.model.loading import describe_moe, load_moe
from router_tune.model.memory import training_memory
from router_tune.model.quantize import quantize_model, quantized_experts_forward, stored_bytes
from router_tune.model.routers import freeze_all_but_routers, router_param_names, routers_to_fp32
from tests.run_dirs import router_disk
from tests.trainers import make_trainer, source_tensors

bnb = pytest.importorskip("bitsandbytes", minversion="0.46", reason="the quant extra (router-tune[quant])")
BNB_LAYER = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def quantized_storages(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every bitsandbytes weight's packed data, by module name (what must never change)."""
    return {
        name: m.weight.data.clone()
        for name, m in model.named_modules()
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


@pytest.mark.parametrize("mode", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_training_changes_only_routers(mode, qwen2_moe, tmp_path):
    before = source_tensors(qwen2_moe)
    trainer = make_trainer(qwen2_moe, tmp_path / "run", steps=3, quantize=mode)
    model = trainer.model
    # every expert matrix and attention projection is a bitsandbytes layer; the fused bf16/fp32 copies are gone
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert not hasattr(experts, "gate_up_proj") and not hasattr(experts, "down_proj")
        assert len(experts.quantized_gate_up_proj) == len(experts.quantized_down_proj) == 4
        assert all(
            isinstance(m, BNB_LAYER[mode]) for m in [*experts.quantized_gate_up_proj, *experts.quantized_down_proj]
        )
        assert all(isinstance(getattr(layer.self_attn, p), BNB_LAYER[mode]) for p in ("q_proj", "k_proj", "o_proj"))
        assert isinstance(layer.mlp.shared_expert.up_proj, BNB_LAYER[mode])
        # routing modules: the fp32 router classes, never bitsandbytes
        for router in (layer.mlp.gate, layer.mlp.shared_expert_gate):
            assert getattr(router, "fp32_router", False) and not isinstance(router, tuple(BNB_LAYER.values()))
            assert router.weight.dtype == torch.float32 and router.weight.requires_grad
    assert type(model.lm_head) is nn.Linear  # the head stays unquantized unless quantize_head
    assert model.config._experts_implementation == "router_tune_quantized"
    frozen = quantized_storages(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    trainer.train()
    routers = set(router_param_names(model))
    assert routers == {f"model.layers.{i}.mlp.{g}.weight" for i in range(2) for g in ("gate", "shared_expert_gate")}
    after = dict(model.named_parameters())
    for name in routers:
        assert not torch.equal(after[name].detach(), before[name]), f"router {name} did not train"
        assert after[name].dtype == torch.float32
    for name, data in quantized_storages(model).items():
        assert torch.equal(data, frozen[name]), f"quantized {name} changed"
    for name, tensor in others.items():
        assert torch.equal(after[name].detach(), tensor), f"frozen {name} changed"
    trainer.save_model()
    meta = json.loads((tmp_path / "run" / "router_tune.json").read_text())
    assert meta["quantization"]["mode"] == mode and meta["quantization"]["quantized_elements"] > 0


def test_eval_mode_forward_keeps_the_training_gradient(mixtral_legacy):
    """bitsandbytes repacks nf4 weights for an autograd-less CPU kernel on an eval-mode forward; after
    the before/after evaluation, training would then get no gradient through the experts."""
    model, _ = load_moe(mixtral_legacy)
    freeze_all_but_routers(model)
    quantize_model(model, "nf4")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 300, 19]])

    def first_router_grad():
        model.zero_grad()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return model.model.layers[0].mlp.gate.weight.grad.clone()

    fresh = first_router_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert fresh.abs().sum() > 0
    torch.testing.assert_close(first_router_grad(), fresh, rtol=0, atol=0)


def test_quantized_forward_matches_dequantized_weights(mixtral_legacy):
    """The registered experts forward computes the same function as transformers' own experts forward
    run on the dequantized weights: quantization changes the weights, not the routing arithmetic."""
    model, _ = load_moe(mixtral_legacy)
    quantize_model(model, "nf4", head=True)
    reference, _ = load_moe(mixtral_legacy)
    with torch.no_grad():
        for layer, ref in zip(model.model.layers, reference.model.layers):
            experts, ref_experts = layer.mlp.experts, ref.mlp.experts
            for e, (up, down) in enumerate(zip(experts.quantized_gate_up_proj, experts.quantized_down_proj)):
                ref_experts.gate_up_proj[e] = bnb.functional.dequantize_4bit(up.weight.data, up.weight.quant_state)
                ref_experts.down_proj[e] = bnb.functional.dequantize_4bit(down.weight.data, down.weight.quant_state)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                q = getattr(layer.self_attn, p)
                getattr(ref.self_attn, p).weight.copy_(
                    bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
                )
        head = model.lm_head
        reference.lm_head.weight.copy_(bnb.functional.dequantize_4bit(head.weight.data, head.weight.quant_state))
    reference.config._experts_implementation = "eager"
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 300, 19]])
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_rescale_probe_runs_with_every_module_on_the_training_device(mixtral_saturated, tmp_path, monkeypatch):
    """On one GPU the bitsandbytes layers are made on the GPU while the model loads on the host: the
    rescale probe (a forward pass) fails with a device mismatch unless the embeddings, norms and
    routers reach that device first. Without a second device here, every `.to(device)` marks the
    modules it moves, and the probe checks that each module with weights was moved to the run's device."""
    import router_tune.training.trainer as trainer_module

    real_to, real_probe, seen = nn.Module.to, trainer_module.rescale_routers, {}

    def marking_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            for module in self.modules():
                module.placed_on = device
        return real_to(self, *args, **kwargs)

    def checked_probe(model, *args):
        holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        seen["unplaced"] = sorted({type(m).__name__ for m in holders if not hasattr(m, "placed_on")})
        seen["devices"] = {getattr(m, "placed_on", None) for m in holders}
        return real_probe(model, *args)

    monkeypatch.setattr(nn.Module, "to", marking_to)
    monkeypatch.setattr(trainer_module, "rescale_routers", checked_probe)
    trainer = make_trainer(mixtral_saturated, tmp_path / "run", steps=1, quantize="nf4", router_rescale="1.0")
    assert seen["unplaced"] == [] and seen["devices"] == {trainer.args.device}, seen
    assert trainer.router_rescaling  # the probe ran and rescaled


# aten ops that wait for the device: a data-dependent output size, or a value read to the host
HOST_SYNC_OPS = ("nonzero", "_local_scalar_dense", "_unique2", "unique_dim", "unique_consecutive", "masked_select")


def test_quantized_experts_sync_once_per_layer_and_match_the_eager_forward(monkeypatch):
    """One host sync per experts call, whatever the number of experts hit (a GPU waits on each), and
    the same output and routing-weight gradient as transformers' own eager experts forward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)
    experts = MixtralExperts(config).double()  # float64: only summation order may differ, far below 1e-12
    nn.init.normal_(experts.gate_up_proj, std=0.3)
    nn.init.normal_(experts.down_proj, std=0.3)
    for name in ("gate_up_proj", "down_proj"):  # as quantize_model lays them out: one layer per expert
        layers = [nn.Linear(w.shape[1], w.shape[0], bias=False).double() for w in getattr(experts, name)]
        for layer, w in zip(layers, getattr(experts, name)):
            layer.weight.data.copy_(w.detach())
        setattr(experts, f"quantized_{name}", nn.ModuleList(layers))
    hidden = torch.randn(40, 16, dtype=torch.float64)
    # distinct experts per token, expert 7 never chosen: the unused expert must be skipped
    top_k_index = torch.rand(40, 7).topk(2, dim=-1).indices
    weights = torch.rand(40, 2, dtype=torch.float64).softmax(-1).requires_grad_()

    syncs = []

    class Syncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in HOST_SYNC_OPS:
                syncs.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    real_tolist = torch.Tensor.tolist  # on a CPU tensor it reads memory without an aten op
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append("tolist") or real_tolist(t))
    with Syncs():
        out = quantized_experts_forward(experts, hidden, top_k_index, weights)
    assert len(syncs) == 1, syncs
    (grad,) = torch.autograd.grad(out.square().sum(), weights)

    experts.config._experts_implementation = "eager"
    reference = experts(hidden, top_k_index, weights)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), weights)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-12, atol=1e-12)


def test_resume_equals_an_uninterrupted_quantized_run(mixtral_legacy, tmp_path):
    kw = dict(quantize="nf4", activation_checkpointing=True, save_steps=2)
    make_trainer(mixtral_legacy, tmp_path / "straight", steps=4, **kw).train()
    make_trainer(mixtral_legacy, tmp_path / "split", steps=2, **kw).train()
    resumed = make_trainer(mixtral_legacy, tmp_path / "split", steps=4, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    straight = load_file(tmp_path / "straight" / "checkpoint-4" / "routers.safetensors")
    split = load_file(tmp_path / "split" / "checkpoint-4" / "routers.safetensors")
    assert set(straight) == set(split) == set(router_param_names(resumed.model))
    moved = load_file(tmp_path / "split" / "checkpoint-2" / "routers.safetensors")
    for name in straight:
        assert not torch.equal(straight[name], moved[name])  # steps 3-4 changed the routers
        torch.testing.assert_close(split[name], straight[name], rtol=0, atol=1e-7)


def test_export_of_a_quantized_run_is_the_full_precision_source_plus_routers(mixtral_legacy, tmp_path):
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=2, quantize="int8", quantize_head=True)
    trainer.train()
    trainer.save_model()
    out = export_run(tmp_path / "run", tmp_path / "out")
    routers = load_file(tmp_path / "run" / "routers.safetensors")
    disk_routers = {router_disk(n, True): t for n, t in routers.items()}
    with (
        safe_open(str(mixtral_legacy / "model.safetensors"), "pt") as src,
        safe_open(str(out / "model.safetensors"), "pt") as dst,
    ):
        assert set(src.keys()) == set(dst.keys()) and set(disk_routers) <= set(src.keys())
        for name in src.keys():
            a, b = src.get_tensor(name), dst.get_tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape
            if name in disk_routers:
                assert torch.equal(b, disk_routers[name].to(b.dtype)) and not torch.equal(a, b)
            else:  # byte-identical: nothing of the quantized training model leaks into the export
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    card = (out / "README.md").read_text()
    assert "int8-quantized base" in card and "original full-precision" in card


def test_eval_defaults_to_full_precision_and_quantizes_on_request(mixtral_legacy, tmp_path):
    run = tmp_path / "run"
    trainer = make_trainer(mixtral_legacy, run, steps=1, quantize="nf4")
    trainer.train()
    trainer.save_model()
    full, *_ = load_for_eval(run)
    assert isinstance(full.model.layers[0].mlp.experts.gate_up_proj, nn.Parameter)
    quantized, *_ = load_for_eval(run, quantize="nf4")
    assert isinstance(quantized.model.layers[0].mlp.experts.quantized_gate_up_proj[0], bnb.nn.Linear4bit)
    for model in (full, quantized):  # the trained routers in both
        for name, tensor in load_file(run / "routers.safetensors").items():
            assert torch.equal(model.get_parameter(name), tensor)


@pytest.mark.parametrize("broken", ["missing", "too_old"])
def test_unavailable_mode_errors_before_loading(broken, mixtral_legacy, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the quantization check")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    if broken == "missing":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    else:
        monkeypatch.setattr(bnb, "__version__", "0.45.5")
    expected = "not installed" if broken == "missing" else ">= 0.46"
    with pytest.raises(RouterTuneError, match=expected) as err:
        make_trainer(mixtral_legacy, tmp_path / "run", quantize="nf4")
    assert "router-tune[quant]" in str(err.value)
    with pytest.raises(RouterTuneError, match=expected):
        load_for_eval(mixtral_legacy, quantize="int8")


def test_memory_plan_counts_what_quantization_stores(qwen2_moe):
    model, info = load_moe(qwen2_moe)
    routers_to_fp32(model)
    counts = freeze_all_but_routers(model)
    plain = training_memory(info, counts.total, counts.trainable, model.config.vocab_size, seq_len=64)
    # independent count: every expert matrix, attention projection and shared-expert MLP, by name
    names = ("experts.gate_up_proj", "experts.down_proj", "_proj.weight")
    expected = sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".layers." in n and n.endswith(names) and not n.endswith("shared_expert_gate.weight")
    )
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    plans = {
        mode: training_memory(
            describe_moe(meta),
            counts.total,
            counts.trainable,
            model.config.vocab_size,
            seq_len=64,
            quantize=mode,
            model=meta,
        )
        for mode in ("nf4", "int8")
    }
    summary = quantize_model(model, "nf4")
    assert plans["nf4"]["quantized_elements"] == expected == summary.quantized_elements
    assert plans["int8"]["weights_bytes"] < plain["weights_bytes"]  # (nf4's 1 KiB codebooks dominate tiny matrices)
    # the plan's quantized bytes are what the bitsandbytes layers really hold (data, scales, codebooks)
    held = sum(stored_bytes(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    planned = plans["nf4"]["weights_bytes"] - (plain["weights_bytes"] - summary.bytes_before)
    assert held == summary.bytes_after
    assert 0.98 < held / planned < 1.02, (held, planned)


def test_routing_modules_are_never_quantized(qwen2_moe):
    """Excluded by name, not only by class: before routers_to_fp32, shared_expert_gate is a plain nn.Linear."""
    model, _ = load_moe(qwen2_moe, fp32_routers=False)
    quantize_model(model, "int8")
    for layer in model.model.layers:
        assert type(layer.mlp.shared_expert_gate) is nn.Linear
        assert type(layer.mlp.gate).__name__ == "Qwen2MoeTopKRouter"
        assert isinstance(layer.mlp.shared_expert.gate_proj, bnb.nn.Linear8bitLt)
