"""OLMoE (`OlmoeForCausalLM`, AllenAI): a natively trained MoE, every layer sparse, 64 experts top-8,
`norm_topk_prob` False by default. Added as the proof that an architecture is one module."""

from __future__ import annotations

from router_tune.architectures.base import LegacyNaming, MoeArchitecture


class Olmoe(MoeArchitecture):
    model_type, display_name = "olmoe", "OLMoE"
    module_path = "transformers.models.olmoe.modeling_olmoe"
    router_class_name, block_class_name = "OlmoeTopKRouter", "OlmoeSparseMoeBlock"
    decoder_layer_class_name = "OlmoeDecoderLayer"
    experts_class_name = "OlmoeExperts"
    legacy_naming = LegacyNaming(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
