"""What a run of a recipe would do, without reading a weight: `router-tune train --dry-run`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from router_tune.data import first_blocks
from router_tune.errors import RouterTuneError
from router_tune.model.loading import compute_dtype, describe_moe, stored_dtype
from router_tune.model.memory import training_memory
from router_tune.model.quantize import check_quantization
from router_tune.model.routers import freeze_all_but_routers
from router_tune.training.preparation import model_source, training_data


def plan(config) -> dict:
    """What a run of this recipe would do, from the model's config and the first data blocks."""
    if config.quantize != "none":  # the mode must run here; the plan itself reads no weights
        check_quantization(config.quantize, config.device)
    source = model_source(config)
    model_config = source.config
    with torch.device("meta"):  # shapes only: the plan reads no weights
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    info = describe_moe(model, source=str(source.path))
    counts = freeze_all_but_routers(model)
    if not config.datasets:
        raise RouterTuneError("the recipe has no `datasets`: list at least one source (see recipes/demo.yaml).")
    # the run's own data path: every local record is checked, then the first blocks are really tokenized and packed
    train = training_data(config, source)
    names = train.source_names
    blocks = dict.fromkeys(names, 0)
    for block in first_blocks(train.dataset, 16):
        blocks[names[block["source_id"]]] += 1
    world = max(1, config.world_size)
    tokens_per_step = (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * world * config.block_size
    )
    stored = stored_dtype(model_config)
    dtype, dtype_note = compute_dtype(config.model_dtype, stored, config.device)
    weights_dtype = stored if dtype == "auto" else dtype
    memory = training_memory(
        info,
        counts.total,
        counts.trainable,
        model_config.vocab_size,
        seq_len=config.block_size * config.per_device_train_batch_size,
        dtype=weights_dtype,
        quantize=config.quantize,
        quantize_head=config.quantize_head,
        model=model,
        activation_checkpointing=bool(config.activation_checkpointing),
    )
    return {
        "model": str(config.model_name_or_path),
        "architecture": info.architecture,
        "layout": info.layout,
        "weights_dtype": str(weights_dtype or "as stored").removeprefix("torch."),
        "dtype_note": dtype_note,
        "moe_layers": len(info.moe_layers),
        "experts": info.num_experts,
        "top_k": info.top_k,
        "trainable_parameters": counts.trainable,
        "total_parameters": counts.total,
        "trainable_percent": round(counts.percent, 5),
        "sources": names,
        "first_blocks_per_source": blocks,
        "block_size": config.block_size,
        "processes": world,
        "tokens_per_step": tokens_per_step,
        "max_steps": config.max_steps,
        "total_tokens": tokens_per_step * max(config.max_steps, 0),
        "memory": memory,
        "output_dir": config.output_dir,
    }
