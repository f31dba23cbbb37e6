"""model/frozen_experts.py: the gated activation that keeps only gate_up's output for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from router_tune.model.frozen_experts import save_less_for_frozen_experts
from router_tune.model.routers import freeze_all_but_routers

BATCH, SEQ = 3, 17  # 51 tokens: uneven per expert


def router_grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def pair(model) -> tuple:
    freeze_all_but_routers(model)
    model.train()
    saving = copy.deepcopy(model)
    assert save_less_for_frozen_experts(saving) == model.config.num_hidden_layers
    return model, saving


def gelu_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(3)
    config = MixtralConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=320, hidden_act="gelu",
    )  # fmt: skip
    return MixtralForCausalLM(config)


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "qwen2_moe", "qwen3_moe", "olmoe", "gelu"])
def test_same_outputs_and_router_gradients(request, fixture):
    """The same logits, and router gradients equal to float32 rounding (transformers' grouped_mm takes no
    float64; the recomputed activation runs the same kernels, so they come out bit-equal here)."""
    if fixture == "gelu":
        model = gelu_mixtral()
    else:
        model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    reference, saving = pair(model)
    ids = torch.randint(0, 320, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    logits, grads = router_grads(reference, ids)
    logits_saving, grads_saving = router_grads(saving, ids)
    assert torch.equal(logits, logits_saving)
    assert grads.keys() == grads_saving.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_saving[name], grad, rtol=1e-6, atol=1e-9, msg=name)


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one forward, parameters left out (they are resident anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(storages.values())


def test_keeps_one_intermediate_vector_less_per_routed_token():
    """The saving is exactly act(gate): intermediate_size values per routed (token, expert) pair in every
    layer whose experts' inputs need a gradient (all but the first: its input is the frozen embeddings)."""
    reference, saving = pair(gelu_mixtral())
    ids = torch.randint(0, 320, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    config = reference.config
    pairs = BATCH * SEQ * config.num_experts_per_tok
    expected = (config.num_hidden_layers - 1) * pairs * config.intermediate_size * 4  # float32
    assert saved_activation_bytes(reference, ids) - saved_activation_bytes(saving, ids) == expected


def test_bf16_saved_gate_up_halves_it_and_keeps_the_forward_exact():
    """expert_saved_dtype bfloat16: gate_up kept in 2 bytes instead of 4 (every layer but the first, whose experts'
    input needs no gradient), the same float32 logits, and router gradients within bfloat16 rounding."""
    reference, saving = pair(gelu_mixtral())
    narrow = copy.deepcopy(reference)
    save_less_for_frozen_experts(narrow, torch.bfloat16)
    ids = torch.randint(0, 320, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    config = reference.config
    pairs = BATCH * SEQ * config.num_experts_per_tok
    halved = (config.num_hidden_layers - 1) * pairs * 2 * config.intermediate_size * 2  # gate_up: 4 -> 2 bytes
    assert saved_activation_bytes(saving, ids) - saved_activation_bytes(narrow, ids) == halved
    logits, grads = router_grads(saving, ids)
    logits_narrow, grads_narrow = router_grads(narrow, ids)
    assert torch.equal(logits, logits_narrow)
    for name, grad in grads.items():
        if f"layers.{config.num_hidden_layers - 1}." in name:  # the last layer's: no expert above it to pass
            torch.testing.assert_close(grads_narrow[name], grad, rtol=1e-6, atol=1e-9, msg=name)
            continue
        assert not torch.equal(grads_narrow[name], grad), name  # the rounded copy is what backward read
        cosine = torch.nn.functional.cosine_similarity(grads_narrow[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.999, (name, cosine)


def test_expert_saved_dtype_auto_narrows_only_a_16_bit_checkpoint_computed_in_float32():
    from router_tune.model.frozen_experts import expert_saved_dtype

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert expert_saved_dtype("auto", bf16, f32) == expert_saved_dtype("auto", f16, f32) == bf16
    assert expert_saved_dtype("auto", f32, f32) is expert_saved_dtype("auto", None, f32) is None
    assert expert_saved_dtype("auto", bf16, bf16) is expert_saved_dtype("compute", bf16, f32) is None
    assert expert_saved_dtype("bfloat16", f32, f32) == bf16


def test_the_trainer_keeps_a_bf16_checkpoints_gate_up_in_bf16(mixtral_bf16, tmp_path):
    from tests.trainers import make_trainer

    for setting, want in (("auto", torch.bfloat16), ("compute", None)):
        trainer = make_trainer(
            mixtral_bf16, tmp_path / setting, steps=1, model_dtype="float32", expert_saved_dtype=setting
        )
        experts = [m for m in trainer.model.modules() if hasattr(m, "saved_gate_up_dtype")]
        assert experts and {m.saved_gate_up_dtype for m in experts} == {want}, setting
