"""Router gradient estimators: forward unchanged bit for bit, router gradient equal to a dense-mixture
formula written out by hand here, no extra backward through the experts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from router_tune.model.routers import find_routers, freeze_all_but_routers, routers_to_fp32
from router_tune.training.router_gradient import RouterGradient, unselected_outputs

ARCHS = ["mixtral_legacy", "qwen2_moe", "qwen3_moe", "olmoe"]  # renormalised: Mixtral, Qwen2-MoE; not: the others


def _model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    routers_to_fp32(model)
    freeze_all_but_routers(model)
    return model.train()


def _batch(seed=0):
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _swiglu(experts, e, h):
    """Expert e written out from its weights, independent of transformers' expert dispatch."""
    gate, up = (h @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T


def _weight_jacobian(p, selected, renormalised):
    """dw_e/dz_j per token [T, E, E] for the dense mixture: selected experts carry the model's weights
    (p_e / S, S live), unselected ones p_e / S with S held fixed (or p_e without renormalisation)."""
    eye = torch.eye(p.shape[1])
    dp = p.unsqueeze(2) * (eye - p.unsqueeze(1))  # dp_e/dz_j = p_e (delta_ej - p_j)
    if not renormalised:
        return dp
    s = (p * selected).sum(1).view(-1, 1, 1)
    ds = (dp * selected.unsqueeze(2)).sum(1, keepdim=True)  # dS/dz_j
    live = dp / s - p.unsqueeze(2) / s**2 * ds
    return torch.where(selected.unsqueeze(2), live, dp / s)


def _expected_last_router_grad(model, captured, mode, previous_ema=None):
    """The last MoE layer's router gradient from the dense-mixture formula (nothing after that layer
    depends on the estimator, so dL/d(block output) is the same in every mode). `previous_ema`: Default
    MoE's stand-in before this batch (None: this is the first batch)."""
    block, h, z, out = captured["block"], captured["h"], captured["z"], captured["out"]
    k, num_experts = model.config.num_experts_per_tok, z.shape[1]
    renormalised = bool(getattr(model.config, "norm_topk_prob", True))
    p = torch.softmax(z, dim=-1)
    selected = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(k, dim=-1).indices, True)
    with torch.no_grad():
        y = torch.stack([_swiglu(block.experts, e, h) for e in range(num_experts)], dim=1)  # [T, E, H]
    gout = out.grad.reshape(h.shape)
    g = torch.einsum("th,teh->te", gout, y)
    if mode == "default_moe":  # first batch: mean over routed tokens (all tokens for an unpicked expert)
        routed = selected.float().unsqueeze(2)
        mean = (y * routed).sum(0) / routed.sum(0).clamp_min(1)
        seen = selected.any(0).unsqueeze(1)
        if previous_ema is None:
            ema = torch.where(seen, mean, y.mean(0))
        else:
            ema = torch.where(seen, 0.9 * previous_ema + 0.1 * mean, previous_ema)
        captured["ema"] = ema
        g = torch.where(selected, g, gout @ ema.T)
    if mode == "sparse":
        g = g * selected
    jac = _weight_jacobian(p, selected, renormalised)
    dz = torch.einsum("te,tej->tj", g, jac)
    return dz.T @ h


def _capture_last_block(model):
    ref = find_routers(model)[-1]
    block = model.get_submodule(ref.module_name.rpartition(".")[0])
    captured = {"block": block}

    def on_gate(module, args, output):
        captured["z"] = output[0].detach()

    def on_block(module, args, output):
        if "out" in captured:  # the forward re-run by activation checkpointing: not part of the graph
            return
        captured["h"] = args[0].detach().reshape(-1, output.shape[-1])
        output.retain_grad()
        captured["out"] = output

    ref.module.register_forward_hook(on_gate)
    block.register_forward_hook(on_block)
    return ref, captured


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["sparse", "dense", "default_moe"])
def test_router_gradient_equals_dense_mixture_formula(arch, mode, request):
    model = _model(request.getfixturevalue(arch))
    ref, captured = _capture_last_block(model)
    RouterGradient(model, mode)
    model(**_batch()).loss.backward()
    expected = _expected_last_router_grad(model, captured, mode)
    torch.testing.assert_close(ref.module.weight.grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_default_moe_stand_in_is_an_ema_over_training_batches(checkpointing, qwen3_moe):
    """Batches run under `updating()` move the stand-in by EMA; the forward re-run by activation
    checkpointing during backward does not count a batch again."""
    model = _model(qwen3_moe)
    if checkpointing:
        model.activation_checkpointing_enable()
    ref, captured = _capture_last_block(model)
    estimator = RouterGradient(model, "default_moe")
    previous = None
    for seed in (0, 1, 2):
        ref.module.weight.grad = None
        captured.pop("out", None)
        with estimator.updating():
            loss = model(**_batch(seed)).loss
        loss.backward()
        expected = _expected_last_router_grad(model, captured, "default_moe", previous)
        torch.testing.assert_close(ref.module.weight.grad, expected, rtol=1e-4, atol=1e-7)
        previous = captured["ema"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_gradient_differs_from_sparse(arch, request):
    """Guards the test above against a harness in which every mode gives the same gradient."""
    grads = {}
    for mode in ("sparse", "dense", "default_moe"):
        model = _model(request.getfixturevalue(arch))
        RouterGradient(model, mode)
        model(**_batch()).loss.backward()
        grads[mode] = find_routers(model)[-1].module.weight.grad
    assert (grads["dense"] - grads["sparse"]).norm() > 1e-3 * grads["sparse"].norm()
    assert (grads["default_moe"] - grads["sparse"]).norm() > 1e-3 * grads["sparse"].norm()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["dense", "default_moe"])
def test_forward_is_bit_identical_to_sparse(arch, mode, request):
    model = _model(request.getfixturevalue(arch))
    batch = _batch(1)
    sparse = model(**batch).logits
    estimator = RouterGradient(model, mode)
    with estimator.updating():
        estimated = model(**batch).logits
    assert estimated.grad_fn is not None
    assert torch.equal(sparse.view(torch.int32), estimated.view(torch.int32))


def test_extra_expert_outputs_carry_no_autograd_history(mixtral_legacy):
    model = _model(mixtral_legacy)
    block = find_routers(model)[0].module_name.rpartition(".")[0]
    experts = model.get_submodule(block).experts
    experts.requires_grad_(True)
    hidden = torch.randn(8, model.config.hidden_size, requires_grad=True)
    selected = torch.zeros(8, model.config.num_local_experts, dtype=torch.bool)
    selected[:, :2] = True
    outputs = unselected_outputs(experts, hidden, selected)
    assert not outputs.requires_grad and outputs.grad_fn is None
    assert outputs[:, 2:].abs().sum() > 0 and outputs[:, :2].abs().sum() == 0


@pytest.mark.parametrize("mode", ["dense", "default_moe"])
def test_no_extra_backward_through_experts(mode, qwen2_moe):
    """With the experts made trainable, the last layer's expert gradients are exactly those of sparse
    mode: the estimator's term reaches the router logits and nothing else of that layer."""
    grads = {}
    for m in ("sparse", mode):
        model = _model(qwen2_moe)
        block = model.get_submodule(find_routers(model)[-1].module_name.rpartition(".")[0])
        block.experts.requires_grad_(True)
        block.shared_expert_gate.requires_grad_(True)
        RouterGradient(model, m)
        model(**_batch()).loss.backward()
        grads[m] = [block.experts.gate_up_proj.grad, block.experts.down_proj.grad, block.shared_expert_gate.weight.grad]
    for sparse, estimated in zip(grads["sparse"], grads[mode], strict=True):
        assert torch.equal(sparse, estimated)


@pytest.mark.parametrize("mode", ["dense", "default_moe"])
def test_same_router_gradient_under_activation_checkpointing(mode, qwen3_moe):
    grads = []
    for checkpointing in (False, True):
        model = _model(qwen3_moe)
        if checkpointing:
            model.activation_checkpointing_enable()
        estimator = RouterGradient(model, mode)
        with estimator.updating():
            model(**_batch()).loss.backward()
        grads.append([r.module.weight.grad for r in find_routers(model)])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-8)
