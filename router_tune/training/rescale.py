"""Rescale overconfident routers before training.

A merge tool's gates were never trained, so how confident they are carries no information, and
confidence slows router training down. mergekit's `random` gates are torch.randn rows (norm ~
sqrt(H)); against RMS-normalised hidden states their logits are units to tens of units apart.
At the far end the softmax is one-hot: the top-1 probability is ~1, d softmax / d logits =
p(1 - p) ~ 0, and neither the LM loss nor the balancing loss can move the router (they get ~1e-6
of the gradient a soft router gets). Short of that, the router must still travel the whole
spread before its ranking changes: on the real SmolLM2 merge (scripts/make_real_moe.py) the
`random` gates spread 1.7-8.9 logits (top-1 0.68-0.97), only 2 of 30 layers were saturated, and 60
steps closed 62% of the gap to oracle routing when only those were rescaled, 84% when every layer
was (docs/real-weights.md).

Dividing a router's weight by a constant keeps its ranking of experts (the same top-k, so the
model's outputs change only through the mixing weights) and brings the softmax into the range
where it learns. `auto` takes every layer whose logits spread more than DEFAULT_TARGET_STD (their
standard deviation over the experts, averaged over real tokens) down to it, and never up: gates
that spread less (mergekit's `hidden` gates, 0.1-0.8 there) are left as they are.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from router_tune.model.loading import MoeInfo
from router_tune.model.routers import (
    load_router_state_dict,
    router_input_norm_weight,
    router_logits_on,
    router_state_dict,
)

logger = logging.getLogger(__name__)

DEFAULT_TARGET_STD = 1.0


def measure_routers(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """Per MoE layer: mean top-1 probability and logit standard deviation on `batch`."""
    device = model.get_input_embeddings().weight.device  # the accelerator, when the model was loaded there
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
    mask = batch.get("token_mask", batch.get("attention_mask"))
    keep = mask.reshape(-1).bool().to(device) if mask is not None else slice(None)
    result = []
    for logits in router_logits_on(model, inputs):
        logits = logits[keep]
        result.append(
            {"top1": logits.softmax(-1).max(-1).values.mean().item(), "logit_std": logits.std(-1).mean().item()}
        )
    return result


@torch.no_grad()
def may_spread_beyond(model: nn.Module, info: MoeInfo, target_std: float) -> list[bool]:
    """Per MoE layer, whether its stored weights allow a logit standard deviation above `target_std` on
    some input, without a forward pass.

    The router sees the RMS-normalised hidden state times the norm weight g: a vector of norm
    sqrt(H) before g. So two experts' logits differ by at most D = max ||(w_e - w_f) * g|| * sqrt(H)
    (Cauchy-Schwarz), and E values within a range D have a (sample) standard deviation of at most
    D * sqrt(E / (4 (E - 1))) (half of them at each end). A layer whose bound stays at or below
    `target_std` needs no probe; a layer without a readable norm is probed."""
    weights = router_state_dict(model)  # whole fp32 tensors, gathered when sharded
    experts = info.num_experts
    spread = math.sqrt(experts / (4 * (experts - 1))) if experts > 1 else 0.0
    flags = []
    for ref in info.routers:
        norm = router_input_norm_weight(model, ref.layer)
        if norm is None:
            flags.append(True)
            continue
        w = weights[ref.param_names[0]] * norm
        gap = torch.cdist(w, w).max().item() * math.sqrt(w.shape[1])
        flags.append(gap * spread > target_std)
    return flags


@torch.no_grad()
def rescale_routers(model: nn.Module, info: MoeInfo, batch: dict[str, torch.Tensor], mode: str) -> list[dict]:
    """Apply `router_rescale` (auto | off | a target logit std) and report what was done.

    auto brings every layer whose logit std exceeds DEFAULT_TARGET_STD down to it (never up), and skips
    the probe (a forward pass through the whole model) when no layer's stored weights allow that
    (`may_spread_beyond`); a number rescales every layer to that std, up or down.
    All ranks call it with the same batch when the model is sharded (collectives; a ZeRO-3 model only
    once DeepSpeed's engine exists: its forward gathers the parameters).
    """
    if mode == "off":
        return []
    target = DEFAULT_TARGET_STD if mode == "auto" else float(mode)
    candidates = may_spread_beyond(model, info, target) if mode == "auto" else [True] * len(info.routers)
    if not any(candidates):
        logger.info("router rescaling (auto): no router can spread beyond a logit std of %g (weight bound)", target)
        return []
    before = measure_routers(model, batch)
    changes, weights = [], router_state_dict(model)
    for ref, m, candidate in zip(info.routers, before, candidates):
        if not candidate or (mode == "auto" and m["logit_std"] <= target):
            continue
        factor = target / max(m["logit_std"], 1e-6)
        weights[ref.param_names[0]] *= factor
        changes.append(
            {"layer": ref.layer, "factor": factor, "top1_before": m["top1"], "logit_std_before": m["logit_std"]}
        )
    if changes:
        # written back as a state dict: plain, FSDP2 and ZeRO-3 parameters (and DeepSpeed's fp32 masters)
        load_router_state_dict(model, weights)
        after = measure_routers(model, batch)
        by_layer = {ref.layer: a for ref, a in zip(info.routers, after)}
        for change in changes:
            change["top1_after"] = by_layer[change["layer"]]["top1"]
        logger.warning(
            "router rescaling (%s): %s",
            mode,
            "; ".join(
                f"layer {c['layer']} x{c['factor']:.3g} (logit std {c['logit_std_before']:.2g} -> {target:g}, "
                f"top-1 {c['top1_before']:.2f} -> {c['top1_after']:.2f})"
                for c in changes
            ),
        )
    return changes
