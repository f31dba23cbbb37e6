"""MoE models in memory: load, find the routers, freeze the rest, route in fp32, fingerprint experts.

    model, info = load_moe("path/or/hub-id")     # routers already compute in fp32
    counts = freeze_all_but_routers(model)       # only router tensors keep requires_grad

One small adapter per supported architecture says which classes are its routers and MoE
blocks and which layers are sparse; everything else is architecture-independent. Routers
are found by module class and weight shape, never by name: "gate" also matches
`gate_proj` / `gate_up_proj`.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from router_tune.checkpoint import Layout, detect_layout, resolve_checkpoint
from router_tune.errors import RouterTuneError


class MoeAdapter:
    """What router_tune needs to know about one MoE architecture of transformers 5."""

    architecture: str
    model_type: str
    module_path: str  # transformers.models.<x>.modeling_<x>
    router_class_name: str
    block_class_name: str

    def _cls(self, name: str) -> type:
        import importlib
        return getattr(importlib.import_module(self.module_path), name)

    def router_class(self) -> type:
        return self._cls(self.router_class_name)

    def block_class(self) -> type:
        return self._cls(self.block_class_name)

    def num_experts(self, config) -> int:
        return config.num_experts

    def moe_layers(self, config) -> list[int]:
        """Qwen makes layer i sparse when (i+1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
        step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or [])
        return [i for i in range(config.num_hidden_layers) if (i + 1) % step == 0 and i not in dense]

    def expert_intermediate_size(self, config) -> int:
        return config.moe_intermediate_size

    def normalizes_topk(self, config) -> bool:
        return bool(config.norm_topk_prob)

    def extra_routing_modules(self, block: nn.Module, hidden: int) -> dict[str, nn.Module]:
        """Routing parameters beside the top-k router (Qwen2-MoE's shared-expert gate)."""
        return {}


class MixtralAdapter(MoeAdapter):
    architecture, model_type = "mixtral", "mixtral"
    module_path = "transformers.models.mixtral.modeling_mixtral"
    router_class_name, block_class_name = "MixtralTopKRouter", "MixtralSparseMoeBlock"

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def moe_layers(self, config) -> list[int]:
        return list(range(config.num_hidden_layers))

    def expert_intermediate_size(self, config) -> int:
        return config.intermediate_size

    def normalizes_topk(self, config) -> bool:
        return True  # MixtralTopKRouter always divides the top-k probabilities by their sum


class Qwen2MoeAdapter(MoeAdapter):
    architecture, model_type = "qwen2_moe", "qwen2_moe"
    module_path = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    router_class_name, block_class_name = "Qwen2MoeTopKRouter", "Qwen2MoeSparseMoeBlock"

    def extra_routing_modules(self, block: nn.Module, hidden: int) -> dict[str, nn.Module]:
        # nn.Linear(H, 1) feeding a sigmoid that scales the shared expert: a routing parameter too.
        return {name: m for name, m in block.named_children()
                if isinstance(m, nn.Linear) and tuple(m.weight.shape) == (1, hidden)}


class Qwen3MoeAdapter(MoeAdapter):
    architecture, model_type = "qwen3_moe", "qwen3_moe"
    module_path = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    router_class_name, block_class_name = "Qwen3MoeTopKRouter", "Qwen3MoeSparseMoeBlock"


ADAPTERS: dict[str, MoeAdapter] = {a.model_type: a for a in (MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter())}
SUPPORTED = "Mixtral, Qwen2-MoE, Qwen3-MoE"


def adapter_for(config) -> MoeAdapter:
    """The adapter of a config, or a RouterTuneError saying why this model is not supported."""
    if config.model_type in ADAPTERS:
        return ADAPTERS[config.model_type]
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    if any(("expert" in k or k.startswith("moe_")) and v for k, v in config.to_dict().items()):
        raise RouterTuneError(f"{arch} (model_type {config.model_type!r}) is a MoE architecture router_tune does not "
                              f"support yet; supported: {SUPPORTED}. Convert the model, or open an issue.")
    raise RouterTuneError(f"this is a dense {arch}; router_tune needs a MoE checkpoint: {SUPPORTED}. "
                          "Build one from dense fine-tunes with mergekit-moe first.")


@dataclass
class RouterRef:
    """The routing parameters of one MoE layer: `module` is the top-k router, `param_names`
    also lists extra routing parameters of the layer (Qwen2-MoE's shared_expert_gate)."""
    layer: int
    module_name: str
    module: nn.Module
    param_names: tuple[str, ...]


@dataclass
class MoeInfo:
    architecture: str           # adapter name: mixtral | qwen2_moe | qwen3_moe
    model_class: str            # e.g. MixtralForCausalLM
    layout: Layout | None       # on-disk layout of the source checkpoint, None when unknown
    num_layers: int
    moe_layers: list[int]
    num_experts: int
    top_k: int
    normalizes_topk: bool       # top-k weights renormalised to sum to 1
    dtype: torch.dtype          # dtype of the non-router weights
    hidden_size: int
    expert_intermediate_size: int
    routers: list[RouterRef] = field(repr=False)
    source: str | None = None


class ParamCounts(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def load_moe(path_or_hub_id: str | Path, dtype="auto", device_map=None, *, allow_pickle: bool = False,
             trust_remote_code: bool = False, fp32_routers: bool = True) -> tuple[nn.Module, MoeInfo]:
    """Load a MoE causal LM after checking the checkpoint (see `resolve_checkpoint`).

    The architecture is checked from config.json before any weight is read, so a dense or
    unsupported model fails in a second. Nothing is frozen here: call `freeze_all_but_routers`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_checkpoint(path_or_hub_id, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    adapter_for(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                 trust_remote_code=trust_remote_code)
    info = describe_moe(model, layout=detect_layout(path), source=str(path_or_hub_id))
    if fp32_routers:
        routers_to_fp32(model)
    return model, info


def describe_moe(model: nn.Module, *, layout: Layout | None = None, source: str | None = None) -> MoeInfo:
    """Describe an already-loaded model; the layout is read from its directory when not given."""
    config, adapter = model.config, adapter_for(model.config)
    path = source or getattr(config, "_name_or_path", None)
    if layout is None and path and Path(path, "config.json").is_file():
        layout = detect_layout(path)
    routers = find_routers(model)
    router_params = {n for r in routers for n in r.param_names}
    frozen = [p for n, p in model.named_parameters() if n not in router_params]
    return MoeInfo(architecture=adapter.architecture, model_class=type(model).__name__, layout=layout,
                   num_layers=config.num_hidden_layers, moe_layers=[r.layer for r in routers],
                   num_experts=adapter.num_experts(config), top_k=config.num_experts_per_tok,
                   normalizes_topk=adapter.normalizes_topk(config), dtype=frozen[0].dtype,
                   hidden_size=config.hidden_size, expert_intermediate_size=adapter.expert_intermediate_size(config),
                   routers=routers, source=path or None)


def find_routers(model: nn.Module) -> list[RouterRef]:
    """One RouterRef per MoE layer, found by class and [E, H] weight shape; the count must match the config."""
    config, adapter = model.config, adapter_for(model.config)
    router_cls, hidden = adapter.router_class(), config.hidden_size
    shape = (adapter.num_experts(config), hidden)
    prefix = _layers_prefix(model)
    refs, matched = [], []
    for idx, layer in enumerate(model.get_decoder().layers):
        for name, module in layer.named_modules():
            if not isinstance(module, router_cls):
                continue
            full = f"{prefix}.{idx}.{name}"
            matched.append(f"{full} {tuple(module.weight.shape)}")
            if tuple(module.weight.shape) != shape:
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
            "(num_experts / hidden_size / decoder_sparse_step); fix the config or re-create the merge.")
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
        total += p.numel()
        trainable += p.numel() if name in names else 0
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
                with _no_autocast(x):  # under bf16 mixed precision, autocast would run the linear in bf16
                    return cls.forward(self, x)
        _FP32_CLASSES[cls] = type(f"Fp32{cls.__name__}", (cls,), {"forward": forward, "fp32_router": True})
    return _FP32_CLASSES[cls]


def routers_to_fp32(model: nn.Module, jitter: float = 0.0) -> None:
    """Routing parameters become fp32 master weights and router logits are computed in fp32.

    bf16 logits flatten small routing differences (PITFALLS: autocast does not fix it). The
    experts accept fp32 routing weights with bf16 hidden states: they cast when accumulating.
    `jitter` multiplies the router input by U(1-j, 1+j) in training mode (Switch-style).
    """
    for ref in find_routers(model):
        for name in ref.param_names:
            module = model.get_submodule(name.rpartition(".")[0])
            if not getattr(module, "fp32_router", False):
                module.__class__ = _fp32_subclass(type(module))
            module.weight.data = module.weight.data.float()
        ref.module.router_jitter = float(jitter)


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Routing parameters under their in-memory names, fp32 on CPU (what routers.safetensors holds)."""
    return {n: model.get_parameter(n).detach().float().cpu().clone() for n in router_param_names(model)}


def load_router_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy router tensors into the model after checking that names and shapes match exactly."""
    expected = {n: tuple(model.get_parameter(n).shape) for n in router_param_names(model)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{n} {tuple(t.shape)} (model: {expected[n]})" for n, t in tensors.items()
             if n in expected and tuple(t.shape) != expected[n]]
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                            for label, items in (("missing", missing), ("unexpected", unexpected),
                                                 ("wrong shape", wrong)) if items)
        raise RouterTuneError(f"these router tensors do not fit this {type(model).__name__} ({details}). "
                              "They were trained on a different model: load them into the model they came from.")
    with torch.no_grad():
        for n, t in tensors.items():
            p = model.get_parameter(n)
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def expert_fingerprints(model: nn.Module) -> list[list[str]]:
    """[moe layer][expert] -> blake2b digest of the expert's weights, hashed one expert at a time."""
    adapter = adapter_for(model.config)
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
            result.append([_digest(params) for params in per_expert])
    return result


def _digest(named: list[tuple[str, torch.Tensor]]) -> str:
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
    from router_tune.lm_loss import lm_head_as_identity

    was_training = model.training
    model.eval()
    try:
        with lm_head_as_identity(model):
            out = model(**inputs, output_router_logits=True, use_cache=False)
    finally:
        model.train(was_training)
    return [logits.float() for logits in out.router_logits]
