"""One measured training run, router_tune or the plain transformers baseline, in this process.

    python -m scripts.bench_train --impl router_tune --model-dir DIR --data DIR --out-dir DIR \
        --batch 4 --steps 8 --warmup 2 [--routing-log-every 10] [--device cpu] [--dtype float32] \
        [--set activation_checkpointing=true --set ce_chunk_tokens=4096 ...] [--fsdp-one-rank]

Prints one JSON line. The baseline and what is timed: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

from scripts import harness


def active_params(config) -> dict[str, int]:
    """Parameters one token multiplies through (the N of 4N FLOPs per token), per part: per layer attention
    q/k/v/o, the router [E, H] and top_k experts' MLPs (3 x H x I each), plus the LM head [V, H]."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    parts = {
        "attention": layers * (h * q + 2 * h * kv + q * h),
        "router": layers * config.num_local_experts * h,
        "active_experts": layers * config.num_experts_per_tok * 3 * h * config.intermediate_size,
        "lm_head": config.vocab_size * h,
    }
    return {**parts, "total_active": sum(parts.values())}


def freeze_all_but_topk_routers(model) -> int:
    """What a user writes: requires_grad by module class."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    model.requires_grad_(False)
    routers = [p for m in model.modules() if isinstance(m, MixtralTopKRouter) for p in m.parameters()]
    for p in routers:
        p.requires_grad_(True)
    return sum(p.numel() for p in routers)


def maxrss_mb() -> float:
    """Peak RSS so far, MB: VmHWM (harness.vm_hwm), not ru_maxrss, which a child inherits from its parent."""
    return harness.vm_hwm() / 2**20


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    cuda = args.device == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_after_imports = maxrss_mb()
    data = load_from_disk(args.data)
    common = dict(
        output_dir=args.out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", logging_steps=args.logging_steps, save_strategy="steps",
        save_steps=args.steps, report_to="none", disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        use_cpu=not cuda,
    )  # fmt: skip
    sampler = harness.PeakRss(every=0.01)  # while training: the loading peak is the same for both trainers
    end = {}
    clock = harness.step_clock(sync, on_last_step=lambda: end.setdefault("maxrss", maxrss_mb()))
    start = time.perf_counter()
    if args.impl == "baseline":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)
        trainable = freeze_all_but_topk_routers(model)
        model.config.update(dict(output_router_logits=True, router_aux_loss_coef=0.01, use_cache=False))
        data = data.select_columns(["input_ids"]).map(lambda r: {"labels": r["input_ids"]})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[clock])
    else:
        from router_tune.training.trainer import RouterTrainer

        config = harness.recipe(
            None, model_name_or_path=args.model_dir, model_dtype=args.dtype, router_aux_loss_coef=0.01,
            router_z_loss_coef=0.001, aux_loss_scope="layer", aux_loss_reduce="global",
            routing_log_every=args.routing_log_every,
            router_lr_scale="none",  # the baseline's optimizer exactly: Adam at 1e-3 (speed, not quality)
            **{**common, **dict(kv.split("=", 1) for kv in args.set)},
        )  # fmt: skip
        sources = [f"source{i}" for i in range(max(data["source_id"]) + 1)]
        model = fsdp_one_rank(args.model_dir, dtype, args.device) if args.fsdp_one_rank else None
        trainer = RouterTrainer(model=model, args=config, train_dataset=data, source_names=sources, callbacks=[clock])
        trainer.model.to(args.device)
        trainable = trainer.param_counts.trainable
    setup_s = time.perf_counter() - start

    save_s: list[float] = []
    inner_save = trainer._save_checkpoint

    def timed_save(*a, **kw):
        sync()
        t = time.perf_counter()
        result = inner_save(*a, **kw)
        save_s.append(time.perf_counter() - t)
        return result

    trainer._save_checkpoint = timed_save
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_before_train = harness.rss() / 2**20
    sampler.start()
    trainer.train()
    peak_train = sampler.stop()

    seq = len(data[0]["input_ids"])
    details = router_tune_details(trainer, args, seq) if args.impl == "router_tune" else {}
    if args.fsdp_one_rank:
        from router_tune.training.sharding import end_process_group

        end_process_group()
    tokens_per_step = args.batch * args.grad_accum * seq
    w = args.warmup
    files = harness.dir_files(Path(args.out_dir) / f"checkpoint-{args.steps}")
    return {
        "impl": args.impl,
        "router_tune_sources": source_digest(),
        "device": args.device,
        "dtype": args.dtype,
        "weights_dtype": str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "threads": args.threads,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "seq": seq,
        "steps": args.steps,
        "warmup": w,
        "routing_log_every": args.routing_log_every,
        "trainable_params": trainable,
        "tokens_per_s": clock.tokens_per_s(tokens_per_step, warmup=w),
        "step_s": [b - a for a, b in zip(clock.times, clock.times[1:])],
        "tokens_per_cpu_s": (len(clock.times) - w) * tokens_per_step / (clock.cpu[-1] - clock.cpu[max(w - 1, 0)]),
        "setup_s": setup_s,
        "rss_after_imports_mb": rss_after_imports,
        "rss_before_train_mb": rss_before_train,
        "peak_rss_train_mb": peak_train / 2**20,
        "maxrss_through_train_mb": end.get("maxrss", 0.0),
        "maxrss_process_mb": maxrss_mb(),
        "cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "gpu_name": torch.cuda.get_device_name() if cuda else None,
        "checkpoint_bytes": sum(files.values()),
        "checkpoint_files": files,
        "checkpoint_save_s": save_s[-1] if save_s else None,
        "settings": list(args.set),
        "fsdp_one_rank": args.fsdp_one_rank,
        **details,
    }


def fsdp_one_rank(model_dir: str, dtype, device: str):
    """The model sharded by FSDP2 in a one-process world (gloo on a CPU, NCCL on a GPU), under accelerate's
    bf16 policy (bf16 all-gather, fp32 reduce)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(harness.free_port()))
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    mesh = init_device_mesh(device, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model  # RouterTrainer makes the routers fp32 after sharding, as under FSDP2 sharded at load time


def router_tune_details(trainer, args, seq: int) -> dict:
    """The dtypes a router_tune run trained with, its weights' bytes and the memory plan of
    `router_tune.model.memory` for this run (what `inspect` and `train --dry-run` show)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from router_tune.model.memory import training_memory
    from router_tune.model.quantize import stored_bytes

    model = trainer.accelerator.unwrap_model(trainer.model)
    routers = [p for p in model.parameters() if p.requires_grad]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    config = AutoConfig.from_pretrained(args.model_dir)
    with torch.device("meta"):  # shapes only, for the plan of what quantization stores
        shapes = AutoModelForCausalLM.from_config(config)
    plan = training_memory(
        trainer.moe, trainer.param_counts.total, trainer.param_counts.trainable, config.vocab_size,
        seq_len=seq * args.batch, dtype=trainer.moe.dtype, quantize=trainer.args.quantize,
        quantize_head=trainer.args.quantize_head, model=shapes,
        activation_checkpointing=bool(trainer.args.activation_checkpointing),
    )  # fmt: skip

    def dtypes(tensors) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})

    return {
        "router_dtypes": dtypes(routers),
        "router_state_dtypes": dtypes(t for p in routers for t in optimizer.state[p].values()),
        "frozen_dtypes": dtypes(p for p in model.parameters() if not p.requires_grad),
        # FSDP2's DTensor shards have no plain storage to count (and the nf4 ratio compares unsharded runs)
        "model_bytes": None if args.fsdp_one_rank else stored_bytes(model),
        "plan_total_mb": plan["total_bytes"] / 2**20,
        "plan": plan,
    }


def pipeline_run(args) -> dict:
    """Tokens/s of router_tune's data pipeline (router_tune.data.pipeline_throughput) on the bundled samples."""
    from transformers import AutoTokenizer

    from router_tune.data import pipeline_throughput

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    return {
        "impl": "data_pipeline",
        "block_size": args.seq,
        "blocks": args.blocks,
        "tokenizer": args.model_dir,
        "tokens_per_s": pipeline_throughput(harness.sample_sources(), tok, args.seq, args.blocks, seed=0),
        "maxrss_process_mb": maxrss_mb(),
    }


def source_digest() -> str:
    """Hash of router_tune's sources: the tree is shared, so each run records the code it measured."""
    h = hashlib.sha256()
    for f in sorted((harness.ROOT / "router_tune").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cmd(**values) -> list[str]:
    """`python -m scripts.bench_train` with these flags (see main); --set KEY=VALUE arguments go after it."""
    return harness.module_cmd("bench_train", *harness.flags(**values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["router_tune", "baseline", "data_pipeline"], required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", help="datasets.save_to_disk directory of blocks")
    parser.add_argument("--out-dir")
    parser.add_argument("--seq", type=int, default=512, help="data_pipeline: block size")
    parser.add_argument("--blocks", type=int, default=64, help="data_pipeline: blocks to draw")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--routing-log-every", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"], help="model_dtype")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="router_tune: a recipe key")
    parser.add_argument("--fsdp-one-rank", action="store_true", help="router_tune: FSDP2-sharded in a world of one")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(pipeline_run(args) if args.impl == "data_pipeline" else run(args)))


if __name__ == "__main__":
    main()
