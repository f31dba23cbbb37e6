"""Router losses: Switch load balancing (per layer or pooled, micro- or global-batch) and z-loss.

Every function takes what the model returns with `output_router_logits=True`: a tuple with one
tensor [T, E] per MoE layer (T = batch * seq tokens, flattened the way transformers flattens
them; any [..., E] shape is flattened the same way) and an optional `mask` [T] (or [batch, seq])
that is 1 for real tokens and 0 for padding.

Nothing here moves a value to the host: the trainer calls these on every micro-batch, and a
`.item()` there would stall the accelerator once per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

SCOPES = ("layer", "pooled")


def stack_router_logits(router_logits: Sequence[Tensor], mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stack the per-layer logits into one fp32 tensor [L, T, E] and the mask into weights [T].

    One stacked tensor lets softmax, top-k and the counting run as a few kernels for all layers
    instead of a few per layer. Without a mask every token weighs 1.
    """
    if len(router_logits) == 0:
        raise ValueError(
            "router_logits is empty: the model returned no router logits "
            "(was it called with output_router_logits=True?)"
        )
    num_experts = router_logits[0].shape[-1]
    logits = torch.stack([layer.reshape(-1, num_experts) for layer in router_logits]).float()
    if mask is None:
        weight = logits.new_ones(logits.shape[1])
    else:
        weight = mask.reshape(-1).to(device=logits.device, dtype=logits.dtype)
        if weight.shape[0] != logits.shape[1]:
            raise ValueError(f"mask has {weight.shape[0]} tokens but the router logits have {logits.shape[1]}")
        # Padding rows may hold anything (inf from a bf16 overflow, NaN): zero them before the
        # softmax, because NaN * weight 0 is still NaN and would reach the router's gradient.
        logits = torch.where(weight.view(1, -1, 1) > 0, logits, 0.0)
    return logits, weight


def top_k_experts(probs: Tensor, top_k: int) -> Tensor:
    """Indices [..., top_k] of the experts a token is sent to.

    Taken from the softmax probabilities, not the logits, because that is what the transformers
    routers do: in a saturated softmax several probabilities underflow to the same value and the
    tie is then broken the way the model breaks it.
    """
    return torch.topk(probs, top_k, dim=-1).indices


def count_selections(
    selected: Tensor, num_experts: int, weight: Tensor | None = None, groups: Tensor | None = None, num_groups: int = 1
) -> Tensor:
    """Mask-weighted top-k selection counts, the one counting primitive of the package.

    Args:
        selected: LongTensor [L, T, k] of expert indices (from `top_k_experts`).
        num_experts: E.
        weight: [T] token weights (the mask); None counts every token once.
        groups: LongTensor [T] of group ids in [0, num_groups) (e.g. the data source of each
            token); None puts every token in group 0. Ids out of range raise (on CPU) or trip a
            device assert: they are not checked here because checking needs a host sync.
        num_groups: G.

    Returns:
        fp32 tensor [G, L, E]: entry [g, l, e] is the weighted number of tokens of group g that
        layer l sent to expert e. Detached.
    """
    num_layers, tokens, k = selected.shape
    device = selected.device
    weight = torch.ones(tokens, device=device) if weight is None else weight.detach().float()
    # One flat scatter for every (group, layer, expert) cell: no Python loop over layers.
    layer_offset = torch.arange(num_layers, device=device).view(-1, 1, 1) * num_experts
    index = selected + layer_offset
    if groups is not None:
        index = index + groups.to(device).view(1, -1, 1) * (num_layers * num_experts)
    counts = torch.zeros(num_groups * num_layers * num_experts, device=device)
    counts.scatter_add_(0, index.reshape(-1), weight.view(1, -1, 1).expand(num_layers, tokens, k).reshape(-1))
    return counts.view(num_groups, num_layers, num_experts)


def biased_top_k(logits: Tensor, top_k: int, bias: Tensor) -> Tensor:
    """Indices [L, T, top_k] chosen by top-k of `logits + bias` (bias [L, E]): the experts a router with a
    selection bias sends each token to (model/routers.py `set_selection_bias`, loss-free balancing)."""
    return torch.topk(logits + bias.to(logits).unsqueeze(1), top_k, dim=-1).indices


def selection_counts(
    router_logits: Sequence[Tensor], top_k: int, mask: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Top-k selection counts [L, E] of one micro-batch (padding excluded), detached.

    Rows sum to (number of real tokens) * top_k. This is what the trainer sums over
    gradient-accumulation micro-batches and `all_reduce_counts` sums over ranks before passing
    the result as `counts=` to `load_balancing_loss`. `bias` [L, E]: the selection bias the
    routers chose with (the counts are then those of the biased choice, `biased_top_k`).
    """
    logits, weight = stack_router_logits(router_logits, mask)
    with torch.no_grad():
        if bias is None:
            selected = top_k_experts(torch.softmax(logits, dim=-1), top_k)
        else:
            selected = biased_top_k(logits, top_k, bias)
        return count_selections(selected, logits.shape[-1], weight)[0]


def all_reduce_counts(counts: Tensor) -> Tensor:
    """Sum selection counts over data-parallel ranks (detached copy; identity on one process).

    Every rank must call it (it is a collective). With NCCL the tensor must be on the GPU.
    """
    counts = counts.detach()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts = counts.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def _token_count(weight: Tensor, num_tokens: Tensor | float | None) -> Tensor:
    """The denominator of per-token means: the micro-batch's real tokens, or a count given by the caller."""
    if num_tokens is None:
        return weight.sum()
    return torch.as_tensor(num_tokens, dtype=weight.dtype, device=weight.device)


def _counts_and_prob_sums(
    router_logits: Sequence[Tensor], top_k: int, mask: Tensor | None, counts: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """What every balancing loss reads: the selection counts [L, E] (the micro-batch's own, or the
    given ones checked and detached), the softmax probabilities summed over real tokens [L, E]
    (carry the gradient) and the token weights [T]."""
    logits, weight = stack_router_logits(router_logits, mask)
    probs = torch.softmax(logits, dim=-1)
    # Padding rows carry weight 0, so they add nothing to P whatever their logits are.
    return _step_counts(probs, top_k, weight, counts), torch.einsum("lte,t->le", probs, weight), weight


def _step_counts(probs: Tensor, top_k: int, weight: Tensor, counts: Tensor | None) -> Tensor:
    """The selection counts [L, E] a balancing loss reads: the micro-batch's own top-k of `probs` [L, T, E], or
    the given ones (e.g. the global batch's) checked and detached."""
    num_layers, _, num_experts = probs.shape
    if counts is None:
        with torch.no_grad():
            return count_selections(top_k_experts(probs, top_k), num_experts, weight)[0]
    if tuple(counts.shape) != (num_layers, num_experts):
        raise ValueError(
            f"counts must have shape [layers, experts] = {[num_layers, num_experts]}, got {list(counts.shape)}"
        )
    return counts.detach().to(device=probs.device, dtype=probs.dtype)


def load_balancing_loss(
    router_logits: Sequence[Tensor],
    top_k: int,
    mask: Tensor | None = None,
    scope: str = "layer",
    counts: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """Switch-Transformer load-balancing loss, E * sum_i f_i * P_i.

    f_i is the share of top-k selections that went to expert i (not differentiable: it comes
    from a top-k), P_i the mean softmax probability of expert i over real tokens; the gradient
    flows through P only, pushing probability away from over-used experts.

    Args:
        router_logits: tuple of [T, E] logits, one per MoE layer.
        top_k: experts per token.
        mask: [T] (or [batch, seq]) 1 for real tokens, 0 for padding; None = all real.
        scope: "layer": the loss of each layer, averaged over layers, with f normalised by
            top_k, so a perfectly balanced router scores exactly 1.0 whatever E and top_k.
            "pooled": transformers' `load_balancing_loss_func` exactly: f and P pooled over
            all layers before the product, f not divided by top_k (balanced = top_k). Kept to
            compare with the number the model itself reports.
        counts: optional selection counts [L, E] reduced elsewhere, e.g. summed over
            gradient-accumulation micro-batches and over data-parallel ranks with
            `all_reduce_counts` (Qwen's global-batch balancing). When given, f comes from these
            counts, each layer normalised by its own total (pooled: by the total over layers,
            times top_k), and the local micro-batch only supplies P, which carries the
            gradient. A router may then specialise within a micro-batch (one domain per
            sequence) as long as the global batch stays balanced. The counts are detached.
        num_tokens: the number of real tokens P is averaged over; default the micro-batch's own.
            The trainer passes the real tokens of the whole optimizer step on all ranks, so each
            micro-batch contributes its share of P and the sum over micro-batches and ranks is
            the loss of one big batch exactly, however unevenly tokens are spread.

    Returns:
        fp32 scalar tensor. If every token is padding the loss is 0, not NaN.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    counts, prob_sum, weight = _counts_and_prob_sums(router_logits, top_k, mask, counts)
    num_layers, num_experts = prob_sum.shape
    tokens = _token_count(weight, num_tokens)
    # The mask is 0/1: clamping at 1 only changes the all-padding case (0 instead of 0/0).
    if scope == "layer":
        f = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
        p = prob_sum / tokens.clamp_min(1.0)
        return num_experts * (f * p).sum(dim=-1).mean()
    # pooled: transformers divides both pooled sums by L * tokens; sum(counts) = L * tokens * k.
    f = counts.sum(dim=0) * top_k / counts.sum().clamp_min(1.0)
    p = prob_sum.sum(dim=0) / (num_layers * tokens).clamp_min(1.0)
    return num_experts * (f * p).sum()


def overload_loss(
    router_logits: Sequence[Tensor],
    top_k: int,
    threshold: float,
    mask: Tensor | None = None,
    counts: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """Per-layer overload loss [L]: sum over experts of max(0, E * f_i - threshold) * P_i.

    E * f_i is expert i's load over the mean load (what `max_load` reports), P_i its mean
    softmax probability (carries the gradient), f and counts as in `load_balancing_loss`. Unlike
    the Switch loss, which pulls every layer towards uniform use whatever its balance, this is
    zero in a layer whose experts all stay under `threshold`, and it pushes tokens off an
    overloaded expert in proportion to its excess, towards the experts each token already rates
    next. Specialised routing (one domain per pair of experts) is left alone while it is balanced.
    """
    counts, prob_sum, weight = _counts_and_prob_sums(router_logits, top_k, mask, counts)
    num_experts = prob_sum.shape[-1]
    load = num_experts * counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    excess = (load - threshold).clamp_min(0.0)
    p = prob_sum / _token_count(weight, num_tokens).clamp_min(1.0)
    return (excess * p).sum(dim=-1)


def twin_balancing_loss(
    router_logits: Sequence[Tensor],
    top_k: int,
    group_of: Tensor,
    mask: Tensor | None = None,
    counts: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """Balance within twin groups only: the mean over (layer, group of two or more experts) of
    sum_{i in group} (n f_i/F - 1) * Q_i, with f the selection shares as in `load_balancing_loss`, F the group's
    share of the layer's selections, n its size, and Q_i the mean over real tokens of p_g * q_i: q the softmax
    over the group's own logits, p_g the group's probability (a constant, no gradient).

    Twins (routing/twins.py) are experts whose outputs are nearly the same: which of them a token goes to
    changes its output little, so their imbalance costs throughput and buys nothing. The Switch loss pulls every
    expert to the mean and so also moves tokens across groups, away from the expert that suits them. Here the
    gradient reaches only the logits of a group's members, through the softmax among them, and sums to zero over
    them: it moves probability between twins and leaves the other experts alone (a first form on the full
    softmax, with weights scaled by 1/F, also pushed tokens out of the busy twin's group and lost the balance in
    a pilot on the second lab merge: within-group max/mean 2.0, 9 dead experts). Weighting each token by p_g
    lets the tokens a group actually gets drive its balance. The weights n f_i/F - 1 (load over the group's
    mean, minus 1) lie in [-1, n-1] however few tokens the group gets. 0 when every group is balanced within; a
    group that got no selection adds 0. Linear in the per-token terms, so the sum over micro-batches and ranks
    (with global counts and `num_tokens`) is the loss of the whole batch.

    Args:
        group_of: LongTensor [L, E], each expert's group id in its layer (0..E-1, `ExpertTwins.group_ids`).
        router_logits, top_k, mask, counts, num_tokens: as in `load_balancing_loss` (scope "layer").
    """
    logits, weight = stack_router_logits(router_logits, mask)
    probs = torch.softmax(logits, dim=-1)
    counts = _step_counts(probs, top_k, weight, counts)
    if tuple(group_of.shape) != tuple(counts.shape):
        shapes = f"{list(counts.shape)}, got {list(group_of.shape)}"
        raise ValueError(f"group_of must have shape [layers, experts] = {shapes}")
    group_of = group_of.to(logits.device)
    f = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    group_share = torch.zeros_like(f).scatter_add_(1, group_of, f).gather(1, group_of)  # F of each expert's group
    size = torch.zeros_like(f).scatter_add_(1, group_of, torch.ones_like(f)).gather(1, group_of)
    live = (size >= 2) & (group_share > 0)
    coef = torch.where(live, size * f / torch.where(live, group_share, 1.0) - 1.0, 0.0)
    # q: the softmax among each group's members, shifted by the group's max logit (the sum below is then >= 1)
    ids = group_of.unsqueeze(1).expand_as(logits)
    group_max = torch.full_like(logits, float("-inf")).scatter_reduce(-1, ids, logits.detach(), "amax")
    shifted = (logits - group_max.gather(-1, ids)).exp()
    q = shifted / torch.zeros_like(shifted).scatter_add(-1, ids, shifted).gather(-1, ids)
    with torch.no_grad():
        group_prob = torch.zeros_like(probs).scatter_add_(-1, ids, probs).gather(-1, ids)
    mass = torch.einsum("lte,t->le", group_prob * q, weight) / _token_count(weight, num_tokens).clamp_min(1.0)
    # each group of two or more counted once: its members' 1/n sum to 1
    groups = torch.where(size >= 2, 1.0 / size, 0.0).sum()
    return (coef * mass).sum() / groups.clamp_min(1.0)


def router_z_loss(
    router_logits: Sequence[Tensor], mask: Tensor | None = None, num_tokens: Tensor | float | None = None
) -> Tensor:
    """ST-MoE router z-loss: mean over layers of the mean over real tokens of logsumexp(logits)^2.

    It keeps logits small, which keeps the softmax out of saturation (where the balancing loss
    has no gradient left) and the fp32 router numerically safe. 0 if every token is padding.
    `num_tokens` replaces the micro-batch's own token count as the denominator (see
    `load_balancing_loss`).
    """
    logits, weight = stack_router_logits(router_logits, mask)
    lse_sq = torch.logsumexp(logits, dim=-1).square()
    per_layer = (lse_sq * weight).sum(dim=-1) / _token_count(weight, num_tokens).clamp_min(1.0)
    return per_layer.mean()


def bias_distillation_loss(
    router_logits: Sequence[Tensor], bias: Tensor, mask: Tensor | None = None, num_tokens: Tensor | float | None = None
) -> Tensor:
    """KL(softmax(logits + bias) || softmax(logits)), the biased distribution a fixed target: mean over layers
    of the mean over real tokens. Its gradient on the logits is softmax(logits) - softmax(logits + bias), so
    it moves each router toward choosing as the selection bias [L, E] makes it choose (the fade of
    loss-free balancing, training/loss_free.py). `num_tokens` as in `router_z_loss`."""
    logits, weight = stack_router_logits(router_logits, mask)
    log_probs = torch.log_softmax(logits, dim=-1)
    with torch.no_grad():
        target = torch.log_softmax(logits + bias.to(logits).unsqueeze(1), dim=-1)
    kl = (target.exp() * (target - log_probs)).sum(dim=-1)
    per_layer = (kl * weight).sum(dim=-1) / _token_count(weight, num_tokens).clamp_min(1.0)
    return per_layer.mean()


__all__ = [
    "bias_distillation_loss",
    "load_balancing_loss",
    "overload_loss",
    "router_z_loss",
    "twin_balancing_loss",
    "selection_counts",
    "biased_top_k",
    "all_reduce_counts",
    "count_selections",
    "top_k_experts",
    "stack_router_logits",
    "SCOPES",
]
