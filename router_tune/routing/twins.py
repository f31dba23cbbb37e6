"""Twin experts: experts whose outputs are nearly the same on calibration tokens, grouped per layer.

A frankenMoE often holds copies (mergekit merges the same model twice) or near-copies of one
fine-tune. Load imbalance between twins costs throughput and buys nothing, while imbalance
between groups may just follow the data mix, so balance figures are reported within and across
these groups (`routing.stats.group_balance`).

The measure: the hidden states entering each MoE block on the calibration tokens are sent through
every expert of the block, and two experts are compared by the cosine of their outputs over all
those tokens at once (flattened [tokens x hidden]), as a distance d = 1 - cosine. Two experts are
linked when their distance is at most `TWIN_RELATIVE_DISTANCE` (0.4) times the layer's median
distance over all pairs: twins are far closer than a typical pair of the same layer. A fixed cosine
cannot tell them apart, because experts drift apart with depth: on the second lab merge (each domain's
two experts fine-tuned on halves of its data) the twins' cosine falls from 0.99 in the first layer
to 0.88 in the last, below the 0.92 of two different-domain experts in the demo's first layer. Their
distance ratio is 0.06-0.25 on every layer of both second-merge variants, every other pair's 0.58 or
more (0.58-0.94 on the demo, whose experts are fine-tunes on four different domains). Bit-identical
experts (distance 0) always form one group; a layer's groups are the connected components.

    twins = measure_twins(model, {"input_ids": ids})      # ExpertTwins: groups, similarity, threshold
    twins.groups[0]                                      # e.g. [[0, 2], [1], [3]]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from router_tune.architectures import architecture_for
from router_tune.model.fingerprints import identical_expert_groups
from router_tune.model.routers import is_sharded, lm_head_as_identity

TWIN_RELATIVE_DISTANCE = 0.4  # twins: 1 - cosine at most this times the layer's median over pairs
CALIBRATION_TOKENS = 512  # real tokens the similarity is measured on (at most)


@dataclass
class ExpertTwins:
    """The twin groups of every MoE layer and how they were found.

    Attributes:
        groups: per MoE layer, a partition of the experts (singletons included), each group sorted.
        method: "output cosine" (measured on `tokens` tokens, `similarity` filled), "identical weights"
            (bit-identical fingerprints only: sharded runs, where no expert runs alone) or "not measured"
            (sharded experts and no fingerprints: every expert its own group).
        threshold: the share of a layer's median pair distance (1 - cosine) at or below which two
            experts are twins (None for identical weights).
        cosine_thresholds: per MoE layer, the cosine that threshold comes to (None for identical weights).
        tokens: calibration tokens measured on (0 for identical weights).
        similarity: per MoE layer, the [E, E] cosine matrix (empty for identical weights).
    """

    groups: list[list[list[int]]]
    method: str = "output cosine"
    threshold: float | None = TWIN_RELATIVE_DISTANCE
    tokens: int = 0
    similarity: list[list[list[float]]] | None = None
    cosine_thresholds: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ExpertTwins:
        return cls(**data)

    def group_ids(self) -> torch.Tensor:
        """LongTensor [L, E]: each expert's group in its layer, numbered by the group's position in `groups`
        (the form `losses.twin_balancing_loss` reads)."""
        ids = [[0] * sum(len(g) for g in layer) for layer in self.groups]
        for layer, partition in enumerate(self.groups):
            for gid, group in enumerate(partition):
                for expert in group:
                    ids[layer][expert] = gid
        return torch.tensor(ids, dtype=torch.long)

    def has_twins(self) -> bool:
        """Whether any layer has a group of two or more experts."""
        return any(len(g) > 1 for layer in self.groups for g in layer)

    def describe(self) -> str:
        """One line for reports: how the groups were found."""
        if self.method == "output cosine":
            cos = self.cosine_thresholds or []
            span = f" (cosine >= {min(cos):.2f}-{max(cos):.2f} by layer)" if cos else ""
            return (
                f"experts whose output distance (1 - cosine) on {self.tokens} calibration tokens is at most "
                f"{self.threshold} x the layer's median pair distance{span}"
            )
        if self.method == "identical weights":
            return "bit-identical experts (weights' fingerprints)"
        return "not measured (sharded experts run only together): every expert its own group"


def cosine_threshold(similarity: np.ndarray, relative: float = TWIN_RELATIVE_DISTANCE) -> float:
    """The cosine at or above which two experts of this layer ([E, E] cosines) are twins: 1 - relative x the
    median over pairs of 1 - cosine (1.0 with fewer than two experts)."""
    pairs = np.triu_indices(similarity.shape[0], 1)
    if not len(pairs[0]):
        return 1.0
    return float(1.0 - relative * np.median(1.0 - similarity[pairs]))


def twin_groups(similarity: np.ndarray, relative: float = TWIN_RELATIVE_DISTANCE) -> list[list[int]]:
    """The connected components of "twins" (see `cosine_threshold`) over one layer's [E, E] cosine matrix."""
    threshold = cosine_threshold(similarity, relative)
    num_experts = similarity.shape[0]
    parent = list(range(num_experts))

    def root(e: int) -> int:
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    for i in range(num_experts):
        for j in range(i + 1, num_experts):
            if similarity[i, j] >= threshold:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for e in range(num_experts):
        groups.setdefault(root(e), []).append(e)
    return sorted(groups.values())


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    block_cls = architecture_for(model.config).block_class()
    return [m for layer in model.get_decoder().layers for m in layer.modules() if isinstance(m, block_cls)]


@torch.no_grad()
def expert_similarity(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    max_tokens: int = CALIBRATION_TOKENS,
) -> tuple[np.ndarray, int]:
    """[L, E, E] cosine of every pair of experts' outputs on the real tokens of `inputs` (at most
    `max_tokens`, `mask` 1 = real), and the number of tokens used. One eval-mode forward records the
    input of each MoE block; each expert then computes its output for all of them."""
    blocks = _moe_blocks(model)
    entering: dict[int, torch.Tensor] = {}

    def record(index):
        def hook(module, args, kwargs):
            entering[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        with lm_head_as_identity(model):
            model(**inputs, use_cache=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    keep = None if mask is None else mask.reshape(-1).bool()
    num_experts = architecture_for(model.config).num_experts(model.config)
    out, tokens = [], 0
    for i, block in enumerate(blocks):
        x = entering[i].reshape(-1, entering[i].shape[-1])
        x = (x if keep is None else x[keep.to(x.device)])[:max_tokens]
        tokens = x.shape[0]
        index = torch.zeros(tokens, 1, dtype=torch.long, device=x.device)
        weight = torch.ones(tokens, 1, dtype=x.dtype, device=x.device)
        outputs = torch.stack([block.experts(x, index + e, weight).reshape(-1).double() for e in range(num_experts)])
        norms = outputs.norm(dim=1)
        sim = (outputs @ outputs.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
        same = torch.tensor([[torch.equal(a, b) for b in outputs] for a in outputs], device=sim.device)
        out.append(torch.where(same, 1.0, sim).clamp(-1.0, 1.0).cpu().numpy())
    return np.stack(out), tokens


def experts_sharded(model: nn.Module) -> bool:
    """Whether any expert weight is an FSDP2 DTensor or a ZeRO-3 partition: such experts compute only
    inside the whole model's forward (every rank together), never one by one on one rank."""
    return any(is_sharded(p) for block in _moe_blocks(model) for p in block.experts.parameters())


def measure_twins(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    relative: float = TWIN_RELATIVE_DISTANCE,
    max_tokens: int = CALIBRATION_TOKENS,
    fingerprints: list[list[str]] | None = None,
) -> ExpertTwins:
    """The twin groups of `model`'s MoE layers, measured on the real tokens of `inputs` (see module doc).

    Sharded experts (`experts_sharded`) are not run: the groups come from `fingerprints` (bit-identical
    experts) when given, else every expert is its own group. Decided before any forward, so that each rank
    of a sharded model may call this alone."""
    if not 0.0 <= relative < 1.0:
        raise ValueError(f"the twin threshold is a share of the median pair distance in [0, 1), got {relative}")
    if experts_sharded(model):
        if fingerprints is not None:
            return twins_from_fingerprints(fingerprints)
        info = architecture_for(model.config)
        singletons = [[e] for e in range(info.num_experts(model.config))]
        return ExpertTwins(groups=[list(singletons) for _ in _moe_blocks(model)], method="not measured", threshold=None)
    similarity, tokens = expert_similarity(model, inputs, mask, max_tokens)
    return ExpertTwins(
        groups=[twin_groups(layer, relative) for layer in similarity],
        method="output cosine",
        threshold=relative,
        tokens=tokens,
        similarity=np.round(similarity, 4).tolist(),
        cosine_thresholds=[round(cosine_threshold(layer, relative), 4) for layer in similarity],
    )


def twins_from_fingerprints(fingerprints: list[list[str]]) -> ExpertTwins:
    """Groups of bit-identical experts only (no expert output measured), singletons included."""
    groups = []
    for layer, identical in zip(fingerprints, identical_expert_groups(fingerprints)):
        grouped = {e for g in identical for e in g}
        groups.append(sorted(identical + [[e] for e in range(len(layer)) if e not in grouped]))
    return ExpertTwins(groups=groups, method="identical weights", threshold=None, tokens=0, similarity=None)


__all__ = [
    "CALIBRATION_TOKENS",
    "TWIN_RELATIVE_DISTANCE",
    "cosine_threshold",
    "ExpertTwins",
    "expert_similarity",
    "experts_sharded",
    "measure_twins",
    "twin_groups",
    "twins_from_fingerprints",
]
