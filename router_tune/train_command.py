"""`router-tune train RECIPE [--dry-run] [--key value ...]`

    router-tune train recipes/demo.yaml --max_steps 50
    accelerate launch --config_file recipes/accelerate/cpu-ddp.yaml -m router_tune train recipes/demo.yaml

Every recipe key (README: Recipe keys) can be overridden as `--key value`.
`--dry-run` checks the recipe, the model (config only: no weights are read) and the data,
then prints the plan: trainable parameters, tokens per step, steps, estimated memory.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from router_tune.errors import RouterTuneError

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/), e.g. recipes/demo.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate recipe, model and data and print the plan; train nothing")
    from router_tune.recipe_keys import keys_text

    parser.epilog = ("Any recipe key can follow as --key value, e.g. --learning_rate 3e-4 --max_steps 100.\n\n"
                     + keys_text())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    from router_tune.config import load_recipe

    config = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(format_plan(plan(config)))
        return 0
    return train(config)


def plan(config) -> dict:
    """What a run of this recipe would do, from the model's config and the first data blocks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from router_tune.checkpoint import resolve_checkpoint
    from router_tune.data import build_train_dataset, check_block_size, parse_sources, source_names
    from router_tune.moe import adapter_for, describe_moe, freeze_all_but_routers

    path = resolve_checkpoint(config.model_name_or_path, allow_pickle=config.allow_pickle,
                              trust_remote_code=config.trust_remote_code)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    adapter_for(model_config)
    with torch.device("meta"):  # shapes only: the plan reads no weights
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    info = describe_moe(model, source=str(path))
    counts = freeze_all_but_routers(model)
    if not config.datasets:
        raise RouterTuneError("the recipe has no `datasets`: list at least one source (see recipes/demo.yaml).")
    specs = parse_sources(config.datasets)
    check_block_size(config.block_size, model_config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # every local record is checked, then the first blocks are really tokenized and packed
    train = build_train_dataset(specs, tokenizer, config.block_size, seed=config.seed,
                                eval_fraction=config.eval_fraction, max_bad_records=config.max_bad_records)
    names = source_names(specs)
    blocks = dict.fromkeys(names, 0)
    for block in itertools.islice(train, 16):
        blocks[names[block["source_id"]]] += 1
    world = max(1, config.world_size)
    tokens_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world * config.block_size
    weight_bytes = counts.total * (torch.finfo(info.dtype).bits // 8 if config.model_dtype == "auto"
                                   else torch.finfo(getattr(torch, config.model_dtype)).bits // 8)
    return {
        "model": str(config.model_name_or_path), "architecture": info.architecture, "layout": info.layout,
        "moe_layers": len(info.moe_layers), "experts": info.num_experts, "top_k": info.top_k,
        "trainable_parameters": counts.trainable, "total_parameters": counts.total,
        "trainable_percent": round(counts.percent, 5), "sources": source_names(specs),
        "first_blocks_per_source": blocks, "block_size": config.block_size, "processes": world,
        "tokens_per_step": tokens_per_step, "max_steps": config.max_steps,
        "total_tokens": tokens_per_step * max(config.max_steps, 0),
        # frozen weights + fp32 router master weights, gradients and two Adam moments
        "estimated_weight_memory_gb": round((weight_bytes + counts.trainable * 16) / 2**30, 3),
        "output_dir": config.output_dir,
    }


def format_plan(p: dict) -> str:
    rows = [("model", f"{p['model']} ({p['architecture']}, {p['layout']} layout)"),
            ("routing", f"{p['moe_layers']} MoE layers x {p['experts']} experts, top-{p['top_k']}"),
            ("trainable", f"{p['trainable_parameters']:,} of {p['total_parameters']:,} parameters "
                          f"({p['trainable_percent']:.4f}%)"),
            ("data", ", ".join(f"{s} ({n} of the first 16 blocks)" for s, n in p["first_blocks_per_source"].items())),
            ("tokens/step", f"{p['tokens_per_step']:,} ({p['processes']} process(es), block {p['block_size']})"),
            ("steps", f"{p['max_steps']:,} ({p['total_tokens']:,} tokens)"),
            ("memory", f"~{p['estimated_weight_memory_gb']} GB for weights and optimizer, plus activations"),
            ("output", p["output_dir"])]
    width = max(len(k) for k, _ in rows)
    return "dry run: nothing trained\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def train(config) -> int:
    from router_tune.trainer import RouterTrainer

    trainer = RouterTrainer(args=config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        out = Path(config.output_dir)
        state = "stopped early (interrupted)" if trainer._interrupted else "finished"
        print(f"router-tune train: {state} at step {trainer.state.global_step}; routers in {out / 'routers.safetensors'}")
        if trainer._interrupted:
            print(f"resume with: router-tune train {' '.join(sys.argv[2:3])} --resume_from_checkpoint true")
        print(json.dumps({"global_step": trainer.state.global_step, "nonfinite_steps": trainer.nonfinite_steps}))
    return 0
