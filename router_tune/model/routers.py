"""The routers of a MoE model in memory: find them, freeze everything else, route in fp32,
copy them in and out, capture their logits.

Routers are found by module class and weight shape, never by name: "gate" also matches
`gate_proj` / `gate_up_proj`. The architecture (router class, sparse layers, extra routing
modules) comes from `router_tune.architectures`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from router_tune.architectures import architecture_for
from router_tune.architectures.base import full_shape
from router_tune.errors import RouterTuneError

logger = logging.getLogger(__name__)


@dataclass
class RouterRef:
    """The routing parameters of one MoE layer: `module` is the top-k router, `param_names`
    also lists extra routing parameters of the layer (Qwen2-MoE's shared_expert_gate)."""

    layer: int
    module_name: str
    module: nn.Module
    param_names: tuple[str, ...]


class ParamCounts(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def find_routers(model: nn.Module) -> list[RouterRef]:
    """One RouterRef per MoE layer, found by class and [E, H] weight shape; the count must match the config."""
    config, adapter = model.config, architecture_for(model.config)
    router_cls, hidden = adapter.router_class(), config.hidden_size
    shape = (adapter.num_experts(config), hidden)
    prefix = _layers_prefix(model)
    refs, matched = [], []
    for idx, layer in enumerate(model.get_decoder().layers):
        for name, module in layer.named_modules():
            if not isinstance(module, router_cls):
                continue
            full = f"{prefix}.{idx}.{name}"
            matched.append(f"{full} {full_shape(module.weight)}")
            if full_shape(module.weight) != shape:
                continue
            block = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            extras = adapter.extra_routing_modules(block, hidden)
            block_name = full.rpartition(".")[0]
            params = (f"{full}.weight",) + tuple(f"{block_name}.{n}.weight" for n in extras)
            refs.append(RouterRef(layer=idx, module_name=full, module=module, param_names=params))
    expected = adapter.moe_layers(config)
    if [r.layer for r in refs] != expected:
        raise RouterTuneError(
            f"expected one {adapter.router_class_name} of shape {shape} in each MoE layer {expected} of this "
            f"{type(model).__name__}, found: {matched or 'none'}. The checkpoint does not match its config.json "
            "(num_experts / hidden_size / decoder_sparse_step); fix the config or re-create the merge."
        )
    return refs


def _layers_prefix(model: nn.Module) -> str:
    layers = model.get_decoder().layers
    return next(name for name, m in model.named_modules() if m is layers)


def router_param_names(model: nn.Module) -> list[str]:
    return [n for r in find_routers(model) for n in r.param_names]


def freeze_all_but_routers(model: nn.Module) -> ParamCounts:
    """requires_grad only on routing parameters; returns element counts (tied weights counted once)."""
    names = set(router_param_names(model))
    trainable = total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        numel = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partition is empty locally
        total += numel
        trainable += numel if name in names else 0
    return ParamCounts(trainable, total)


_FP32_CLASSES: dict[type, type] = {}


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _fp32_subclass(cls: type) -> type:
    """A subclass of the original router class (the logits recorder matches by isinstance)."""
    if cls not in _FP32_CLASSES:
        if issubclass(cls, nn.Linear):

            def forward(self, x):  # shared-expert gate: fp32 product, caller keeps its dtype
                with _no_autocast(x):
                    return nn.functional.linear(x.float(), self.weight.float()).to(x.dtype)
        else:

            def forward(self, hidden_states):
                x = hidden_states.float()
                if self.training and self.router_jitter > 0:  # exploration noise on the router input only
                    x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
                # under bf16 mixed precision, autocast would run the linear in bf16
                with _no_autocast(x), _fp32_weight(self):
                    bias = getattr(self, "selection_bias", None)
                    if bias is None or not self.training:
                        return cls.forward(self, x)
                    return _biased_selection(self, x, bias)

        _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": forward, "fp32_router": True})
    return _FP32_CLASSES[cls]


def _biased_selection(router: nn.Module, x: torch.Tensor, bias: torch.Tensor):
    """The top-k router's forward (transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE routers compute
    exactly this) with the experts chosen by top-k of `logits + bias` instead of the softmax: the bias
    moves which experts a token goes to, never how much each counts. The mixing weights are the unbiased
    softmax probabilities of the chosen experts, renormalised when the architecture renormalises."""
    logits = nn.functional.linear(x.reshape(-1, router.weight.shape[-1]), router.weight)
    probs = torch.softmax(logits.float(), dim=-1)
    indices = torch.topk(logits.float() + bias, router.top_k, dim=-1).indices
    weights = probs.gather(-1, indices)
    if router.selection_normalizes:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), indices


def set_selection_bias(model: nn.Module, bias: torch.Tensor | None) -> None:
    """Route training forwards with a per-expert bias [L, E] (one row per MoE layer) added to the router
    logits to choose the top-k only (loss-free balancing, training/loss_free.py); None removes it.

    Each router keeps a view of its row, so updating `bias` in place takes effect at the next forward. The
    bias is not a parameter or buffer: no state dict, checkpoint, DDP broadcast or export sees it, and
    eval-mode forwards ignore it. Needs `routers_to_fp32` first (its forward reads the bias)."""
    refs = find_routers(model)
    normalizes = architecture_for(model.config).normalizes_topk(model.config)
    if bias is not None and tuple(bias.shape) != (len(refs), full_shape(refs[0].module.weight)[0]):
        raise ValueError(f"selection bias of shape {list(bias.shape)} for {len(refs)} routers of this model")
    for i, ref in enumerate(refs):
        if not getattr(ref.module, "fp32_router", False):
            raise RuntimeError("set_selection_bias needs routers_to_fp32(model) first")
        ref.module.selection_bias = None if bias is None else bias[i]
        ref.module.selection_normalizes = normalizes


@contextlib.contextmanager
def _fp32_weight(module: nn.Module) -> Iterator[None]:
    """`module.weight` reads as fp32 inside the block, differentiably (the gradient flows to the real
    parameter). FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)` and DeepSpeed bf16 hand the router
    a bf16 weight for the forward: an fp32 input against it is a dtype error in `F.linear`. The
    parameter is swapped in `_parameters` for the call only, so no hook fires twice."""
    weight = module._parameters["weight"]
    if weight is None or weight.dtype == torch.float32:
        yield
        return
    module._parameters["weight"] = weight.float()
    try:
        yield
    finally:
        module._parameters["weight"] = weight


def routers_to_fp32(model: nn.Module, jitter: float = 0.0) -> None:
    """Routing parameters become fp32 master weights and router logits are computed in fp32.

    bf16 logits flatten small routing differences, and autocast alone does not prevent them. The
    experts accept fp32 routing weights with bf16 hidden states: they cast when accumulating.
    `jitter` multiplies the router input by U(1-j, 1+j) in training mode (Switch-style).
    """
    for ref in find_routers(model):
        for name in ref.param_names:
            module = model.get_submodule(name.rpartition(".")[0])
            if not getattr(module, "fp32_router", False):
                module.__class__ = _fp32_subclass(type(module))
            if hasattr(module.weight, "ds_id"):
                # ZeRO-3 owns the storage: the module's weight keeps the dtype it was loaded in (DeepSpeed's
                # bf16 mode holds fp32 master partitions in its optimizer), the forward computes in fp32.
                if module.weight.dtype != torch.float32:
                    logger.warning("%s: ZeRO-3 %s module weight kept (not fp32)", name, module.weight.dtype)
                continue
            if is_sharded(module.weight):
                # FSDP2 (sharded at load): the module's cast swaps in an fp32 DTensor shard, so the master weight
                # and its Adam state are fp32 beside bf16 frozen weights in the same fully_shard unit (torch 2.13
                # accepts mixed dtypes there; a bf16 MixedPrecisionPolicy still all-gathers it in bf16)
                module.float()
                continue
            module.weight.data = module.weight.data.float()
        ref.module.router_jitter = float(jitter)


@contextlib.contextmanager
def deployed_routers(model: nn.Module, stored_dtype: torch.dtype | None = None) -> Iterator[None]:
    """Run the routers as an exported checkpoint does: weights rounded to the dtype the checkpoint
    stores them in (`stored_dtype`, default: the dtype of the model's other weights; export writes the
    routers in the source's dtype) and the architecture's own forward (its logits in the compute dtype,
    no fp32 upcast). Restores the fp32 master weights and forward afterwards. A no-op for fp32 models.

    A bf16 checkpoint computed in fp32 (model_dtype auto on a CPU without native bf16) passes
    stored_dtype=bfloat16: its routers are rounded to bf16 as exported, then computed in fp32."""
    names = set(router_param_names(model))
    compute = next(p.dtype for n, p in model.named_parameters() if n not in names)
    stored = stored_dtype or compute
    saved = []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        saved.append((module, module.__class__, module.weight.data))
        if getattr(module, "fp32_router", False):
            module.__class__ = module.__class__.__mro__[1]  # the architecture's own class
        module.weight.data = module.weight.data.to(stored).to(compute)
    try:
        yield
    finally:
        for module, cls, weight in saved:
            module.__class__, module.weight.data = cls, weight


def is_sharded(param: torch.Tensor) -> bool:
    """A DTensor (FSDP2) or a ZeRO-3 partitioned parameter."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) or hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """ZeRO-3 partitioned parameters whole for the block (only these: a few [E, H] routers or [H]
    norms), else nothing to do. All ranks must enter together."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def router_input_norm_weight(model: nn.Module, layer: int) -> torch.Tensor | None:
    """The RMSNorm weight g applied to the hidden state a layer's router reads (fp32, CPU, whole), or
    None when the decoder layer has no `post_attention_layernorm`. Every rank must call it when the
    weights are sharded (a DTensor is all-gathered, a ZeRO-3 partition gathered)."""
    norm = getattr(getattr(model.get_decoder().layers[layer], "post_attention_layernorm", None), "weight", None)
    if norm is None:
        return None
    with gathered([norm]):
        t = norm.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        return t.float().cpu().clone()


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Routing parameters under their in-memory names, fp32 on CPU (what routers.safetensors holds).

    On sharded parameters every rank must call it: DTensors are all-gathered with `full_tensor()`
    and ZeRO-3 partitions gathered, for the router parameters only (never the whole model). Once
    DeepSpeed's optimizer holds them, ZeRO-3 routers are read from its fp32 master partitions
    (`safe_get_full_fp32_param`): under bf16 the module's own copy is rounded to bf16."""
    names = router_param_names(model)
    params = [model.get_parameter(n) for n in names]
    out = {}
    if any(hasattr(p, "_z3_optimizer") for p in params):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().cpu().clone() for n, p in zip(names, params)}
    with gathered(params):
        for n, p in zip(names, params):
            t = p.detach()
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[n] = t.float().cpu().clone()
    return out


def load_router_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy router tensors into the model after checking that names and shapes match exactly.

    Sharded parameters (every rank calls it with the same tensors): a DTensor gets the matching
    shard of the tensor (`distribute_tensor` on its own mesh and placements); ZeRO-3 partitions are
    gathered, written on rank 0 and re-partitioned from there, and DeepSpeed's fp32 master partitions
    (once its optimizer holds the routers) are written too, else the next step would undo the copy."""
    expected = {n: full_shape(model.get_parameter(n)) for n in router_param_names(model)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [
        f"{n} {tuple(t.shape)} (model: {expected[n]})"
        for n, t in tensors.items()
        if n in expected and tuple(t.shape) != expected[n]
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise RouterTuneError(
            f"these router tensors do not fit this {type(model).__name__} ({details}). "
            "They were trained on a different model: load them into the model they came from."
        )
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = {n: model.get_parameter(n) for n in tensors}
    with torch.no_grad(), gathered(list(params.values()), modifier_rank=0):
        for n, t in tensors.items():
            p = params[n]
            if isinstance(p, DTensor):
                local = t.to(device=p.to_local().device, dtype=p.dtype)
                p.copy_(distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None))
            else:
                p.copy_(t.to(device=p.device, dtype=p.dtype))
    masters = {n: p for n, p in params.items() if hasattr(p, "_z3_optimizer")}
    if masters:
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in masters.items():
            safe_set_full_fp32_param(p, tensors[n].to(torch.float32))


class RouterLogitsCapture:
    """Collects every router's logits during one forward pass, in layer order.

    What `output_router_logits=True` returns, without the model also computing its own
    load-balancing loss from them (transformers does whenever that flag is set, and the
    trainer computes its own). Hooks only record inside `with capture() as logits:`, so the
    forward re-run by activation checkpointing during backward adds nothing.
    """

    def __init__(self, model: nn.Module):
        self._logits: list[torch.Tensor] = []
        self._active = False
        self._handles = [ref.module.register_forward_hook(self._record) for ref in find_routers(model)]

    def _record(self, module, args, output) -> None:
        if self._active:
            self._logits.append(output[0])

    @contextlib.contextmanager
    def __call__(self):
        self._logits, self._active = [], True
        try:
            yield self._logits
        finally:
            self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def router_logits_on(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every MoE layer's router logits (fp32) for one eval-mode forward of `inputs`, the model's
    training flag restored. The LM head is skipped: its [tokens, vocab] logits are not needed."""
    was_training = model.training
    model.eval()
    try:
        with lm_head_as_identity(model):
            out = model(**inputs, output_router_logits=True, use_cache=False)
    finally:
        model.train(was_training)
    return [logits.float() for logits in out.router_logits]


@contextlib.contextmanager
def lm_head_as_identity(model: nn.Module) -> Iterator[nn.Linear]:
    """Make `model(...)` return final hidden states as `logits`, yielding the real head.

    The forward still goes through the (possibly DDP-wrapped) model, so data-parallel
    gradient hooks on the routers fire as usual; only the frozen head is skipped.
    """
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)
