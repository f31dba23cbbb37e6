"""A random frankenMoE with Raiden-16x3.43B's real widths, for memory and start-up measurements.

    python -m scripts.make_scale_model --out build/scale-model                 # 2 layers, ~5.9 GB bf16
    python -m scripts.make_scale_model --out build/scale-26 --layers 26        # the full 36B shape, ~72 GB

Kquant03/Raiden-16x3.43B's shapes (16 copies of an OpenLLaMA-3B fine-tune's MLP behind top-2 routers, RAIDEN)
with random weights (normal, std 0.02; routers as unit rows, like mergekit's `hidden` gates), in mergekit's legacy
Mixtral layout, in safetensors shards with an index, each written as soon as it is full: peak RAM is about one
shard (`--shard-gb`) whatever `--layers` is. The demo's tokenizer is copied in, so any recipe trains it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FROM = ROOT / "router_tune" / "assets" / "demo-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
RAIDEN = dict(  # Kquant03/Raiden-16x3.43B's config.json, layer count aside
    hidden_size=3200, intermediate_size=8640, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    num_local_experts=16, num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def tensor_specs(config: MixtralConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor, in the order mergekit writes them; init: normal | ones | router."""
    h, inter, experts = config.hidden_size, config.intermediate_size, config.num_local_experts
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    specs = [("model.embed_tokens.weight", (config.vocab_size, h), "normal")]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.self_attn.{n}_proj.weight", (kv if n in "kv" else h, h), "normal") for n in "qkvo"]
        specs += [(f"{p}.input_layernorm.weight", (h,), "ones"), (f"{p}.post_attention_layernorm.weight", (h,), "ones")]
        specs.append((f"{p}.block_sparse_moe.gate.weight", (experts, h), "router"))
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            specs += [(f"{q}.w1.weight", (inter, h), "normal"), (f"{q}.w3.weight", (inter, h), "normal")]
            specs.append((f"{q}.w2.weight", (h, inter), "normal"))
    specs += [("model.norm.weight", (h,), "ones"), ("lm_head.weight", (config.vocab_size, h), "normal")]
    return specs


def make(t_shape: tuple[int, ...], init: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if init == "ones":
        return torch.ones(t_shape, dtype=dtype)
    t = torch.randn(t_shape, generator=gen)
    if init == "router":
        return torch.nn.functional.normalize(t, dim=-1).to(dtype)
    return t.mul_(0.02).to(dtype)


def write_checkpoint(
    out: Path, shape: dict, *, shard_gb: float | None = None, shards: int | None = None, dtype: str = "bfloat16",
    seed: int = 0, tokenizer: bool = True,
) -> Path:  # fmt: skip
    """A random Mixtral of `shape` (MixtralConfig keys) in the legacy layout, in shards of `shard_gb` GB or in
    `shards` shards of about equal bytes, each written as soon as it is full (peak RAM ~ one shard)."""
    torch_dtype = getattr(torch, dtype)
    config = MixtralConfig(**shape, dtype=dtype)
    specs = tensor_specs(config)
    nbytes = [torch.Size(spec[1]).numel() * torch_dtype.itemsize for spec in specs]
    limit = int(shard_gb * 1e9) if shard_gb else -(-sum(nbytes) // shards)
    # Group tensors into shards first, so every file name carries the final shard count.
    groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for spec, n in zip(specs, nbytes):
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += n
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: make(shape, init, torch_dtype, gen) for n, shape, init in group}
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
        print(f"{name}: {len(group)} tensors", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(tmp)
    for f in TOKENIZER_FILES if tokenizer else ():
        shutil.copy(TOKENIZER_FROM / f, tmp / f)
    tmp.rename(out)
    print(f"{out}: {config.num_hidden_layers} layers, {len(groups)} shards, {total / 1e9:.2f} GB {dtype}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Raiden has 26)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="bytes per shard, in GB (peak RAM ~ one shard)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it or pick another --out")
    shape = {**RAIDEN, "num_hidden_layers": args.layers}
    write_checkpoint(args.out, shape, shard_gb=args.shard_gb, dtype=args.dtype, seed=args.seed)


if __name__ == "__main__":
    main()
