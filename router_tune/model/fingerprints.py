"""Expert fingerprints: a blake2b digest per expert, so a router delta is never applied to
experts it was not trained with, and identical experts (copies merged by mergekit) are found.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from router_tune.architectures import architecture_for


def expert_fingerprints(model: nn.Module) -> list[list[str]]:
    """[moe layer][expert] -> blake2b digest of the expert's weights, hashed one expert at a time."""
    adapter = architecture_for(model.config)
    num_experts, block_cls = adapter.num_experts(model.config), adapter.block_class()
    result = []
    for layer in model.get_decoder().layers:
        for block in (m for m in layer.modules() if isinstance(m, block_cls)):
            experts = block.experts
            if isinstance(experts, nn.ModuleList):  # per-expert modules (older / remote-code models)
                per_expert = [list(e.named_parameters()) for e in experts]
            else:  # fused [E, ...] parameters: one slice per expert
                fused = [(n, p) for n, p in experts.named_parameters() if p.dim() and p.shape[0] == num_experts]
                per_expert = [[(n, p[e]) for n, p in fused] for e in range(num_experts)]
            result.append([tensor_digest(params) for params in per_expert])
    return result


def tensor_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """blake2b-128 of named tensors: names, shapes, dtypes and raw bytes (equal digest = bit-identical)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().cpu().view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return h.hexdigest()


def identical_expert_groups(fingerprints: list[list[str]]) -> list[list[list[int]]]:
    """Per MoE layer, the groups (size >= 2) of experts whose weights are bit-identical."""
    out = []
    for layer in fingerprints:
        groups: dict[str, list[int]] = {}
        for e, digest in enumerate(layer):
            groups.setdefault(digest, []).append(e)
        out.append([g for g in groups.values() if len(g) > 1])
    return out
