"""Router learning rates in logit units (`router_lr_scale: input`, the default).

Adam moves every weight by about its learning rate per step, whatever the gradient's size. A router
logit z = w . h therefore moves by up to lr * ||h||_1 per step: one rate is 25 times stronger on
Raiden's routers (3200 inputs) than on the demo's (128), and it scales with the norm weight g in
front of the router (h = g * x / rms(x)). muP makes the same observation for Adam on any matrix
that reads a hidden state (rate ~ 1 / fan-in). So the recipe's `learning_rate` is in logit units,
and each layer's routing parameters get learning_rate / s, s the L1 norm of what the router reads:

- `input` (the default): s measured, the mean L1 norm of the router's input over the real tokens of
  the first PROBE_BLOCKS training blocks (`measure_router_input_l1`: forwards at start-up in
  micro-batches, on every backend, the same on every rank, whatever the batch split).
- `predicted`: s = sqrt(2 / pi) * ||g||_1, the expected L1 norm when x / rms(x) has unit-variance
  Gaussian-like entries, read from the checkpoint without a forward pass (a layer without a readable
  norm weight falls back to g = 1, s = sqrt(2 / pi) * H). It holds on models trained here (the demo:
  within 10%), not on real pretrained ones: a few hidden dimensions are very large, x / rms(x)
  concentrates its mass there, and SmolLM2-135M's routers read 0.46-0.77 of the prediction, so its
  routers learned at half to three quarters of the intended rate.
- `none`: Adam's rate as given.

Both norms and each layer's Adam rate are recorded side by side (run_info.json `router_input_l1`,
`router_adam_rates`, and the training log).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from router_tune.errors import RouterTuneError
from router_tune.model.loading import MoeInfo
from router_tune.model.routers import lm_head_as_identity, router_input_norm_weight
from router_tune.training.global_batch import model_inputs

LR_SCALES = ("input", "predicted", "none")
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
    model: nn.Module, info: MoeInfo, learning_rate: float, weight_decay: float, scales: list[float] | None
) -> list[dict]:
    """Optimizer parameter groups, one per MoE layer, each with the rate learning_rate / its scale (the
    router-input L1 norm, see the module docstring; None: learning_rate for every layer).

    Every trainable parameter of `model` must be a routing parameter of some layer (names matched by
    suffix, so wrapper prefixes such as DDP's `module.` do not matter)."""
    scales = scales or [1.0] * len(info.routers)
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


# The router-input probe reads this many training blocks, whatever the batch size, accumulation or
# world size: the rates must not depend on how a step is split (a run of 4 x 2 blocks must train as 1 x 8).
PROBE_BLOCKS = 8


@torch.no_grad()
def probe_router_inputs(model: nn.Module, info: MoeInfo, batches: list[dict[str, torch.Tensor]], record) -> int:
    """Eval-mode forwards of the collated `batches` (the LM head skipped, the training flag restored),
    calling `record(i, x)` with router i's input ([real tokens, H], `info.routers` order). Returns the
    number of real tokens."""
    tokens = 0
    keep = None

    def hook(i: int):
        def pre_hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            record(i, x[keep] if keep is not None else x)

        return pre_hook

    handles = [ref.module.register_forward_pre_hook(hook(i)) for i, ref in enumerate(info.routers)]
    was_training = model.training
    model.eval()
    try:
        with lm_head_as_identity(model):
            for batch in batches:
                inputs, mask = model_inputs(model, batch)
                keep = mask.reshape(-1).bool() if mask is not None else None
                tokens += int(keep.sum()) if keep is not None else batch["input_ids"].numel()
                model(**inputs, use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return tokens


def measure_router_input_l1(model: nn.Module, info: MoeInfo, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """Per MoE layer (in `info.routers` order): the mean L1 norm of the router's input over the real
    tokens of `batches` (collated micro-batches of the first PROBE_BLOCKS training blocks, through
    `probe_router_inputs`). In a distributed run every rank calls it (a sharded forward gathers
    parameters) and every rank gets rank 0's figures: the rates they set must be equal, or replicas would
    drift apart."""
    sums = [torch.zeros((), dtype=torch.float64) for _ in info.routers]

    def record(i: int, x: torch.Tensor) -> None:
        sums[i] += x.float().abs().sum().double().cpu()

    tokens = probe_router_inputs(model, info, batches, record)
    measured = [float(total) / tokens for total in sums]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [measured]
        torch.distributed.broadcast_object_list(shared, src=0)
        measured = shared[0]
    return measured


def describe_router_lrs(layers: list[int], rates: list[float], predicted: list[float], measured: list[float]) -> str:
    """One line per MoE layer: its Adam rate beside the predicted and the measured router-input L1 norm."""
    lines = ["layer  Adam rate  input L1 predicted  measured  measured/predicted"]
    for layer, rate, p, m in zip(layers, rates, predicted, measured):
        lines.append(f"{layer:>5}  {rate:9.3g}  {p:18.1f}  {m:8.1f}  {m / p:18.2f}")
    return "\n".join(lines)
