"""Router gradient estimators for frozen experts: what the router learns from experts outside a token's top-k.

With the model's own (`sparse`) gradient, the LM loss only tells a router about the k experts it
picked. Here every MoE block gets a forward hook that adds a straight-through term whose value is
exactly zero (so the output, the loss and what ships are unchanged) and whose gradient reaches the
router logits only, from the experts a token did not pick:

- `dense` (DenseMixer): the unselected experts' real outputs y_e(h), computed under no_grad.
- `default_moe` (Default MoE, arXiv 2504.12463): a per-expert EMA of y_e over the tokens routed to
  e stands in for y_e(h): no extra expert forward over unselected tokens, only k no-grad calls.

The gradient. Let z_t be token t's router logits, p = softmax(z_t), K the top-k set, and w the
weights the model multiplies the experts by: w_e = p_e / S with S = sum_{k in K} p_k when the
architecture renormalises top-k weights (Mixtral; norm_topk_prob), else w_e = p_e. The model's
own graph already gives dL/dz = sum_{e in K} g_e dw_e/dz, with g_e = <dL/dout_t, y_e(h_t)>. The
hook adds, for e outside K, the weight u_e = p_e / stop_grad(S) (or p_e) times a constant y_e, so

    dL/dz_j += sum_{e not in K} g_e * p_e (delta_ej - p_j) / S,

which makes the total the gradient of the dense mixture sum_{e in K} w_e y_e + sum_{e not in K}
u_e y_e, DenseMixer's estimator. S is held fixed on the unselected terms so that they move only
p_e, not the selected experts' normalisation, which the exact sparse term already accounts for.
Qwen2-MoE's shared-expert gate is untouched: sigmoid(g.h) scales a shared expert that runs on
every token, so the LM loss already gives it its exact, dense gradient.

No extra backward goes through the experts: their extra outputs carry no autograd history and the
term is a custom Function whose backward is a dot product with saved constants. The stand-ins are
saved with `save_for_backward`, so activation checkpointing recomputes them instead of keeping
them; the hook runs inside the decoder layer, so DDP and FSDP2 units see the same forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from router_tune.architectures import architecture_for
from router_tune.model.routers import find_routers

# Default MoE's stand-in is an average over recent batches; 0.9 keeps about ten batches.
EMA_DECAY = 0.9
# Tokens of the first batch on which every expert's first stand-in is measured.
INIT_TOKENS = 256


class _ZeroWithRouterGradient(torch.autograd.Function):
    """Value -0.0 everywhere (x + -0.0 == x bit for bit, +0.0 and -0.0 included); backward gives
    the unselected weights u [T, E] the gradient <dL/dout_t, stand_in[t, e]>."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, stand_in: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(stand_in)
        return torch.full((weights.shape[0], stand_in.shape[-1]), -0.0, dtype=out_dtype, device=weights.device)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (stand_in,) = ctx.saved_tensors
        grad = grad_out.float()
        if stand_in.dim() == 2:  # [E, H]: one stand-in per expert (default_moe)
            return grad @ stand_in.float().T, None, None
        # [T, E, H] per-token outputs (dense), one expert at a time: no [T, E, H] fp32 temporary
        cols = [(grad * stand_in[:, e].float()).sum(-1) for e in range(stand_in.shape[1])]
        return torch.stack(cols, dim=1), None, None


def selection_mask(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] bool, True where the expert is among the token's top-k."""
    mask = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


def unselected_weights(logits: torch.Tensor, selected: torch.Tensor, normalizes_topk: bool) -> torch.Tensor:
    """u_e = p_e / stop_grad(S) (p_e without renormalisation) for experts outside the top-k, 0 inside."""
    probs = torch.softmax(logits.float(), dim=-1)
    if normalizes_topk:
        probs = probs / (probs * selected).sum(-1, keepdim=True).detach()
    return probs.masked_fill(selected, 0.0)


@torch.no_grad()
def expert_outputs(experts: nn.Module, hidden: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """y_e(h) of one given expert per token ([T] ids), unweighted; no autograd history."""
    ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    return experts(hidden, expert_ids.view(-1, 1), ones)


@torch.no_grad()
def unselected_outputs(experts: nn.Module, hidden: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[T, E, H]: every expert's output on the tokens that did not select it, zeros elsewhere."""
    out = hidden.new_zeros(hidden.shape[0], selected.shape[1], hidden.shape[1])
    for e in range(selected.shape[1]):
        rows = (~selected[:, e]).nonzero().squeeze(1)
        if rows.numel():
            out[rows, e] = expert_outputs(experts, hidden[rows], torch.full_like(rows, e))
    return out


@torch.no_grad()
def routed_means(experts: nn.Module, hidden: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """Per expert, the mean of y_e over the tokens that selected it ([E, H] fp32) and its token count."""
    sums = torch.zeros(num_experts, hidden.shape[1], device=hidden.device)
    counts = torch.zeros(num_experts, device=hidden.device)
    for slot in range(indices.shape[1]):
        ids = indices[:, slot]
        sums.index_add_(0, ids, expert_outputs(experts, hidden, ids).float())
        counts += torch.bincount(ids, minlength=num_experts).float()
    return sums / counts.clamp_min(1).unsqueeze(1), counts


@torch.no_grad()
def _mean_outputs(experts: nn.Module, hidden: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, H] fp32: each expert's mean output over all of `hidden` (Default MoE's first stand-in)."""
    rows = [
        expert_outputs(experts, hidden, torch.full((hidden.shape[0],), e, device=hidden.device)).float().mean(0)
        for e in range(num_experts)
    ]
    return torch.stack(rows)


class RouterGradient:
    """Installs the estimator on every MoE block of `model` (see the module docstring).

    Args:
        model: the (unwrapped) MoE model; hooks stay in place when DDP / FSDP wrap it.
        mode: sparse (installs nothing), dense or default_moe (config.ROUTER_GRADIENTS).

    `active` switches the term on and off (the trainer's mixed schedule); `updating()` marks the
    forward passes whose routed outputs feed Default MoE's EMA, so the forward re-run by
    activation checkpointing during backward does not count a batch twice.
    """

    def __init__(self, model: nn.Module, mode: str):
        self.mode, self.active, self._updating = mode, mode != "sparse", False
        architecture = architecture_for(model.config)
        self.normalizes_topk = architecture.normalizes_topk(model.config)
        self._gate_outputs: dict[nn.Module, tuple] = {}
        self._ema: dict[nn.Module, torch.Tensor] = {}
        self._handles = []
        if mode == "sparse":
            return
        for ref in find_routers(model):
            block = model.get_submodule(ref.module_name.rpartition(".")[0])
            self._handles.append(ref.module.register_forward_hook(self._gate_hook(block)))
            self._handles.append(block.register_forward_hook(self._block_hook))

    def _gate_hook(self, block: nn.Module):
        def hook(router, args, output):
            self._gate_outputs[block] = output  # (logits, top-k weights, top-k indices)

        return hook

    @contextlib.contextmanager
    def updating(self) -> Iterator[None]:
        self._updating = True
        try:
            yield
        finally:
            self._updating = False

    def _block_hook(self, block: nn.Module, args, output: torch.Tensor):
        logits, _, indices = self._gate_outputs.pop(block)
        if not (self.active and block.training and torch.is_grad_enabled() and logits.requires_grad):
            return None
        hidden = args[0].detach().reshape(-1, output.shape[-1])
        selected = selection_mask(indices, logits.shape[-1])
        if self.mode == "dense":
            stand_in = unselected_outputs(block.experts, hidden, selected)
        else:
            stand_in = self._stand_in(block, hidden, indices, logits.shape[-1])
        weights = unselected_weights(logits, selected, self.normalizes_topk)
        zero = _ZeroWithRouterGradient.apply(weights, stand_in, output.dtype)
        return output + zero.view_as(output)

    def _stand_in(self, block: nn.Module, hidden, indices, num_experts: int) -> torch.Tensor:
        ema = self._ema.get(block)
        if ema is None or self._updating:
            means, counts = routed_means(block.experts, hidden, indices, num_experts)
            seen = (counts > 0).unsqueeze(1)
            if ema is None:  # an expert nobody picked yet still needs a stand-in, or it never gets a signal
                ema = torch.where(seen, means, _mean_outputs(block.experts, hidden[:INIT_TOKENS], num_experts))
            else:  # a new tensor, not an in-place update: earlier graphs saved the old one
                ema = torch.where(seen, EMA_DECAY * ema + (1 - EMA_DECAY) * means, ema)
            self._ema[block] = ema
        return ema

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
