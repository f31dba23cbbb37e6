"""What router_tune needs to know about one MoE architecture: the interface every module here implements.

An architecture module (mixtral.py, qwen2_moe.py, ...) subclasses `MoeArchitecture`, fills in
its class attributes and overrides the few methods where its config differs; the registry in
`__init__.py` lists it. Everything else in the package is architecture-independent and asks
this interface:
- in memory: the router, MoE-block and decoder-layer classes (routers are found by class and
  [E, H] shape, never by the name "gate", which also matches `gate_proj`), which layers are
  sparse, how many experts, whether top-k weights are renormalised, extra routing modules;
- on disk: the names of the legacy per-expert tensors, so export can convert layouts;
- for sharded training: the classes FSDP2 wraps as units and DeepSpeed ZeRO-3 treats as leaves.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import AutoConfig

from router_tune.errors import RouterTuneError

Layout = Literal["legacy", "fused"]
LAYOUTS: tuple[Layout, ...] = ("legacy", "fused")


# Config keys a dense model of the same family shares with the MoE (attention, norms, embeddings).
DENSE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
)


def full_shape(param) -> tuple[int, ...]:
    """A parameter's whole shape: a ZeRO-3 partitioned parameter is [0] locally and keeps its shape
    in `ds_shape`; a DTensor's `.shape` is already the global one."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


@dataclass(frozen=True)
class LegacyNaming:
    """How an architecture names its per-expert tensors in the legacy on-disk layout:
    `{layer}.{block}.experts.{e}.{gate|up|down}.weight`, the router `{layer}.{block}.gate.weight`."""

    block: str  # module name of the MoE block on disk (Mixtral: block_sparse_moe; transformers 5: mlp)
    gate: str  # the three projections of one expert: gate (Mixtral w1), up (w3), down (w2)
    up: str
    down: str


class MoeArchitecture:
    """One MoE architecture of transformers 5 (subclass it; see mixtral.py for a complete example)."""

    model_type: str  # config.model_type, the registry key
    display_name: str  # for messages: "Mixtral", "Qwen2-MoE"
    module_path: str  # transformers.models.<x>.modeling_<x>
    router_class_name: str  # the top-k router module (holds `weight` [E, H])
    block_class_name: str  # the sparse MoE block (router + experts)
    # the experts of one block: fused 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], forward
    # dispatched through transformers' ExpertsInterface (what quantized training replaces)
    experts_class_name: str
    decoder_layer_class_name: str
    legacy_naming: LegacyNaming

    def _cls(self, name: str) -> type:
        return getattr(importlib.import_module(self.module_path), name)

    def router_class(self) -> type:
        return self._cls(self.router_class_name)

    def block_class(self) -> type:
        return self._cls(self.block_class_name)

    def experts_class(self) -> type:
        return self._cls(self.experts_class_name)

    def decoder_layer_class(self) -> type:
        return self._cls(self.decoder_layer_class_name)

    def num_experts(self, config) -> int:
        return config.num_experts

    def moe_layers(self, config) -> list[int]:
        """Indices of the decoder layers that hold a sparse MoE block (default: all of them)."""
        return list(range(config.num_hidden_layers))

    def expert_intermediate_size(self, config) -> int:
        return config.intermediate_size

    def normalizes_topk(self, config) -> bool:
        """Whether the router divides the top-k probabilities by their sum (config.norm_topk_prob)."""
        return bool(config.norm_topk_prob)

    def extra_routing_modules(self, block: nn.Module, hidden_size: int) -> dict[str, nn.Module]:
        """Routing modules beside the top-k router, by child name (Qwen2-MoE's shared-expert gate)."""
        return {}

    def dense_equivalent(self, config):
        """(dense CausalLM class, its config) computing what this MoE computes when all experts are one
        MLP and top-k weights sum to 1; raises RouterTuneError saying why when no such class exists."""
        raise RouterTuneError(
            f"a {self.display_name} MoE cannot be collapsed: transformers has no dense model with its "
            "attention and norms, so the result could not be loaded as a standard checkpoint."
        )

    def _dense_config(self, config, dense_type: str, keys: tuple[str, ...] = DENSE_KEYS, **fixed):
        """The dense config: the MoE's attention / norm / embedding settings, the experts' width."""
        if self.moe_layers(config) != list(range(config.num_hidden_layers)):
            raise RouterTuneError(
                f"this {self.display_name} has dense MLP layers beside its MoE layers (decoder_sparse_step / "
                "mlp_only_layers), of another width: no single dense config describes both, so it cannot be "
                "collapsed."
            )
        values = {k: getattr(config, k) for k in keys if hasattr(config, k)}
        values["intermediate_size"] = self.expert_intermediate_size(config)
        return AutoConfig.for_model(dense_type, **values, **fixed)

    def wrap_class_names(self) -> dict[str, list[str]]:
        """Module classes for sharded training: FSDP2 units (decoder layers) and ZeRO-3 leaves (MoE
        blocks, gathered whole: see `training.sharding.prepare_zero3`)."""
        return {"fsdp_units": [self.decoder_layer_class_name], "zero3_leaves": [self.block_class_name]}
