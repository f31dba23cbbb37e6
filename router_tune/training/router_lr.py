"""Router learning rates in logit units (`router_lr_scale: input`, the default).

Adam moves every weight by about its learning rate per step, whatever the gradient's size. A router
logit z = w . h therefore moves by up to lr * ||h||_1 per step: one rate is 25 times stronger on
Raiden's routers (3200 inputs) than on the demo's (128), and it scales with the norm weight g in
front of the router (h = g * x / rms(x)). muP makes the same observation for Adam on any matrix
that reads a hidden state (rate ~ 1 / fan-in). So with `router_lr_scale: input` the recipe's
`learning_rate` is in logit units, and each layer's routing parameters get

    learning_rate / s,   s = sqrt(2 / pi) * ||g||_1,

the expected L1 norm of the router's input when x / rms(x) has unit-variance Gaussian-like entries.
No forward pass is needed: g is in the checkpoint. A layer without a readable norm weight falls back
to g = 1 (s = sqrt(2 / pi) * H). `router_lr_scale: none` keeps Adam's rate as given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from router_tune.errors import RouterTuneError
from router_tune.model.loading import MoeInfo
from router_tune.model.routers import router_input_norm_weight

LR_SCALES = ("input", "none")
# E|x| for x ~ N(0, 1): the mean magnitude of one RMS-normalised input entry.
MEAN_ABS_GAUSSIAN = math.sqrt(2.0 / math.pi)


@torch.no_grad()
def router_input_scales(model: nn.Module, info: MoeInfo) -> list[float]:
    """Per MoE layer (in `info.routers` order): s, the expected L1 norm of the router's input."""
    scales = []
    for ref in info.routers:
        norm = router_input_norm_weight(model, ref.layer)
        l1 = float(norm.abs().sum()) if norm is not None else float(model.config.hidden_size)
        scales.append(MEAN_ABS_GAUSSIAN * l1)
    return scales


def router_param_groups(
    model: nn.Module, info: MoeInfo, learning_rate: float, weight_decay: float, lr_scale: str
) -> list[dict]:
    """Optimizer parameter groups, one per MoE layer, each with its own `lr` (see the module docstring).

    Every trainable parameter of `model` must be a routing parameter of some layer (names matched by
    suffix, so wrapper prefixes such as DDP's `module.` do not matter)."""
    scales = router_input_scales(model, info) if lr_scale == "input" else [1.0] * len(info.routers)
    groups = {ref.layer: [] for ref in info.routers}
    suffixes = [(name, ref.layer) for ref in info.routers for name in ref.param_names]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = next((layer for suffix, layer in suffixes if name == suffix or name.endswith("." + suffix)), None)
        if layer is None:
            raise RouterTuneError(f"trainable parameter {name} is not a routing parameter: only routers may train.")
        groups[layer].append(param)
    return [
        {"params": groups[ref.layer], "lr": learning_rate / scale, "weight_decay": weight_decay, "layer": ref.layer}
        for ref, scale in zip(info.routers, scales)
        if groups[ref.layer]
    ]
