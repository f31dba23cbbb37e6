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
    """act(gate) * up from gate_up = [gate | up], saving only gate_up for backward."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, act) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.act = act
        ctx.save_for_backward(gate_up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        with torch.enable_grad():
            gate = gate.detach().requires_grad_()
            activated = ctx.act(gate)
        grad_gate_up = torch.empty_like(gate_up)  # written in halves: no torch.cat copy at the backward's peak
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        # d/d gate through the activation's own backward, so any activation (SiLU, GELU, ...) is exact
        grad_gate.copy_(torch.autograd.grad(activated, gate, grad * up)[0])
        torch.mul(grad, activated.detach(), out=grad_up)
        return grad_gate_up, None


def _gated_activation(self: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    return _GatedActivation.apply(gate_up_out, self.act_fn)


def _default_gating():
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers release without the experts interface: nothing to replace
        return None
    return _default_apply_gate


def save_less_for_frozen_experts(model: nn.Module) -> int:
    """Give every experts module with transformers' default gating the gating above; returns how many."""
    default = _default_gating()
    count = 0
    for module in model.modules():
        if default is not None and getattr(module, "has_gate", False) and type(module)._apply_gate is default:
            module._apply_gate = types.MethodType(_gated_activation, module)
            count += 1
    return count
