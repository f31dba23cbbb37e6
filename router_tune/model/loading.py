"""Load a MoE checkpoint and describe it: the one entry point from files to a model in memory.

model, info = load_moe("path/or/hub-id")     # routers already compute in fp32
counts = freeze_all_but_routers(model)       # only router tensors keep requires_grad
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from router_tune.architectures import Layout, architecture_for
from router_tune.architectures.on_disk import detect_layout
from router_tune.io.checkpoint import resolve_checkpoint
from router_tune.model.routers import RouterRef, find_routers, routers_to_fp32

# Recipe / run names of weight dtypes ("auto" = as stored).
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class MoeInfo:
    architecture: str  # model_type of a registered architecture: mixtral | qwen2_moe | ...
    model_class: str  # e.g. MixtralForCausalLM
    layout: Layout | None  # on-disk layout of the source checkpoint, None when unknown
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    normalizes_topk: bool  # top-k weights renormalised to sum to 1
    dtype: torch.dtype  # dtype of the non-router weights
    hidden_size: int
    expert_intermediate_size: int
    routers: list[RouterRef] = field(repr=False)
    source: str | None = None


def load_moe(
    path_or_hub_id: str | Path,
    dtype="auto",
    device_map=None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    fp32_routers: bool = True,
    **from_pretrained_kwargs,
) -> tuple[nn.Module, MoeInfo]:
    """Load a MoE causal LM after checking the checkpoint (see `resolve_checkpoint`).

    The architecture is checked from config.json before any weight is read, so a dense or
    unsupported model fails in a second. Nothing is frozen here: call `freeze_all_but_routers`.
    `from_pretrained_kwargs` go to `from_pretrained` (e.g. `distributed_config` for FSDP2).
    """
    path = resolve_checkpoint(path_or_hub_id, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    architecture_for(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
    )
    info = describe_moe(model, layout=detect_layout(path), source=str(path_or_hub_id))
    if fp32_routers:
        routers_to_fp32(model)
    return model, info


def describe_moe(model: nn.Module, *, layout: Layout | None = None, source: str | None = None) -> MoeInfo:
    """Describe an already-loaded model; the layout is read from its directory when not given."""
    config, adapter = model.config, architecture_for(model.config)
    path = source or getattr(config, "_name_or_path", None)
    if layout is None and path and Path(path, "config.json").is_file():
        layout = detect_layout(path)
    routers = find_routers(model)
    router_params = {n for r in routers for n in r.param_names}
    frozen = [p for n, p in model.named_parameters() if n not in router_params]
    return MoeInfo(
        architecture=adapter.model_type,
        model_class=type(model).__name__,
        layout=layout,
        num_layers=config.num_hidden_layers,
        moe_layers=[r.layer for r in routers],
        num_experts=adapter.num_experts(config),
        top_k=config.num_experts_per_tok,
        normalizes_topk=adapter.normalizes_topk(config),
        dtype=frozen[0].dtype,
        hidden_size=config.hidden_size,
        expert_intermediate_size=adapter.expert_intermediate_size(config),
        routers=routers,
        source=path or None,
    )
