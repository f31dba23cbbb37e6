"""The one estimate of router-training memory, shown by `inspect` and `train --dry-run`."""

from __future__ import annotations

import torch

from router_tune.model.loading import MoeInfo

TRAIN_SEQ_LEN = 2048  # the sequence length `inspect` plans for (Raiden's context)


def training_memory(
    info: MoeInfo,
    total: int,
    trainable: int,
    vocab_size: int,
    seq_len: int = TRAIN_SEQ_LEN,
    dtype: torch.dtype | None = None,
) -> dict:
    """Rough peak memory of router-only training on one sequence of `seq_len` tokens, in bytes.

    weights     = (total - R) * b + R * 4        frozen weights in their dtype, routers as fp32 masters
    gradients   = R * 4                          only routers get gradients
    adam        = 2 * R * 4                      exp_avg and exp_avg_sq, fp32
    activations = L * T * (10*H + 3*k*I) * b + 2 * T * V * 4
        every layer's activations are kept because the gradient of the first router flows back
        through all later layers (~10 hidden-size tensors for attention, norms and residuals,
        3 intermediate-size tensors per selected expert; memory-efficient attention assumed), plus
        fp32 logits and their softmax for the loss. b = bytes per weight element (of `dtype`, default
        the model's), R = router params.
    """
    b = (dtype or info.dtype).itemsize
    h, k, inter = info.hidden_size, info.top_k, info.expert_intermediate_size
    parts = {
        "weights": (total - trainable) * b + trainable * 4,
        "gradients": trainable * 4,
        "adam": 2 * trainable * 4,
        "activations": info.num_layers * seq_len * (10 * h + 3 * k * inter) * b + 2 * seq_len * vocab_size * 4,
    }
    return {"seq_len": seq_len, **{f"{n}_bytes": v for n, v in parts.items()}, "total_bytes": sum(parts.values())}
