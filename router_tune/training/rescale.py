"""Rescale saturated routers before training.

mergekit's `random` gates are torch.randn rows (norm ~ sqrt(H)); against RMS-normalised
hidden states their logits are tens of units apart, so the softmax is one-hot: the top-1
probability is ~1, d softmax / d logits = p(1 - p) ~ 0, and neither the LM loss nor the
balancing loss can move the router (they get ~1e-6 of the gradient a soft router gets).
Dividing a router's weight by a constant keeps its ranking of experts (the same top-k, so
the model's outputs change only through the mixing weights) and brings the softmax back
into the range where it learns. We pick the constant per layer so that the logits' standard
deviation over real tokens becomes `target_std`.
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
from router_tune.routing.inspection import SATURATED_TOP1  # the threshold `inspect` calls saturated

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
def may_saturate(model: nn.Module, info: MoeInfo) -> list[bool]:
    """Per MoE layer, whether its stored weights allow a saturated softmax (mean top-1 above
    SATURATED_TOP1), without a forward pass.

    The router sees the RMS-normalised hidden state times the norm weight g: a vector of norm
    sqrt(H) before g. So two experts' logits differ by at most ||(w_e - w_f) * g|| * sqrt(H)
    (Cauchy-Schwarz), and with a largest gap D the top-1 probability is at most
    1 / (1 + (E - 1) exp(-D)). A layer whose bound stays at or below SATURATED_TOP1 cannot be
    saturated on any input and needs no probe; a layer without a readable norm is probed."""
    weights = router_state_dict(model)  # whole fp32 tensors, gathered when sharded
    limit = math.log(SATURATED_TOP1 / (1 - SATURATED_TOP1) * (info.num_experts - 1))
    flags = []
    for ref in info.routers:
        norm = router_input_norm_weight(model, ref.layer)
        if norm is None:
            flags.append(True)
            continue
        w = weights[ref.param_names[0]] * norm
        gap = torch.cdist(w, w).max().item() * math.sqrt(w.shape[1])
        flags.append(gap > limit)
    return flags


@torch.no_grad()
def rescale_routers(model: nn.Module, info: MoeInfo, batch: dict[str, torch.Tensor], mode: str) -> list[dict]:
    """Apply `router_rescale` (auto | off | a target logit std) and report what was done.

    auto rescales only the layers whose mean top-1 probability exceeds SATURATED_TOP1, to a
    logit std of 1.0, and skips the probe (a forward pass through the whole model) when no
    layer's stored weights allow saturation (`may_saturate`); a number rescales every layer to that std.
    All ranks call it with the same batch when the model is sharded (collectives; a ZeRO-3 model only
    once DeepSpeed's engine exists: its forward gathers the parameters).
    """
    if mode == "off":
        return []
    candidates = may_saturate(model, info) if mode == "auto" else [True] * len(info.routers)
    if not any(candidates):
        logger.info("router rescaling (auto): no router can saturate (weight bound), probe skipped")
        return []
    target = DEFAULT_TARGET_STD if mode == "auto" else float(mode)
    before = measure_routers(model, batch)
    changes, weights = [], router_state_dict(model)
    for ref, m, candidate in zip(info.routers, before, candidates):
        if not candidate or (mode == "auto" and m["top1"] <= SATURATED_TOP1):
            continue
        factor = target / max(m["logit_std"], 1e-6)
        weights[ref.param_names[0]] *= factor
        changes.append({"layer": ref.layer, "factor": factor, "top1_before": m["top1"]})
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
                f"layer {c['layer']} x{c['factor']:.3g} (top-1 {c['top1_before']:.2f} -> {c['top1_after']:.2f})"
                for c in changes
            ),
        )
    return changes
