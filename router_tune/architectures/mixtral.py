"""Mixtral (`MixtralForCausalLM`): what mergekit-moe writes by default, and Raiden-16x3.43B's layout."""

from __future__ import annotations

from transformers import LlamaForCausalLM

from router_tune.architectures.base import LegacyNaming, MoeArchitecture
from router_tune.errors import RouterTuneError


class Mixtral(MoeArchitecture):
    model_type, display_name = "mixtral", "Mixtral"
    module_path = "transformers.models.mixtral.modeling_mixtral"
    router_class_name, block_class_name = "MixtralTopKRouter", "MixtralSparseMoeBlock"
    decoder_layer_class_name = "MixtralDecoderLayer"
    experts_class_name = "MixtralExperts"
    # mergekit <= 0.1.4, most frankenMoEs on the hub and llama.cpp's converter use these names.
    legacy_naming = LegacyNaming(block="block_sparse_moe", gate="w1", up="w3", down="w2")

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def normalizes_topk(self, config) -> bool:
        return True  # MixtralTopKRouter always divides the top-k probabilities by their sum

    def dense_equivalent(self, config):
        # Mixtral's attention, norms and rotary embedding are Llama's; only the MLP differs.
        if config.sliding_window is not None:
            raise RouterTuneError(
                f"this Mixtral uses sliding-window attention (sliding_window={config.sliding_window}), which "
                "LlamaForCausalLM does not implement: it cannot be collapsed into an equivalent Llama."
            )
        return LlamaForCausalLM, self._dense_config(config, "llama", mlp_bias=False)
