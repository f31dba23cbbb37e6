"""Qwen3-MoE (`Qwen3MoeForCausalLM`): like Qwen2-MoE without the shared expert; `norm_topk_prob`
defaults to False, so the top-k weights need not sum to 1."""

from __future__ import annotations

from transformers import Qwen3ForCausalLM

from router_tune.architectures.base import DENSE_KEYS, LegacyNaming, MoeArchitecture
from router_tune.architectures.qwen2_moe import sparse_layers


class Qwen3Moe(MoeArchitecture):
    model_type, display_name = "qwen3_moe", "Qwen3-MoE"
    module_path = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    router_class_name, block_class_name = "Qwen3MoeTopKRouter", "Qwen3MoeSparseMoeBlock"
    decoder_layer_class_name = "Qwen3MoeDecoderLayer"
    experts_class_name = "Qwen3MoeExperts"
    legacy_naming = LegacyNaming(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")

    def moe_layers(self, config) -> list[int]:
        return sparse_layers(config)

    def expert_intermediate_size(self, config) -> int:
        return config.moe_intermediate_size

    def dense_equivalent(self, config):
        # Qwen3-MoE's attention (with per-head q/k RMSNorm) is Qwen3's; only the MLP differs.
        keys = DENSE_KEYS + ("use_sliding_window", "sliding_window", "max_window_layers")
        return Qwen3ForCausalLM, self._dense_config(config, "qwen3", keys)
