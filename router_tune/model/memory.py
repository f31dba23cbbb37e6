"""The one estimate of router-training memory, shown by `inspect` and `train --dry-run`."""

from __future__ import annotations

import torch
from torch import nn

from router_tune.model.loading import MoeInfo
from router_tune.model.quantize import BYTES_PER_ELEMENT, BYTES_PER_MATRIX, quantization_targets

TRAIN_SEQ_LEN = 2048  # the sequence length `inspect` plans for (Raiden's context)


def training_memory(
    info: MoeInfo,
    total: int,
    trainable: int,
    vocab_size: int,
    seq_len: int = TRAIN_SEQ_LEN,
    dtype: torch.dtype | None = None,
    *,
    quantize: str = "none",
    quantize_head: bool = False,
    model: nn.Module | None = None,
    activation_checkpointing: bool = False,
) -> dict:
    """Rough peak memory of router-only training on `seq_len` tokens per micro-batch, in bytes.

    weights     = (total - R - Q) * b + Q * q + rows * 4 + M * c + R * 4
        frozen weights in their dtype, the Q quantized elements (`quantize`: experts, attention, the head
        with `quantize_head`; counted on `model`, which may live on the meta device) at q bytes each
        (nf4 ~0.516 with its double-quantized scales, int8 1 plus an fp32 scale per row), routers as
        fp32 masters; c = nf4's codebooks per matrix (M matrices). b = bytes per element of `dtype` (default
        the model's), R = router params.
    gradients   = R * 4                          only routers get gradients
    adam        = 2 * R * 4                      exp_avg and exp_avg_sq, fp32
    activations = L * T * (10*H + 3*k*I) * b + 2 * T * V * 4
        every layer's activations are kept because the gradient of the first router flows back
        through all later layers (~10 hidden-size tensors for attention, norms and residuals,
        3 intermediate-size tensors per selected expert; memory-efficient attention assumed), plus
        fp32 logits and their softmax for the loss. With `activation_checkpointing` only each layer's
        input is kept (L * T * H * b) and one layer's activations are rebuilt at a time in backward.
    dequant     = 2 * M * b                      quantized only: bitsandbytes dequantizes one matrix
        at a time (M = the largest one, e.g. one expert's gate_up [2I, H]) in forward and in backward.
    """
    b = (dtype or info.dtype).itemsize
    h, k, inter, layers = info.hidden_size, info.top_k, info.expert_intermediate_size, info.num_layers
    quantized = rows = matrices = largest = 0
    if quantize != "none":
        if model is None:
            raise ValueError("training_memory needs `model` (meta device is enough) to plan quantized weights")
        for _, kind, shape in quantization_targets(model, quantize_head):
            quantized += shape.numel()
            rows += shape[:-1].numel() if quantize == "int8" else 0
            matrices += shape[0] if kind == "experts" else 1
            largest = max(largest, shape[-2:].numel())
    per_layer = seq_len * (10 * h + 3 * k * inter) * b
    kept = layers * seq_len * h * b + per_layer if activation_checkpointing else layers * per_layer
    parts = {
        "weights": (total - trainable - quantized) * b
        + int(quantized * BYTES_PER_ELEMENT.get(quantize, 0) + rows * 4 + matrices * BYTES_PER_MATRIX.get(quantize, 0))
        + trainable * 4,
        "gradients": trainable * 4,
        "adam": 2 * trainable * 4,
        "activations": kept + 2 * seq_len * vocab_size * 4,
        "dequant": 2 * largest * b,
    }
    return {
        "seq_len": seq_len,
        "quantize": quantize,
        "quantized_elements": quantized,
        "activation_checkpointing": activation_checkpointing,
        **{f"{n}_bytes": v for n, v in parts.items()},
        "total_bytes": sum(parts.values()),
    }
