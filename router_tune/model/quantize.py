"""Frozen weights in nf4 or int8 (bitsandbytes), routers in fp32: router training on one GPU.

    check_quantization("nf4", device)          # before any weight loads: installed, supported here?
    model, info = load_moe(path)               # as usual, then fingerprints and freezing
    summary = quantize_model(model, "nf4", device=device)

transformers' bitsandbytes integration (`BitsAndBytesConfig`) converts `nn.Linear` modules only. In
transformers 5 the experts of every supported architecture are one module per layer holding fused
3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), about 95% of a frankenMoE's
bytes, which that route leaves in bf16; peft, bitsandbytes and torchao offer nothing for them
either (checked on transformers 5.24, peft 0.21, bitsandbytes 0.50). So each expert's two
matrices become bitsandbytes `Linear4bit` (nf4, double-quantized absmax, as QLoRA) or
`Linear8bitLt` (LLM.int8) modules, and the experts' forward is an implementation registered in
transformers' `ExpertsInterface` that runs only the selected experts: bitsandbytes dequantizes
one expert's matrix at a time inside its matmul, in forward and again in backward (the gradient
reaches the input, so earlier routers train), and keeps no dequantized copy for backward.
Attention (every other `nn.Linear` of the decoder layers) is quantized the same way, the LM head
only when asked. Routers, Qwen2-MoE's shared_expert_gate, embeddings and norms stay as they are.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from router_tune.architectures import architecture_for
from router_tune.errors import RouterTuneError
from router_tune.model.routers import router_param_names

QUANT_MODES = ("none", "nf4", "int8")
MIN_BITSANDBYTES = "0.46"  # 4-bit and 8-bit forward and backward to the input run on CPU from 0.46
INSTALL_HINT = "pip install 'router-tune[quant]' (bitsandbytes>=0.46)"
EXPERTS_IMPLEMENTATION = "router_tune_quantized"  # our name in transformers' ExpertsInterface
NF4_BLOCK = 64  # elements per absmax block (bitsandbytes' default for nf4)
# Stored bytes per weight element: nf4 packs two per byte, plus one uint8 absmax per 64-element
# block (double quantization), plus one fp32 scale per 256 absmax blocks. int8: one byte, plus one
# fp32 scale per output row (counted in `stored_bytes`, not here).
BYTES_PER_ELEMENT = {"nf4": 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256), "int8": 1.0}
# Per quantized matrix, nf4 keeps its own codebooks: 16 fp32 NF4 levels, the 256-entry fp32 map of the
# nested absmax quantization and its fp32 offset (1 KiB: noise at 3B-parameter scale, not on tiny models).
BYTES_PER_MATRIX = {"nf4": 16 * 4 + 256 * 4 + 4, "int8": 0}


@dataclass
class QuantizationSummary:
    """What `quantize_model` did, for the run record, the model card and the benchmarks."""

    mode: str
    head: bool
    bitsandbytes: str
    quantized_tensors: int
    quantized_elements: int
    bytes_before: int  # the quantized tensors in their original dtype
    bytes_after: int  # the same tensors as stored by bitsandbytes (packed data + scales)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_quantization(mode: str, device: str | torch.device = "cpu") -> str | None:
    """Check that bitsandbytes is installed and runs `mode` on `device`; returns its version.

    Cheap (one 64 x 64 layer through forward and backward), so it runs before any weight loads.

    Raises:
        RouterTuneError: unknown mode, bitsandbytes missing or too old, or the platform lacks the kernel.
    """
    if mode == "none":
        return None
    if mode not in QUANT_MODES:
        raise RouterTuneError(f"`quantize` must be one of {', '.join(QUANT_MODES)}, got {mode!r}.")
    try:
        # bitsandbytes is an optional, heavy dependency (the `quant` extra): imported only when a run quantizes.
        import bitsandbytes
    except ImportError as err:
        raise RouterTuneError(
            f"quantize: {mode} needs bitsandbytes, which is not installed ({err}). Install it with "
            f"{INSTALL_HINT}, or set quantize: none."
        ) from None
    from packaging.version import Version

    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise RouterTuneError(
            f"quantize: {mode} needs bitsandbytes >= {MIN_BITSANDBYTES} (earlier versions have no CPU "
            f"backward and miss kernels); found {version}. Upgrade with {INSTALL_HINT}."
        )
    device = torch.device(device)
    try:
        layer = quantized_linear(nn.Linear(64, 64, bias=False).weight.detach(), None, mode, device, torch.float32)
        x = torch.randn(4, 64, device=device, requires_grad=True)
        layer(x).square().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("the gradient to the input is missing or not finite")
    except Exception as err:  # any failure of the kernel probe means the mode cannot run here
        raise RouterTuneError(
            f"bitsandbytes {version} cannot run {mode} on {device.type} here ({type(err).__name__}: {err}). "
            f"Try the other mode, upgrade with {INSTALL_HINT}, or set quantize: none."
        ) from None
    return version


def quantized_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, device: torch.device, compute_dtype: torch.dtype
) -> nn.Module:
    """A frozen bitsandbytes layer holding `weight` [out, in] quantized on `device`."""
    import bitsandbytes as bnb  # optional dependency, see check_quantization

    out_features, in_features = weight.shape
    data = weight.detach().contiguous()
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            data, requires_grad=False, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4", module=layer
        )
        # On CPUs with AVX512-BF16, an eval-mode forward (the before/after evaluation) would repack the
        # weight for an inference-only kernel that has no autograd, for good: later training steps would
        # then get no gradient through this layer to earlier routers, silently.
        layer.support_avx512bf16_for_cpu = False
    elif mode == "int8":
        # threshold 6.0: LLM.int8's outlier decomposition (transformers' default), which keeps quality
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    else:
        raise RouterTuneError(f"unknown quantization mode {mode!r}; use one of {', '.join(QUANT_MODES[1:])}.")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on the move to a device


def quantization_targets(model: nn.Module, head: bool) -> Iterator[tuple[str, str, torch.Size]]:
    """(module name, kind, full weight shape) of everything `quantize_model` quantizes; kind is
    "experts" (fused [E, ...] parameters) or "linear". Works on a meta-device model (planning)."""
    adapter = architecture_for(model.config)
    experts_cls = adapter.experts_class()
    routing = {n.rpartition(".")[0] for n in router_param_names(model)}
    for name, module in model.named_modules():
        if name in routing or not name:
            continue
        if isinstance(module, experts_cls):
            if getattr(module, "has_bias", False):
                raise RouterTuneError(f"{name}: experts with biases cannot be quantized by router_tune yet.")
            for pname in ("gate_up_proj", "down_proj"):
                yield f"{name}.{pname}", "experts", getattr(module, pname).shape
        elif type(module) is nn.Linear and (".layers." in f".{name}." or (head and _is_head(model, module))):
            yield name, "linear", module.weight.shape


def _is_head(model: nn.Module, module: nn.Module) -> bool:
    return module is model.get_output_embeddings()


def quantize_model(
    model: nn.Module, mode: str, *, device: str | torch.device = "cpu", head: bool = False
) -> QuantizationSummary:
    """Quantize the frozen experts and linear layers of `model` in place, layer by layer, on `device`.

    Call after `routers_to_fp32` and `freeze_all_but_routers` (parameter counts describe the real
    model). The original tensors are released as each one is converted, so the peak is the model
    as loaded plus one quantized layer. The rest (embeddings, norms, routers, an unquantized head)
    follows to `device` at the end: anything that runs the model next (the rescale probe, before the
    Trainer would move it) must find every module on the device its bitsandbytes layers compute on.
    """
    version = check_quantization(mode, device)
    device = torch.device(device)
    if head and getattr(model.config, "tie_word_embeddings", False):
        raise RouterTuneError(
            "quantize_head: the LM head is tied to the input embeddings here; quantizing it would change the "
            "embeddings too. Set quantize_head: false."
        )
    before = after = tensors = elements = 0
    for name, kind, shape in list(quantization_targets(model, head)):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        original = getattr(owner, attr)
        weight = original if kind == "experts" else original.weight
        before += weight.numel() * weight.element_size()
        if kind == "experts":  # one layer per expert, so the forward touches only the selected ones
            new = nn.ModuleList(quantized_linear(weight[e], None, mode, device, weight.dtype) for e in range(shape[0]))
            delattr(owner, attr)  # drops the fused parameter; its memory is freed with the last reference
            setattr(owner, f"quantized_{attr}", new)
        else:
            new = quantized_linear(weight, original.bias, mode, device, weight.dtype)
            setattr(owner, attr, new)
        del original, weight
        after += stored_bytes(new)
        tensors += 1
        elements += shape.numel()
    gc.collect()
    model.to(device)  # bitsandbytes layers already there stay as they are
    # transformers dispatches every experts module of the model through this one config field
    model.config._experts_implementation = EXPERTS_IMPLEMENTATION
    model.quantization_mode = mode
    return QuantizationSummary(mode, head, version, tensors, elements, before, after)


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module really holds: parameters, buffers and bitsandbytes' quantization state
    (absmax, nested scales, codebooks, int8 row scales), each storage counted once."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for m in module.modules():
        for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            add(t)
            state = getattr(t, "quant_state", None)
            while state is not None:
                for part in ("absmax", "code", "offset"):
                    add(getattr(state, part, None))
                state = getattr(state, "state2", None)
            add(getattr(t, "SCB", None))
        bnb_state = getattr(m, "state", None)  # Linear8bitLt moves its scales here after the first forward
        add(getattr(bnb_state, "SCB", None))
    return sum(seen.values())


def quantized_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' forward over quantized per-expert layers: only experts that received tokens run.

    The same arithmetic as transformers' eager experts forward (gate and up from one matrix, the
    architecture's activation, down, scaled by the routing weight, summed per token), so the
    gradient reaches the routing weights exactly as in the unquantized model. The (token, slot)
    pairs are grouped by expert with one sort, and each expert's range in it is read to the host at
    once: one host sync per layer, not one per expert (a GPU would wait on each).
    """
    num_experts, top_k = len(self.quantized_gate_up_proj), top_k_index.shape[-1]
    # stable: each expert's pairs stay in token order, so index_add_ sums in the same order as a per-expert scan
    experts, pairs = torch.sort(top_k_index.reshape(-1), stable=True)
    # an index of num_experts (one transformers' eager forward skips too) sorts past the last range, unused
    bounds = torch.searchsorted(experts, torch.arange(num_experts + 1, device=experts.device)).tolist()
    out = torch.zeros_like(hidden_states)
    for expert, (start, end) in enumerate(itertools.pairwise(bounds)):
        if start == end:
            continue
        token_idx, slot = pairs[start:end] // top_k, pairs[start:end] % top_k
        h = self._apply_gate(self.quantized_gate_up_proj[expert](hidden_states[token_idx]))
        y = self.quantized_down_proj[expert](h) * top_k_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, quantized_experts_forward)


_register()
