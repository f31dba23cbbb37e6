"""Loss-free balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3, arXiv 2412.19437), and its fade
into the router weights for a bias-less export.

Each MoE layer's router gets a per-expert bias b that is added to its logits only to choose the top-k
experts; the mixing weights stay the unbiased softmax probabilities, so the bias changes where tokens
go, not how an expert's output counts, and it adds no gradient. After every optimizer step the bias
moves against the step's load, counted over the whole global batch (every micro-batch, every rank):

    b_i += u * sign(mean_load - load_i)                    (u = `loss_free_rate`; `loss_free_update: sign`)
    b_i += u * (mean_load - load_i) / mean_load            (`loss_free_update: proportional`)

An overloaded expert's bias falls and an idle one's rises until the loads even out: by u per step
(sign), or by u times its relative load error (proportional: large steps while an expert is far off,
small ones near balance; the paper's variant for softmax gates, which Mixtral-style routers are).

`loss_free_scope: twins` balances each expert against its twin group's mean instead of the layer's
(routing/twins.py: experts whose outputs are nearly the same): imbalance between twins costs
throughput and buys nothing, while imbalance between groups may follow the data mix, which a frankenMoE
routes by domain on purpose. Experts without a twin keep a zero bias.
The bias acts on logits, so `topk(logits + b)` is `topk(p * exp(b))`: a proportional change of each
expert's softmax score.

The fade. Mixtral, Qwen-MoE and OLMoE routers have no bias, and their input (an RMSNorm output) has no
constant channel to fold one into, so an exported model would route without the balance the bias gave.
Over the last `loss_free_fade` of the steps the bias the routers choose with is scaled from 1 down to 0,
while `bias_distillation_loss` pulls each router's own softmax toward the biased one, softmax(logits + b):
the weights learn to make the balanced choice themselves. The bias keeps moving against the loads all
along, so as the routers take over it shrinks back by itself; what is left at the last step is the
balance the weights could not learn, and the exported model is what `eval` measures.

The fold (`loss_free_fold`, instead of the fade). The router input has no constant channel, but on
real inputs one direction comes close: v minimising mean((x . v - 1)^2) (ridge-regularised least
squares over router inputs x) reads about 1 on every token, so W_e += b_e v makes the router's own
logits W x carry the bias, to the residual of x . v around 1 (reported per layer). At the last step the
bias is folded this way into the router weights, fitted on the router-input probe's blocks, and zeroed:
the checkpoint and the export then choose about as the biased routers did. On the second lab merge
x . v stays within ~10% of 1 from the second MoE layer on; the first layer's input (close to the
token embeddings) has no such direction (~35%).

The bias is training state: it lives beside the routers (`model.routers.set_selection_bias`; they hold
views of `applied`, the faded bias), is kept in every checkpoint's router_tune.json (`selection_bias`)
for an exact resume, and never reaches an evaluation (eval-mode forwards ignore it) or an export (it is
not a router tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from router_tune.architectures.base import full_shape
from router_tune.model.routers import find_routers, set_selection_bias

BALANCING_MODES = ("switch", "loss_free", "both")
BIAS_UPDATES = ("sign", "proportional")
BIAS_SCOPES = ("experts", "twins")


FOLD_RIDGE = 1e-3  # the fold's ridge, relative to the mean squared input entry: keeps v off noise directions


def constant_direction(inputs: torch.Tensor, ridge: float = FOLD_RIDGE) -> tuple[torch.Tensor, float]:
    """The direction v on which router inputs [N, H] read about 1 (least squares of x . v = 1 with a ridge
    of `ridge` x the mean squared entry), and the root-mean-square residual of x . v - 1."""
    x = inputs.double()
    gram = x.T @ x / x.shape[0]
    gram += ridge * gram.trace() / x.shape[1] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    v = torch.linalg.solve(gram, x.mean(dim=0))
    return v, float((x @ v - 1.0).pow(2).mean().sqrt())


def fade_steps(max_steps: int, fade: float) -> int:
    """How many of the last optimizer steps the fade covers (0: no fade)."""
    return round(fade * max_steps) if max_steps > 0 else 0


def fade_scale(step: int, max_steps: int, fade: float) -> float:
    """The share of the bias the routers choose with at optimizer step `step` (0-based): 1 before the
    last `fade` of `max_steps`, then falling linearly to 1 / fade_steps at the last step."""
    steps = fade_steps(max_steps, fade)
    if steps <= 0:
        return 1.0
    return min(1.0, max(0.0, (max_steps - step) / steps))


class LossFreeBalancing:
    """The selection bias of every MoE layer's router, its update rule and its fade (see the module doc).

    Args:
        model: the MoE, routers already in fp32 (`routers_to_fp32`).
        rate: u, the bias change per optimizer step, in logit units.
        device: where the bias lives (the routers' compute device).
        fade: the last share of the steps over which the routers' bias fades to zero (0: never).
        update: "sign" or "proportional" (see the module doc).
        groups: per MoE layer, a partition of the experts (`ExpertTwins.groups`): each expert is balanced
            against its group's mean load; None: against the layer's mean.
    """

    def __init__(
        self,
        model: nn.Module,
        rate: float,
        device: torch.device | str,
        fade: float = 0.0,
        update: str = "sign",
        groups: list[list[list[int]]] | None = None,
    ):
        if rate <= 0:
            raise ValueError(f"loss_free_rate must be > 0, got {rate}")
        if update not in BIAS_UPDATES:
            raise ValueError(f"loss_free_update is one of {BIAS_UPDATES}, got {update!r}")
        self.update_rule = update
        if not 0.0 <= fade <= 1.0:
            raise ValueError(f"loss_free_fade is a share of the steps in [0, 1], got {fade}")
        self.rate, self.fade = float(rate), float(fade)
        refs = find_routers(model)
        num_experts = full_shape(refs[0].module.weight)[0]  # a ZeRO-3 partition is empty locally
        self.bias = torch.zeros(len(refs), num_experts, dtype=torch.float32, device=device)
        self.applied = torch.zeros_like(self.bias)  # scale x bias: what the routers choose with
        # [L, E, E]: row i averages the counts of expert i's group (each row the layer's mean without groups)
        self.group_mean = torch.full((len(refs), num_experts, num_experts), 1.0 / num_experts, device=device)
        if groups is not None:
            if len(groups) != len(refs):
                raise ValueError(f"{len(groups)} layers of expert groups for {len(refs)} routers")
            self.group_mean.zero_()
            for layer, partition in enumerate(groups):
                for group in partition:
                    for i in group:
                        self.group_mean[layer, i, group] = 1.0 / len(group)
        self.scale = 1.0
        set_selection_bias(model, self.applied)

    def fading(self, step: int, max_steps: int) -> bool:
        """Whether optimizer step `step` is in the fade (the distillation term is trained)."""
        steps = fade_steps(max_steps, self.fade)
        return steps > 0 and step >= max_steps - steps

    def set_step(self, step: int, max_steps: int) -> None:
        """The routers choose with the bias as faded for optimizer step `step` (0-based)."""
        self.scale = fade_scale(step, max_steps, self.fade)
        self.applied.copy_(self.bias * self.scale)

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        """One step of the update rule, per layer, from the step's global counts [L, E]."""
        counts = counts.to(device=self.bias.device, dtype=torch.float32)
        mean = torch.einsum("lij,lj->li", self.group_mean, counts)  # each expert's layer (or group) mean
        if self.update_rule == "sign":
            self.bias += self.rate * torch.sign(mean - counts)
        else:  # a layer without a routed token (mean 0) has no error to follow
            self.bias += self.rate * torch.where(mean > 0, (mean - counts) / mean.clamp_min(1e-12), 0.0)

    @torch.no_grad()
    def fold(self, model: nn.Module, router_inputs: list[torch.Tensor]) -> list[float]:
        """Fold the bias into the router weights, W_e += b_e v with v = `constant_direction` of each router's
        inputs ([N, H], `find_routers` order), and zero it. Returns each layer's residual (see the module doc)."""
        residuals = []
        for layer, (ref, inputs) in enumerate(zip(find_routers(model), router_inputs)):
            v, residual = constant_direction(inputs)
            weight = ref.module.weight
            weight.add_((self.bias[layer].double()[:, None] * v[None, :]).to(weight.dtype).to(weight.device))
            residuals.append(residual)
        self.bias.zero_()
        self.applied.zero_()
        return residuals

    def state(self) -> list[list[float]]:
        """The bias as nested lists (exact: float32 values round-trip through JSON's doubles)."""
        return self.bias.cpu().tolist()

    def load_state(self, values: list[list[float]] | None) -> None:
        """Restore a checkpoint's bias in place; None: a run without it. `set_step` then applies it."""
        if values is None:
            return
        loaded = torch.tensor(values, dtype=torch.float32)
        if loaded.shape != self.bias.shape:
            raise ValueError(f"selection bias of shape {list(loaded.shape)} for routers of {list(self.bias.shape)}")
        self.bias.copy_(loaded)


__all__ = ["BALANCING_MODES", "BIAS_SCOPES", "BIAS_UPDATES", "LossFreeBalancing", "constant_direction", "fade_scale"]
