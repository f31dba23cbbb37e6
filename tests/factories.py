"""Tiny but real MoE checkpoints for the tests (mergekit's "picollama" idea).

Each factory writes a directory that `from_pretrained` loads: config, safetensors weights
and a small byte-level BPE tokenizer, a checked-in file (tests/fixtures/tokenizer-320).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HIDDEN, LAYERS, EXPERTS, TOP_K = 32, 2, 4, 2
COMMON = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


# ChatML as SmolLM2 and Qwen ship it (no {% generation %} markers), and the same template with the
# markers around each answer and its end-of-turn token: transformers' own assistant mask for the second
# is the independent reference for the turn-by-turn rendering the first needs.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(out: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """The checked-in byte-level BPE test tokenizer of `vocab_size` (320, or 300 for a different
    vocabulary) copied into `out`: the same files whatever the repository's source says."""
    fixture = FIXTURES / f"tokenizer-{vocab_size}"
    if not fixture.is_dir():
        raise ValueError(f"no test tokenizer of vocab_size {vocab_size}: see tests/fixtures/make_tiny_tokenizers.py")
    out.mkdir(parents=True, exist_ok=True)
    for f in fixture.iterdir():
        shutil.copyfile(f, out / f.name)
    return PreTrainedTokenizerFast.from_pretrained(out)


def _save(model, out: Path, fused: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_original_format=not fused)
    make_tokenizer(out)
    return out


def mixtral(
    out: Path,
    *,
    fused: bool = False,
    seed: int = 0,
    experts: int = EXPERTS,
    dtype=torch.float32,
    identical_experts: bool = False,
    gate_init: str = "normal",
    max_position_embeddings: int = COMMON["max_position_embeddings"],
    tied: bool = False,
) -> Path:
    """A Mixtral MoE. gate_init: "normal" (std 0.02, sane), "random" (mergekit's torch.randn: saturated)
    or "copied" (one gate shared by every layer, as mergekit's cheap_embed mode makes). tied: the output
    head is the embedding matrix (no lm_head tensor on disk), as in merges of SmolLM2, Qwen2.5-0.5B, Gemma."""
    torch.manual_seed(seed)
    config = MixtralConfig(
        **{**COMMON, "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tied},
        intermediate_size=64,
        num_local_experts=experts,
        num_experts_per_tok=TOP_K,
        vocab_size=320,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = MixtralForCausalLM(config).to(dtype)
    with torch.no_grad():
        first_gate = model.model.layers[0].mlp.gate.weight
        for layer in model.model.layers:
            if identical_experts:
                layer.mlp.experts.gate_up_proj[:] = layer.mlp.experts.gate_up_proj[0]
                layer.mlp.experts.down_proj[:] = layer.mlp.experts.down_proj[0]
            if gate_init == "random":
                layer.mlp.gate.weight.copy_(torch.randn_like(layer.mlp.gate.weight) * 4)
            elif gate_init == "copied":
                layer.mlp.gate.weight.copy_(first_gate)
    return _save(model, out, fused)


TWINS = {3: 0, 4: 1}  # mixtral_twins: expert -> the expert it is a (near-)copy of


def mixtral_twins(out: Path, seed: int = 0) -> Path:
    """A Mixtral with 6 experts per layer and two pairs of twins: expert 3 is a bit-identical copy of expert 0,
    expert 4 is expert 1 plus noise of 0.1% of its weights' std (a fine-tune that barely moved), experts 2 and 5
    are distinct (independently drawn). Groups per layer: [[0, 3], [1, 4], [2], [5]]."""
    torch.manual_seed(seed)
    config = MixtralConfig(
        **COMMON,
        intermediate_size=64,
        num_local_experts=6,
        num_experts_per_tok=TOP_K,
        vocab_size=320,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for weights in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                weights[3] = weights[0]
                weights[4] = weights[1] + 1e-3 * weights[1].std() * torch.randn_like(weights[1])
    return _save(model, out)


def qwen2_moe(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        vocab_size=320,
        norm_topk_prob=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save(Qwen2MoeForCausalLM(config), out)


def qwen3_moe(out: Path, seed: int = 0, identical_experts: bool = False) -> Path:
    """A Qwen3-MoE with the default norm_topk_prob=False (top-k weights not renormalised)."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        vocab_size=320,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen3MoeForCausalLM(config)
    if identical_experts:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.experts.gate_up_proj[:] = layer.mlp.experts.gate_up_proj[0]
                layer.mlp.experts.down_proj[:] = layer.mlp.experts.down_proj[0]
    return _save(model, out)


def olmoe(out: Path, seed: int = 0) -> Path:
    """An OLMoE (every layer sparse, norm_topk_prob False by default), saved in the legacy layout."""
    torch.manual_seed(seed)
    config = OlmoeConfig(
        **COMMON,
        intermediate_size=32,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        vocab_size=320,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return _save(OlmoeForCausalLM(config), out)


def dense_llama(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(**COMMON, intermediate_size=64, vocab_size=320, bos_token_id=1, eos_token_id=2)
    return _save(LlamaForCausalLM(config), out)


def truncate_weights(model_dir: Path) -> Path:
    """Cut the first safetensors file in half, as an interrupted download leaves it."""
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard


def to_pickle_only(model_dir: Path) -> Path:
    """Replace the safetensors weights by a legacy pickle `pytorch_model.bin`."""
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    torch.save(load_file(shard), model_dir / "pytorch_model.bin")
    for f in model_dir.glob("*.safetensors*"):
        f.unlink()
    return model_dir


def with_remote_code(model_dir: Path) -> Path:
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomMoeForCausalLM"}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (model_dir / "modeling_custom.py").write_text("raise RuntimeError('remote code must not run in tests')\n")
    return model_dir


__all__ = [
    "mixtral",
    "mixtral_twins",
    "qwen2_moe",
    "qwen3_moe",
    "dense_llama",
    "truncate_weights",
    "to_pickle_only",
    "with_remote_code",
    "make_tokenizer",
]
