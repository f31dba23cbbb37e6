"""What the routers do: expert loads, entropy, dead experts, per-source routing.

`RoutingStats` accumulates on the device over any number of micro-batches without a host sync
(the trainer updates it every step); `reduce()` sums it over data-parallel ranks and
`summary()` turns it into plain numpy numbers once per logging window:

    stats = RoutingStats(num_layers=2, num_experts=4, top_k=2, sources=["redpajama", "chat"])
    stats.update(outputs.router_logits, mask=attention_mask, source_ids=source_id_per_token)
    stats.reduce(); summary = stats.summary(); stats.reset()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from router_tune.losses.balancing import biased_top_k, count_selections, stack_router_logits, top_k_experts

_ARRAYS = (
    "load",
    "mean_prob",
    "token_entropy",
    "mean_entropy",
    "max_load",
    "cv",
    "dead",
    "mean_lse",
    "source_tokens",
    "source_load",
    "source_layer_load",
)


def _shares(counts: np.ndarray) -> np.ndarray:
    """Rows of counts divided by their sums over the last axis; rows with no count stay 0."""
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts, dtype=np.float64), where=totals > 0)


def group_balance(load: np.ndarray, groups: Sequence[Sequence[Sequence[int]]]) -> dict[str, np.ndarray]:
    """Balance within and across groups of twin experts (routing/twins.py), per layer.

    Args:
        load: [L, E] shares of top-k selections (rows sum to 1, or 0 without tokens).
        groups: per layer, a partition of the experts.

    Returns:
        `within_max_load` [L]: over the layer's groups of two or more experts, the largest
            max-share / mean-share inside one group (1 = each group splits its tokens evenly; 1 also
            when no group has two experts or received a token);
        `across_max_load` [L]: max over groups of the group's share per member, over the mean share
            1/E: the max-load / mean the layer would have if every group split its tokens evenly
            (1 = balanced across groups). 0 for a layer without tokens, like `max_load`.
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_experts = load.shape
    if len(groups) != num_layers:
        raise ValueError(f"{len(groups)} layers of expert groups for {num_layers} layers of load")
    within, across = np.ones(num_layers), np.zeros(num_layers)
    for i, layer_groups in enumerate(groups):
        members = sorted(e for g in layer_groups for e in g)
        if members != list(range(num_experts)):
            raise ValueError(f"the expert groups of layer {i} are not a partition of the {num_experts} experts")
        for g in layer_groups:
            share = load[i, list(g)]
            if len(g) > 1 and share.sum() > 0:
                within[i] = max(within[i], share.max() / share.mean())
            across[i] = max(across[i], share.sum() / len(g) * num_experts)
    return {"within_max_load": within, "across_max_load": across}


@dataclass
class RoutingSummary:
    """Routing over one window of tokens, as numpy arrays (L layers, E experts, S sources).

    Attributes:
        layers: MoE layer indices of the model (labels of the L rows).
        tokens: real (unmasked) tokens in the window.
        load: [L, E] share of top-k selections per expert; rows sum to 1 (0 if no tokens).
        mean_prob: [L, E] mean routing softmax probability.
        token_entropy: [L] mean over tokens of the entropy of each token's routing softmax
            (nats; 0 = saturated, log E = uniform).
        mean_entropy: [L] entropy of the mean distribution `mean_prob` (log E = balanced on average).
        max_load: [L] largest share / mean share (1/E); 1.0 = balanced, E = one expert takes all.
        cv: [L] coefficient of variation of `load` (population std / mean); 0 = balanced.
        dead: [L] experts never selected in the window.
        mean_lse: [L] mean logsumexp of the logits (what the z-loss squares).
        sources: names of the data sources.
        source_tokens: [S] real tokens of each source.
        source_layer_load: [S, L, E] share of each source's selections per expert per layer.
        source_load: [S, E] `source_layer_load` averaged over layers. Rows of sources with
            tokens sum to 1; rows of sources without tokens in the window are all zeros (never
            NaN, so the summary stays valid JSON), recognisable by `source_tokens == 0`.
        expert_groups: per layer, the twin groups of experts (routing/twins.py), a partition of
            the experts; empty when unknown. With them, `group_balance()` and the scalars add the
            balance within and across groups.
    """

    layers: list[int]
    num_experts: int
    top_k: int
    tokens: int
    load: np.ndarray
    mean_prob: np.ndarray
    token_entropy: np.ndarray
    mean_entropy: np.ndarray
    max_load: np.ndarray
    cv: np.ndarray
    dead: np.ndarray
    mean_lse: np.ndarray
    sources: list[str] = field(default_factory=list)
    source_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    source_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    source_layer_load: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    expert_groups: list = field(default_factory=list)

    def maxvio(self) -> np.ndarray:
        """[L] MaxVio (arXiv 2408.15664): max-load / mean - 1 (0 = balanced; 0 for a layer without tokens)."""
        return np.clip(np.asarray(self.max_load, dtype=np.float64) - 1.0, 0.0, None)

    def group_balance(self) -> dict[str, np.ndarray] | None:
        """`group_balance` of this window's load over `expert_groups`; None when the groups are unknown."""
        return group_balance(self.load, self.expert_groups) if self.expert_groups else None

    def to_dict(self) -> dict:
        """Plain lists and numbers (json.dumps-able)."""
        return {
            f.name: (getattr(self, f.name).tolist() if f.name in _ARRAYS else getattr(self, f.name))
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict) -> RoutingSummary:
        return cls(**{k: (np.asarray(v) if k in _ARRAYS else v) for k, v in data.items()})

    def scalars(self, prefix: str = "routing") -> dict[str, float]:
        """Flat metrics for a logger: per layer (labelled by the model's layer index) and means."""
        out: dict[str, float] = {}
        maxvio, grouped = self.maxvio(), self.group_balance() or {}
        for i, layer in enumerate(self.layers):
            out[f"{prefix}/L{layer}/max_load"] = float(self.max_load[i])
            out[f"{prefix}/L{layer}/entropy"] = float(self.token_entropy[i])
            out[f"{prefix}/L{layer}/dead"] = int(self.dead[i])
            out[f"{prefix}/L{layer}/cv"] = float(self.cv[i])
            out[f"{prefix}/L{layer}/lse"] = float(self.mean_lse[i])
            out[f"{prefix}/L{layer}/maxvio"] = float(maxvio[i])
            for key, values in grouped.items():
                out[f"{prefix}/L{layer}/{key}"] = float(values[i])
        out[f"{prefix}/mean/max_load"] = float(np.mean(self.max_load))
        out[f"{prefix}/mean/maxvio"] = float(np.mean(maxvio))
        out[f"{prefix}/worst/max_load"] = float(np.max(self.max_load))
        for key, values in grouped.items():
            out[f"{prefix}/worst/{key}"] = float(np.max(values))
        out[f"{prefix}/mean/entropy"] = float(np.mean(self.token_entropy))
        out[f"{prefix}/mean/cv"] = float(np.mean(self.cv))
        out[f"{prefix}/total/dead"] = int(np.sum(self.dead))
        return out


class RoutingStats:
    """Device-side accumulators of routing statistics over micro-batches.

    Args:
        num_layers, num_experts, top_k: the MoE shape.
        sources: data-source names; `update(source_ids=...)` indexes into them.
        device: where the accumulators live. None: the device of the first logits passed to
            `update` (so the trainer need not know it up front).
        layer_ids: the model's MoE layer indices, used as labels in the summary (default 0..L-1).
        expert_groups: per layer, the twin groups of experts (routing/twins.py) the summaries report
            balance within and across; settable later (`stats.expert_groups = ...`).

    Sums are kept in float64 (float32 on MPS, which has no float64) so long windows stay exact.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        sources: Sequence[str] = (),
        device: torch.device | str | None = None,
        layer_ids: Sequence[int] | None = None,
        expert_groups: Sequence | None = None,
    ):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.sources = list(sources)
        self.layer_ids = list(range(num_layers)) if layer_ids is None else [int(i) for i in layer_ids]
        if len(self.layer_ids) != num_layers:
            raise ValueError(f"layer_ids has {len(self.layer_ids)} entries for {num_layers} layers")
        self.expert_groups = list(expert_groups or [])  # twin groups per layer, passed to every summary
        self._device_fixed = device is not None
        self._allocate(torch.device(device) if device is not None else torch.device("cpu"))

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        shape_le, shape_l = (self.num_layers, self.num_experts), (self.num_layers,)
        self._acc = {
            "counts": torch.zeros(shape_le, dtype=dtype, device=device),
            "prob_sum": torch.zeros(shape_le, dtype=dtype, device=device),
            "entropy_sum": torch.zeros(shape_l, dtype=dtype, device=device),
            "lse_sum": torch.zeros(shape_l, dtype=dtype, device=device),
            "tokens": torch.zeros((), dtype=dtype, device=device),
            "source_counts": torch.zeros((len(self.sources), *shape_le), dtype=dtype, device=device),
            "source_tokens": torch.zeros(len(self.sources), dtype=dtype, device=device),
        }
        self._reduced = False
        self.micro_batches = 0

    def reset(self) -> None:
        """Zero every accumulator (start a new window); keeps the device."""
        for acc in self._acc.values():
            acc.zero_()
        self._reduced = False
        self.micro_batches = 0

    def tokens_seen(self) -> int:
        """Real tokens accumulated in this window on this rank (global after `reduce()`).

        Reads a device value (a host sync): call it at logging time, not per step. Before a
        collective, gate on `micro_batches` instead (a Python counter, equal on every rank
        that ran the same steps), so that no rank skips `reduce()` while another waits in it.
        """
        return int(round(self._acc["tokens"].item()))

    @torch.no_grad()
    def update(
        self,
        router_logits: Sequence[Tensor],
        mask: Tensor | None = None,
        source_ids: Tensor | None = None,
        selection_bias: Tensor | None = None,
    ) -> None:
        """Add one micro-batch. router_logits: tuple of [T, E] per layer (detached here);
        mask: [T] 1 = real token; source_ids: LongTensor [T] of indices into `sources`;
        selection_bias: [L, E] the bias the routers chose their top-k with (loss-free balancing), so
        the loads are those of the experts the tokens actually went to."""
        if self._reduced:
            raise RuntimeError(
                "RoutingStats.update after reduce(): the sums are already global; call reset() to start a new window"
            )
        if len(router_logits) != self.num_layers or router_logits[0].shape[-1] != self.num_experts:
            raise ValueError(
                f"expected {self.num_layers} layers of [T, {self.num_experts}] router logits, "
                f"got {len(router_logits)} of {list(router_logits[0].shape)}"
            )
        if source_ids is not None and not self.sources:
            raise ValueError("source_ids given but RoutingStats was built without sources")
        logits, weight = stack_router_logits([layer.detach() for layer in router_logits], mask)
        if not self._device_fixed:
            self._allocate(logits.device)
            self._device_fixed = True
        logits, weight = logits.to(self.device), weight.to(self.device)
        probs = torch.softmax(logits, dim=-1)
        if selection_bias is None:
            selected = top_k_experts(probs, self.top_k)
        else:
            selected = biased_top_k(logits, self.top_k, selection_bias.to(self.device))
        acc = self._acc
        acc["counts"] += count_selections(selected, self.num_experts, weight)[0]
        acc["prob_sum"] += torch.einsum("lte,t->le", probs, weight)
        # entr(p) = -p ln p with entr(0) = 0: an expert masked out with a -inf logit adds 0, not NaN.
        acc["entropy_sum"] += torch.special.entr(probs).sum(dim=-1) @ weight
        acc["lse_sum"] += torch.logsumexp(logits, dim=-1) @ weight
        acc["tokens"] += weight.sum()
        self.micro_batches += 1
        if source_ids is not None:
            source_ids = source_ids.reshape(-1).to(self.device)
            acc["source_counts"] += count_selections(selected, self.num_experts, weight, source_ids, len(self.sources))
            acc["source_tokens"].scatter_add_(0, source_ids, weight.to(acc["source_tokens"].dtype))

    def reduce(self) -> None:
        """Sum the accumulators over all data-parallel ranks (no-op on one process).

        A collective: every rank must call it, once per window, after its last `update` and
        before `summary()`. A second call in the same window does nothing (it would double
        count), and `update` raises until `reset()` starts the next window.
        """
        if self._reduced:
            return
        # Marked even on one process, so that misuse (update after reduce) fails in a
        # single-process test instead of only under DDP.
        self._reduced = True
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        # One flat buffer, one collective, instead of one all_reduce per accumulator.
        flat = torch.cat([acc.reshape(-1) for acc in self._acc.values()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for acc in self._acc.values():
            acc.copy_(flat[offset : offset + acc.numel()].view_as(acc))
            offset += acc.numel()

    def summary(self) -> RoutingSummary:
        """The window as numpy numbers (one device-to-host copy). An empty window gives zeros."""
        acc = {name: value.detach().cpu().double().numpy() for name, value in self._acc.items()}
        tokens = acc["tokens"].item()
        per_token = 1.0 / tokens if tokens > 0 else 0.0
        load = _shares(acc["counts"])
        mean_prob = acc["prob_sum"] * per_token
        safe = np.where(mean_prob > 0, mean_prob, 1.0)  # 0 ln 0 = 0
        mean_entropy = np.sum(np.where(mean_prob > 0, -mean_prob * np.log(safe), 0.0), axis=-1)
        source_layer_load = _shares(acc["source_counts"])
        return RoutingSummary(
            layers=list(self.layer_ids),
            num_experts=self.num_experts,
            top_k=self.top_k,
            tokens=int(round(tokens)),
            load=load,
            mean_prob=mean_prob,
            token_entropy=acc["entropy_sum"] * per_token,
            mean_entropy=mean_entropy,
            max_load=load.max(axis=-1) * self.num_experts,
            cv=load.std(axis=-1) * self.num_experts,
            dead=(acc["counts"] == 0).sum(axis=-1).astype(np.int64),
            mean_lse=acc["lse_sum"] * per_token,
            sources=list(self.sources),
            source_tokens=np.rint(acc["source_tokens"]).astype(np.int64),
            source_load=source_layer_load.mean(axis=1),
            source_layer_load=source_layer_load,
            expert_groups=[[list(g) for g in layer] for layer in self.expert_groups],
        )


__all__ = ["RoutingStats", "RoutingSummary", "group_balance"]
