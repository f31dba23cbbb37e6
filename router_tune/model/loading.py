"""Load a MoE checkpoint and describe it: the one entry point from files to a model in memory.

model, info = load_moe("path/or/hub-id")     # routers already compute in fp32
counts = freeze_all_but_routers(model)       # only router tensors keep requires_grad
"""

from __future__ import annotations

import functools
import time
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


# A CPU whose half-precision matmul is this many times slower than fp32 has no native kernel for it
# (emulated: ~10-45x on AVX2 here; ~1x or faster with AVX512-BF16 / AMX).
SLOW_HALF_MATMUL = 2.5


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs `dtype` matmuls natively on this CPU (x86 AVX512-BF16 / AMX / AVX512-FP16,
    Arm BF16 extensions). False means emulated: every half-precision GEMM, the MoE experts' grouped
    matmuls included, falls back to a scalar kernel (a 4-expert SmolLM2 merge: over 5 minutes for
    one training step that takes seconds in fp32)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, probe)()) if probe else True
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: only the timing decides
        return True


@functools.cache
def cpu_matmul_slowdown(dtype: torch.dtype) -> float:
    """How many times slower a 256 x 256 matmul runs in `dtype` than in fp32 on this CPU (best of 5,
    each dtype warmed up first: a cold first call, e.g. the thread pool starting, made the ratio read
    2x instead of 75x on an AVX2 CPU and kept a bf16 model in emulated bf16).

    Measured as well as read from oneDNN's flags (`native_half_matmul`): a CPU with a native kernel
    may still be slower in half precision. About 0.1 s, once."""

    def best(dt: torch.dtype) -> float:
        a, b = torch.ones(256, 256, dtype=dt), torch.ones(256, 256, dtype=dt)
        a @ b  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / max(best(torch.float32), 1e-9)


def compute_dtype(requested: str, stored: torch.dtype | None, device) -> tuple[torch.dtype | str, str | None]:
    """The dtype to load the frozen weights in for `model_dtype: requested`, and a note when it is not
    the stored one.

    An explicit dtype is obeyed. `auto` keeps the stored dtype, except for a bf16 / fp16 checkpoint on a
    CPU without a native kernel for it, which computes in fp32: emulated half-precision matmuls made a
    214M-parameter merge train 11x slower on an AVX2 CPU. The stored file is unchanged; exports splice
    routers in the stored dtype.
    """
    if requested != "auto":
        return TORCH_DTYPES[requested], None
    if stored in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu":
        name = str(stored).removeprefix("torch.")
        keep = f"Set model_dtype: {name} to keep {name}."
        if not native_half_matmul(stored):
            return torch.float32, (
                f"{name} checkpoint computed in float32 on this CPU: it has no native {name} matmul "
                f"(oneDNN emulates it). {keep}"
            )
        slowdown = cpu_matmul_slowdown(stored)
        if slowdown > SLOW_HALF_MATMUL:
            return torch.float32, (
                f"{name} checkpoint computed in float32 on this CPU: its {name} matmul is {slowdown:.0f}x slower "
                f"than float32 (measured). {keep}"
            )
    return "auto", None


def stored_dtype(model_config) -> torch.dtype | None:
    """The weights dtype a checkpoint's config.json records (`dtype`, formerly `torch_dtype`)."""
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = TORCH_DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else None


def hub_kernels(enabled: bool = False) -> dict:
    """`from_pretrained` arguments that switch transformers' hub kernels on or off on purpose.

    transformers >= 5.25 turns hub kernels on in every load when the `kernels` package imports:
    they replace layers (the MoE experts' forward among them) with code downloaded from the hub,
    under the routers we train, the ZeRO-3 saved-views hook and the quantized experts, and
    `kernelize` refuses the meta device that export verification loads on. router_tune loads with
    them off unless a recipe asks (`use_hub_kernels: true`). The environment's USE_HUB_KERNELS=0
    still wins over a request (transformers' rule).
    """
    return {"use_kernels": bool(enabled)}


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
    dtype: torch.dtype  # dtype of the non-router weights, as loaded
    hidden_size: int
    expert_intermediate_size: int
    routers: list[RouterRef] = field(repr=False)
    source: str | None = None
    stored_dtype: torch.dtype | None = None  # what config.json records for the files
    dtype_note: str | None = None  # why `dtype` differs from the stored one (see compute_dtype)


def load_moe(
    path_or_hub_id: str | Path,
    dtype="auto",
    device_map=None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    fp32_routers: bool = True,
    use_hub_kernels: bool = False,
    compute_device=None,
    **from_pretrained_kwargs,
) -> tuple[nn.Module, MoeInfo]:
    """Load a MoE causal LM after checking the checkpoint (see `resolve_checkpoint`).

    The architecture is checked from config.json before any weight is read, so a dense or
    unsupported model fails in a second. Nothing is frozen here: call `freeze_all_but_routers`.
    `dtype` is a torch dtype, a recipe name (bfloat16, float16, float32) or "auto"; with `compute_device`
    (where the model will compute), "auto" follows `compute_dtype`, else it keeps the stored dtype.
    `from_pretrained_kwargs` go to `from_pretrained` (e.g. `distributed_config` for FSDP2). Hub kernels
    stay off unless `use_hub_kernels` (see `hub_kernels`).
    """
    path = resolve_checkpoint(path_or_hub_id, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architecture_for(model_config)
    stored, note = stored_dtype(model_config), None
    if isinstance(dtype, str) and compute_device is not None:
        dtype, note = compute_dtype(dtype, stored, compute_device)
    elif isinstance(dtype, str) and dtype != "auto":
        dtype = TORCH_DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        **hub_kernels(use_hub_kernels),
        **from_pretrained_kwargs,
    )
    info = describe_moe(model, layout=detect_layout(path), source=str(path_or_hub_id))
    info.stored_dtype, info.dtype_note = stored, note
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
