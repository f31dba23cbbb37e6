"""Loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3, arXiv 2412.19437).

Each MoE layer's router gets a per-expert bias b that is added to its logits only to choose the top-k
experts; the mixing weights stay the unbiased softmax probabilities, so the bias changes where tokens
go, not how an expert's output counts, and it adds no gradient. After every optimizer step the bias
moves against the step's load, counted over the whole global batch (every micro-batch, every rank):

    b_i += u * sign(mean_load - load_i)        (u = `loss_free_rate`, 0.001 in the paper)

An overloaded expert's bias falls and an idle one's rises, by u per step, until the loads even out.
The bias is training state: it lives beside the routers (`model.routers.set_selection_bias`), is kept in
every checkpoint's router_tune.json (`selection_bias`) for an exact resume, and never reaches an
evaluation (eval-mode forwards ignore it) or an export (it is not a router tensor). The bias acts on
logits, so `topk(logits + b)` is `topk(p * exp(b))`: a proportional change of each expert's softmax score.
"""

from __future__ import annotations

import torch
from torch import nn

from router_tune.architectures.base import full_shape
from router_tune.model.routers import find_routers, set_selection_bias

BALANCING_MODES = ("switch", "loss_free", "both")


class LossFreeBalancing:
    """The selection bias of every MoE layer's router, and its update rule (see the module doc).

    Args:
        model: the MoE, routers already in fp32 (`routers_to_fp32`).
        rate: u, the bias change per optimizer step, in logit units.
        device: where the bias lives (the routers' compute device).
    """

    def __init__(self, model: nn.Module, rate: float, device: torch.device | str):
        if rate <= 0:
            raise ValueError(f"loss_free_rate must be > 0, got {rate}")
        self.rate = float(rate)
        refs = find_routers(model)
        num_experts = full_shape(refs[0].module.weight)[0]  # a ZeRO-3 partition is empty locally
        self.bias = torch.zeros(len(refs), num_experts, dtype=torch.float32, device=device)
        set_selection_bias(model, self.bias)

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        """One step of b_i += u * sign(mean_load - load_i), per layer, from the step's global counts [L, E]."""
        counts = counts.to(device=self.bias.device, dtype=torch.float32)
        self.bias += self.rate * torch.sign(counts.mean(dim=-1, keepdim=True) - counts)

    def state(self) -> list[list[float]]:
        """The bias as nested lists (exact: float32 values round-trip through JSON's doubles)."""
        return self.bias.cpu().tolist()

    def load_state(self, values: list[list[float]] | None) -> None:
        """Restore a checkpoint's bias in place (the routers hold views of it); None: a run without it."""
        if values is None:
            return
        loaded = torch.tensor(values, dtype=torch.float32)
        if loaded.shape != self.bias.shape:
            raise ValueError(f"selection bias of shape {list(loaded.shape)} for routers of {list(self.bias.shape)}")
        self.bias.copy_(loaded)


__all__ = ["BALANCING_MODES", "LossFreeBalancing"]
