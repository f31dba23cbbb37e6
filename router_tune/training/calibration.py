"""Router temperature calibration after training: one factor t for every router, W -> t W.

Trained routers choose well and mix too softly. On the real SmolLM2 merge (docs/real-weights.md) the
routers of a 240-step run, their logits multiplied by 1.5-2.5 at evaluation, close 91-92% of the gap to
oracle routing instead of 89%, with the same top-k experts (so the same balance). What holds them soft
is measured there: at the trained routers the z-loss's pull on the logits' scale (coefficient 0.001)
nearly cancels the LM loss's push, the Switch loss adds a little; with a z-loss ten times smaller the
scale still grows too slowly for the run's budget (the gradient along it is small and noisy next to
Adam's per-weight steps).

The scale is one number per router, so it need not be learned by the gradient: after the last step the
LM loss is measured on the first training blocks for each t of a grid (t = 1 included: the trained
routers stay as they are unless a factor does better), and the best factor is multiplied into the
router weights. The top-k of every token stays the same (a positive factor keeps the order of the
logits), so the balance does not change; only the mixing weights of the chosen experts sharpen (t > 1)
or soften (t < 1). Checkpoints keep the routers as trained (a resumed run calibrates again at its end);
the run's final routers, what `export` and `eval` read, carry the factor, recorded in router_tune.json.

No library does this: temperature scaling is a classifier-calibration idea (Guo et al. 2017) applied
here to the router logits, with the LM loss as the objective.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from router_tune.data import IGNORE_INDEX
from router_tune.losses.lm_loss import next_token_loss_sum
from router_tune.model.routers import lm_head_as_identity, load_router_state_dict, router_state_dict
from router_tune.training.global_batch import model_inputs

logger = logging.getLogger(__name__)

# Factors tried. Sharpening of 1.5-3 was what the measured runs lacked (4: room above it); 0.5 and 0.75 let an
# overconfident run soften. Each factor costs one forward pass over the calibration blocks.
GRID = (0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
# relative loss difference below which factors count as equal (on the demo the best factor gains 6e-4 of the
# loss; the tiny test models' factors differ by 1e-5, which ranks of a sharded run may order differently)
TOLERANCE = 1e-4


@torch.no_grad()
def mean_token_loss(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], *, chunked: bool, chunk_tokens: int
) -> float:
    """Mean next-token cross-entropy of `model` over the target tokens of `batches` (eval mode, the training
    flag restored). `chunked`: the loss from the final hidden states through the frozen head, chunk by
    chunk (what training does on a dense head); else from the model's logits (sharded or quantized heads).
    Every rank of a sharded model must call it with the same batches (the forward passes are collective)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    targets = 0
    try:
        for batch in batches:
            inputs, _ = model_inputs(model, batch)
            labels = batch["labels"]
            with lm_head_as_identity(model) if chunked else contextlib.nullcontext() as head:
                out = model(**inputs, use_cache=False)
            total += next_token_loss_sum(out.logits, head, labels, chunk_tokens).double().cpu()
            targets += int((labels[:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return float(total) / max(targets, 1)


@torch.no_grad()
def calibrate_router_temperature(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    grid: tuple[float, ...] = GRID,
    chunked: bool = True,
    chunk_tokens: int = 4096,
) -> dict:
    """Multiply every router's weight by the factor of `grid` with the lowest mean LM loss on `batches`
    (of those within TOLERANCE of it, the one closest to 1) and return {"factor", "losses": {factor: loss}, "blocks"}.

    Written back as a state dict, like `router_rescale`: plain, FSDP2 and ZeRO-3 parameters (and
    DeepSpeed's fp32 masters). All ranks call it with the same batches."""
    if not batches:
        raise ValueError("calibrate_router_temperature needs at least one batch of blocks")
    trained = router_state_dict(model)  # whole fp32 tensors, gathered when sharded
    losses = {}
    for factor in grid:
        load_router_state_dict(model, {name: w * factor for name, w in trained.items()})
        losses[factor] = mean_token_loss(model, batches, chunked=chunked, chunk_tokens=chunk_tokens)
    lowest = min(losses.values())
    # the factor closest to 1 among those within TOLERANCE of the lowest loss: no change for a gain that
    # is only rounding (ranks of a sharded run compute the loss in another order) or noise
    best = min((f for f in grid if losses[f] <= lowest * (1 + TOLERANCE)), key=lambda f: abs(math.log(f)))
    load_router_state_dict(model, {name: w * best for name, w in trained.items()})
    blocks = sum(len(b["input_ids"]) for b in batches)
    logger.warning(
        "router temperature calibration on %d training blocks: routers x%g (mean LM loss %s)",
        blocks,
        best,
        ", ".join(f"x{f:g} {loss:.4f}" for f, loss in losses.items()),
    )
    return {"factor": best, "losses": {str(f): round(v, 6) for f, v in losses.items()}, "blocks": blocks}
