"""Qwen2-MoE (`Qwen2MoeForCausalLM`): sparse every `decoder_sparse_step` layers, plus a shared expert
whose sigmoid gate is a routing parameter too."""

from __future__ import annotations

from torch import nn

from router_tune.architectures.base import LegacyNaming, MoeArchitecture, full_shape
from router_tune.errors import RouterTuneError


def sparse_layers(config) -> list[int]:
    """Qwen makes layer i sparse when (i+1) % decoder_sparse_step == 0 and i is not in mlp_only_layers."""
    step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or [])
    return [i for i in range(config.num_hidden_layers) if (i + 1) % step == 0 and i not in dense]


class Qwen2Moe(MoeArchitecture):
    model_type, display_name = "qwen2_moe", "Qwen2-MoE"
    module_path = "transformers.models.qwen2_moe.modeling_qwen2_moe"
    router_class_name, block_class_name = "Qwen2MoeTopKRouter", "Qwen2MoeSparseMoeBlock"
    decoder_layer_class_name = "Qwen2MoeDecoderLayer"
    experts_class_name = "Qwen2MoeExperts"
    legacy_naming = LegacyNaming(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")

    def moe_layers(self, config) -> list[int]:
        return sparse_layers(config)

    def expert_intermediate_size(self, config) -> int:
        return config.moe_intermediate_size

    def extra_routing_modules(self, block: nn.Module, hidden_size: int) -> dict[str, nn.Module]:
        # nn.Linear(H, 1) feeding a sigmoid that scales the shared expert: a routing parameter too.
        return {
            name: m
            for name, m in block.named_children()
            if isinstance(m, nn.Linear) and full_shape(m.weight) == (1, hidden_size)
        }

    def dense_equivalent(self, config):
        raise RouterTuneError(
            "a Qwen2-MoE cannot be collapsed exactly: besides the experts, each layer adds a shared expert "
            "scaled by a per-token sigmoid gate, sigmoid(g.h) * shared(h), which no dense transformers model "
            "computes. Its routed experts being identical does not make the layer a single MLP."
        )
