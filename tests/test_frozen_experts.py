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
