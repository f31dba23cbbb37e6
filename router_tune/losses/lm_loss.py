"""The LM cross-entropy without the full logits tensor.

A causal LM's logits are [tokens, vocab]: for a 32k vocabulary and 2k-token sequences that
is the largest activation of the step, and transformers keeps it (plus an fp32 copy) for
backward. Router training never updates the LM head, so the gradient the loss sends back
is only d(loss)/d(hidden) = (softmax - onehot) @ W. We compute it chunk by chunk in the
forward pass and keep only that [tokens, hidden] gradient (Liger's fused linear
cross-entropy, simplified for a frozen head): peak memory is one chunk of logits.
"""

from __future__ import annotations

import torch
from torch import nn

from router_tune.data import IGNORE_INDEX


class _FrozenHeadCrossEntropySum(torch.autograd.Function):
    """sum_t CE(hidden_t @ W^T, target_t) with the gradient w.r.t. hidden computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        # Ignored positions are kept and weighted 0 rather than selected out: selecting needs the
        # count on the host (a GPU sync per micro-batch), and packed blocks have almost none.
        valid = targets != IGNORE_INDEX
        safe_targets = targets.masked_fill(~valid, 0)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            y, keep = safe_targets[start : start + chunk], valid[start : start + chunk]
            # in the head's dtype: under mixed precision accelerate hands back fp32 hidden states
            # (convert_outputs_to_fp32) beside a bf16 head, and the loss runs outside autocast
            logits = (h.to(weight.dtype) @ weight.T).float()
            rows = torch.arange(y.shape[0], device=y.device)
            target_logit = logits[rows, y]
            # logsumexp by hand, in place: torch.logsumexp would allocate a second [chunk, vocab]
            # tensor for exp(x - max), doubling the peak of the loss.
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            token_loss = total.log().squeeze(-1) + top.squeeze(-1) - target_logit
            loss = loss + torch.where(keep, token_loss, 0.0).sum()
            if grad_hidden is not None:
                # softmax - onehot, still in the chunk's logits buffer; ignored rows get no gradient
                probs.div_(total)
                probs[rows, y] -= 1.0
                probs.mul_(keep.unsqueeze(-1))
                grad_hidden[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def lm_loss_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy of a causal LM, from its final hidden states.

    Args:
        hidden: [batch, seq, hidden] output of the final norm (what the LM head reads).
        head: the frozen LM head (no bias; `weight` [vocab, hidden]).
        labels: [batch, seq]; position t is the target of position t-1, -100 is ignored.
        chunk_tokens: tokens per chunk of logits.

    Returns:
        The fp32 sum over target tokens (divide by the global target count yourself).
    """
    if head.weight.requires_grad or getattr(head, "bias", None) is not None:
        raise ValueError("lm_loss_sum needs a frozen, bias-free LM head")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    return _FrozenHeadCrossEntropySum.apply(h, head.weight, y, max(1, chunk_tokens))


def next_token_loss_sum(
    output: torch.Tensor, head: nn.Linear | None, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Summed next-token cross-entropy from what the model returned as `logits`.

    With `head` (inside `model.routers.lm_head_as_identity`) `output` is the final hidden states and the loss
    is computed chunk-wise by `lm_loss_sum`; with `head=None` it is the real logits (FSDP /
    DeepSpeed shard the head, or a head `lm_loss_sum` cannot take) and the plain CE is used.
    """
    if head is not None:
        return lm_loss_sum(output, head, labels, chunk_tokens)
    logits = output[:, :-1].float()
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
