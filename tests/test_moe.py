"""model/ and io/: router discovery, freezing, fp32 routers, router state, fingerprints, layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from router_tune.architectures.on_disk import detect_layout
from router_tune.errors import RouterTuneError
from router_tune.model.fingerprints import checkpoint_fingerprints, expert_fingerprints, identical_expert_groups
from router_tune.model.loading import describe_moe, load_moe
from router_tune.model.routers import (
    find_routers,
    freeze_all_but_routers,
    load_router_state_dict,
    router_state_dict,
    routers_to_fp32,
)

MIXTRAL_ROUTERS = {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
QWEN2_ROUTERS = MIXTRAL_ROUTERS | {
    "model.layers.0.mlp.shared_expert_gate.weight",
    "model.layers.1.mlp.shared_expert_gate.weight",
}


@pytest.mark.parametrize(
    "fixture, arch, layout, names",
    [
        ("mixtral_legacy", "mixtral", "legacy", MIXTRAL_ROUTERS),
        ("mixtral_fused", "mixtral", "fused", MIXTRAL_ROUTERS),
        ("qwen2_moe", "qwen2_moe", "legacy", QWEN2_ROUTERS),
        ("qwen3_moe", "qwen3_moe", "legacy", MIXTRAL_ROUTERS),
        ("olmoe", "olmoe", "legacy", MIXTRAL_ROUTERS),
    ],
)
def test_router_names_and_freezing(request, fixture, arch, layout, names):
    path = request.getfixturevalue(fixture)
    model, info = load_moe(path)
    assert (info.architecture, info.layout, info.moe_layers, info.num_experts, info.top_k) == (
        arch,
        layout,
        [0, 1],
        4,
        2,
    )
    assert detect_layout(path) == layout
    assert {n for r in info.routers for n in r.param_names} == names
    assert set(router_state_dict(model)) == names

    counts = freeze_all_but_routers(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names
    assert counts.trainable == sum(model.get_parameter(n).numel() for n in names)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert 0 < counts.percent < 1


def test_qwen_norm_topk_flag(qwen2_moe, qwen3_moe):
    assert load_moe(qwen2_moe)[1].normalizes_topk is True  # the factory sets norm_topk_prob=True
    assert load_moe(qwen3_moe)[1].normalizes_topk is False  # Qwen3 default: weights do not sum to 1


def test_fp32_routers_in_bf16_model_train(mixtral_bf16):
    model, info = load_moe(mixtral_bf16)
    assert info.dtype == torch.bfloat16
    freeze_all_but_routers(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    router_before = router_state_dict(model)

    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(lg.dtype == torch.float32 for lg in out.router_logits)  # the recorder still sees the routers
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    (out.loss + out.aux_loss).backward()
    for ref in info.routers:
        grad = ref.module.weight.grad
        assert ref.module.weight.dtype == torch.float32 and grad.dtype == torch.float32
        assert grad.abs().sum() > 0

    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert p.grad is None and torch.equal(p, frozen_before[n]), n  # bit-identical
    after = router_state_dict(model)
    assert all(not torch.equal(after[n], router_before[n]) for n in after)


def test_fp32_routers_are_exact_on_fp32_model_and_jitter_only_in_training(mixtral_legacy):
    model, _ = load_moe(mixtral_legacy, fp32_routers=False)
    ids = torch.randint(3, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
        routers_to_fp32(model, jitter=0.1)
        same = model(input_ids=ids, output_router_logits=True)  # eval mode: no jitter
        assert torch.equal(ref.logits, same.logits)
        assert all(torch.equal(a, b) for a, b in zip(ref.router_logits, same.router_logits))
        model.train()
        noisy = model(input_ids=ids, output_router_logits=True)
        assert not torch.equal(noisy.router_logits[0], ref.router_logits[0])
    routers_to_fp32(model)  # idempotent, and jitter can be turned off again
    assert all(type(r.module).__mro__[1].__name__ == "MixtralTopKRouter" for r in find_routers(model))
    assert all(r.module.router_jitter == 0.0 for r in find_routers(model))


def test_qwen2_shared_expert_gate_fp32_keeps_model_dtype(qwen2_moe):
    model, _ = load_moe(qwen2_moe, dtype=torch.bfloat16)
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert isinstance(gate, nn.Linear) and gate.weight.dtype == torch.float32
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert gate(x).dtype == torch.bfloat16
    ids = torch.randint(3, 320, (1, 12))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_router_state_dict_roundtrip_and_validation(mixtral_legacy, qwen2_moe):
    model, _ = load_moe(mixtral_legacy)
    state = {n: torch.randn_like(t) for n, t in router_state_dict(model).items()}
    load_router_state_dict(model, state)
    assert all(torch.equal(model.get_parameter(n), t) for n, t in state.items())

    qwen_state = router_state_dict(load_moe(qwen2_moe)[0])
    with pytest.raises(RouterTuneError, match="unexpected: model.layers.0.mlp.shared_expert_gate.weight"):
        load_router_state_dict(model, qwen_state)
    bad = dict(state, **{"model.layers.1.mlp.gate.weight": torch.zeros(8, 32)})
    with pytest.raises(RouterTuneError, match=r"wrong shape: model.layers.1.mlp.gate.weight \(8, 32\)"):
        load_router_state_dict(model, bad)
    with pytest.raises(RouterTuneError, match="missing: model.layers.0.mlp.gate.weight"):
        load_router_state_dict(model, {"model.layers.1.mlp.gate.weight": state["model.layers.1.mlp.gate.weight"]})


def test_fingerprints(mixtral_legacy, mixtral_fused, mixtral_identical):
    legacy = expert_fingerprints(load_moe(mixtral_legacy)[0])
    assert len(legacy) == 2 and all(len(set(layer)) == 4 for layer in legacy)
    assert identical_expert_groups(legacy) == [[], []]
    # same seed, other on-disk layout: same weights, same fingerprints
    assert expert_fingerprints(load_moe(mixtral_fused)[0]) == legacy
    identical = expert_fingerprints(load_moe(mixtral_identical)[0])
    assert identical_expert_groups(identical) == [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]
    assert identical_expert_groups([["a", "b", "a", "c", "b"]]) == [[[0, 2], [1, 4]]]


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "mixtral_fused", "mixtral_bf16", "qwen2_moe", "olmoe"])
def test_fingerprints_from_the_files_equal_the_loaded_model(request, fixture):
    """Two independent routes to one digest: the safetensors bytes of either layout, read as byte
    ranges, and the tensors transformers loaded (fused, converted from legacy when stored so)."""
    path = request.getfixturevalue(fixture)
    from_model = expert_fingerprints(load_moe(path, fp32_routers=False)[0])
    assert checkpoint_fingerprints(path) == from_model
    assert len(from_model) == 2 and all(len(set(layer)) == 4 for layer in from_model)


def test_router_count_mismatch_lists_matches(mixtral_legacy):
    model, _ = load_moe(mixtral_legacy)
    model.model.layers[1].mlp.gate = nn.Linear(32, 4, bias=False)  # not a router class: not found
    with pytest.raises(RouterTuneError, match=r"found: \['model.layers.0.mlp.gate \(4, 32\)'\]"):
        find_routers(model)


def test_describe_loaded_model_and_dense_error(mixtral_fused, dense_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(mixtral_fused)
    info = describe_moe(model)
    assert (info.layout, info.model_class, len(info.routers)) == ("fused", "MixtralForCausalLM", 2)
    with pytest.raises(RouterTuneError, match="this is a dense LlamaForCausalLM; router_tune needs a MoE checkpoint"):
        describe_moe(AutoModelForCausalLM.from_pretrained(dense_llama))


def test_router_logits_stay_fp32_under_bf16_autocast(mixtral_legacy):
    """Mixed-precision training runs the model under autocast, which would run the router's
    linear in bf16 unless the fp32 router opts out of it."""
    model, _ = load_moe(mixtral_legacy)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16  # autocast is really on
    assert all(r.dtype == torch.float32 for r in out.router_logits)
    hidden = torch.randn(5, model.config.hidden_size)
    gate = model.model.layers[0].mlp.gate
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = gate(hidden)[0]
    torch.testing.assert_close(logits, hidden @ gate.weight.T, rtol=1e-6, atol=1e-6)


def test_router_logits_capture_equals_output_router_logits(mixtral_legacy):
    from router_tune.model.routers import RouterLogitsCapture

    model, _ = load_moe(mixtral_legacy)
    capture = RouterLogitsCapture(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    reference = model(input_ids=ids, output_router_logits=True).router_logits
    model(input_ids=ids)  # outside the context nothing is recorded
    with capture() as logits:
        out = model(input_ids=ids)
    assert out.router_logits is None and len(logits) == len(reference) == 2
    for got, want in zip(logits, reference):
        torch.testing.assert_close(got, want)
    capture.remove()
    with capture() as logits:
        model(input_ids=ids)
    assert logits == []


def test_loads_keep_hub_kernels_off_unless_asked(mixtral_legacy, monkeypatch):
    """transformers >= 5.25 kernelizes every load when `kernels` imports (hub code under the routers, and
    `kernelize` refuses the meta device export verification loads on): ours stay off unless asked."""
    from transformers import AutoModelForCausalLM

    from router_tune.export.verify import check_loads

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model, _ = load_moe(mixtral_legacy)
    assert model.use_kernels is False
    check_loads(mixtral_legacy)  # the meta-device load of export verification

    asked = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.update(kwargs)
        return real(cls, *args, **{**kwargs, "use_kernels": False})  # no hub here: record the request only

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_moe(mixtral_legacy, use_hub_kernels=True)
    assert asked["use_kernels"] is True


@pytest.mark.parametrize(
    "native, slowdown, expected",
    [(True, 12.0, torch.float32), (True, 1.1, torch.bfloat16), (False, 1.1, torch.float32)],
)
def test_auto_dtype_on_a_cpu_without_native_bf16_computes_in_fp32(
    mixtral_bf16, monkeypatch, native, slowdown, expected
):
    """`auto` keeps a bf16 checkpoint's dtype unless the CPU emulates bf16 matmuls (oneDNN's flag, or a
    measured slowdown; a timing that reads low must not keep an emulated bf16: it did, at 2.2x on an
    AVX2 CPU whose warm ratio is 75x); an explicit dtype is always obeyed, and a GPU keeps the stored dtype."""
    from router_tune.model import loading

    monkeypatch.setattr(loading, "native_half_matmul", lambda dtype: native)
    monkeypatch.setattr(loading, "cpu_matmul_slowdown", lambda dtype: slowdown)
    model, info = load_moe(mixtral_bf16, compute_device="cpu")
    frozen = model.model.layers[0].mlp.experts.gate_up_proj
    assert (frozen.dtype, info.dtype, info.stored_dtype) == (expected, expected, torch.bfloat16)
    assert (info.dtype_note is not None) == (expected == torch.float32)
    if info.dtype_note:
        assert "computed in float32" in info.dtype_note and "model_dtype: bfloat16" in info.dtype_note
    model, info = load_moe(mixtral_bf16, dtype="bfloat16", compute_device="cpu")
    assert info.dtype == torch.bfloat16 and info.dtype_note is None
    assert loading.compute_dtype("auto", torch.bfloat16, "cuda") == ("auto", None)
    model, info = load_moe(mixtral_bf16)  # no compute device (export verification): as stored
    assert info.dtype == torch.bfloat16
