"""Keep for backward only what a frozen expert's input gradient needs.

Router training backpropagates through every expert MLP above the first router (the routers of the
lower layers need it) but never into the experts' weights. transformers' gated experts compute
act(gate) * up from one gate_up projection (the experts class's `_apply_gate`), and autograd then
keeps both the gate_up output (for the activation's and the product's backward) and act(gate) (for
the product's backward): three intermediate-size vectors per routed token, the largest activation
of a MoE layer. act(gate) is an elementwise function of a tensor kept anyway, so `_GatedActivation`
keeps the gate_up output alone and recomputes act(gate) in backward: a third less of the expert
activations for an elementwise op per layer (SmolLM2-135M x 4 experts, 4 x 256 tokens: 365 of
the ~1,630 MB autograd keeps; docs/real-weights.md).

A 16-bit checkpoint computed in float32 (a CPU without native bf16: `model_dtype: auto`) may keep that
gate_up output in bfloat16 (`saved_dtype`, the recipe's `expert_saved_dtype`): the forward stays float32
and exact, the backward reads gate and up rounded to bfloat16 (what a bfloat16 run of the same
checkpoint keeps anyway), for half of the largest activation (SmolLM2-135M x 4 experts, 4 x 256
tokens: ~350 MB; docs/real-weights.md).

transformers offers `_apply_gate` as the place for custom gating (integrations/moe.py); both its
`grouped_mm` and `batched_mm` experts paths and router_tune's quantized experts path call it. We
set it on each experts module whose class uses transformers' default gating, so the arithmetic is
the same; a class with its own gating (or the `eager` path, which does not call it) keeps its own.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up from gate_up = [gate | up], saving only gate_up for backward (in `saved_dtype`
    when given: the backward computes in gate_up's own dtype from the rounded copy)."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, act, saved_dtype: torch.dtype | None) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.act, ctx.dtype = act, gate_up.dtype
        # (only when a backward will read it: the first MoE layer's input needs no gradient)
        narrow = saved_dtype is not None and saved_dtype != gate_up.dtype and gate_up.requires_grad
        ctx.save_for_backward(gate_up.to(saved_dtype) if narrow else gate_up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.to(ctx.dtype).chunk(2, dim=-1)
        with torch.enable_grad():
            gate = gate.detach().requires_grad_()
            activated = ctx.act(gate)
        grad_gate_up = torch.empty_like(gate_up)  # written in halves: no torch.cat copy at the backward's peak
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        # d/d gate through the activation's own backward, so any activation (SiLU, GELU, ...) is exact
        grad_gate.copy_(torch.autograd.grad(activated, gate, grad * up)[0])
        torch.mul(grad, activated.detach(), out=grad_up)
        return grad_gate_up, None, None


def _gated_activation(self: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    return _GatedActivation.apply(gate_up_out, self.act_fn, self.saved_gate_up_dtype)


def _default_gating():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers release without the experts interface: nothing to replace
        return None
    return _default_apply_gate


def save_less_for_frozen_experts(model: nn.Module, saved_dtype: torch.dtype | None = None) -> int:
    """Give every experts module with transformers' default gating the gating above, keeping gate_up for
    backward in `saved_dtype` (None: as computed); returns how many."""
    default = _default_gating()
    count = 0
    for module in model.modules():
        if default is not None and getattr(module, "has_gate", False) and type(module)._apply_gate is default:
            module._apply_gate = types.MethodType(_gated_activation, module)
            module.saved_gate_up_dtype = saved_dtype
            count += 1
    return count


def expert_saved_dtype(setting: str, stored: torch.dtype | None, compute: torch.dtype) -> torch.dtype | None:
    """The dtype frozen experts keep gate_up in for backward (None: as computed). `setting` is the recipe's
    `expert_saved_dtype`: "auto" is bfloat16 for a 16-bit checkpoint computed in float32, else as computed."""
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto" and compute == torch.float32 and stored in (torch.bfloat16, torch.float16):
        return torch.bfloat16
    return None
