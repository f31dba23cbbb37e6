"""One measured training run, router_tune or the plain transformers baseline, in this process.

    python scripts/bench_train.py --impl router_tune --model-dir DIR --data DIR --out-dir DIR \
        --batch 4 --steps 8 --warmup 2 [--routing-log-every 10] [--device cpu] [--dtype float32] \
        [--set activation_checkpointing=true --set ce_chunk_tokens=4096 ...] [--fsdp-one-rank]

`--set KEY=VALUE`: recipe keys of the router_tune run (the bf16 recipe path, quantize: nf4, ...).
`--fsdp-one-rank`: the model is sharded with FSDP2 (`fully_shard`, bf16 MixedPrecisionPolicy) in a world of
one process before RouterTrainer gets it: the path of the FSDP2 routers' dtypes on one device.

`scripts/bench.py` starts one fresh process per measured run (so peak RSS is the run's own) and
reads the JSON printed on the last stdout line. Also holds what bench.py prepares once per
invocation: the random Mixtral checkpoints (`make_random_mixtral`), the pre-tokenized blocks both
trainers read (`make_random_blocks`, `make_text_blocks`) and the active-parameter count behind
the MFU figure (`active_params`).

The baseline is what a user writes without router_tune: `transformers.Trainer` on the same
MixtralForCausalLM, only `MixtralTopKRouter` parameters trainable, `output_router_logits=True`
and the model's own aux loss (router_aux_loss_coef 0.01), labels = input_ids.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ---- what bench.py prepares once ----------------------------------------------------------


def make_random_mixtral(
    out: Path,
    *,
    experts: int = 8,
    hidden: int = 512,
    layers: int = 4,
    intermediate: int = 1024,
    vocab: int = 32000,
    top_k: int = 2,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random Mixtral saved with `save_pretrained` in `dtype` (legacy layout, like hub frankenMoEs), plus a
    small byte-level tokenizer (RouterTrainer reads one from the model directory; ids never decode)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = MixtralForCausalLM(config).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [p.read_text() for p in sorted((ROOT / "router_tune").glob("*.py"))]
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    ).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _save_blocks(rows: dict, out: Path) -> Path:
    from datasets import Dataset

    tmp = out.with_name(out.name + ".partial")
    Dataset.from_dict(rows).save_to_disk(str(tmp))
    tmp.rename(out)
    return out


def make_random_blocks(out: Path, *, vocab: int, seq: int, n_blocks: int, seed: int = 0) -> Path:
    """Uniform random token blocks, every token real: one document per block."""
    import torch

    if out.is_dir():
        return out
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_blocks, seq), generator=gen).tolist()
    return _save_blocks(
        {
            "input_ids": ids,
            "labels": [r[:] for r in ids],
            "position_ids": [list(range(seq))] * n_blocks,
            "token_mask": [[1] * seq] * n_blocks,
            "source_id": [0] * n_blocks,
        },
        out,
    )


def make_text_blocks(out: Path, model_dir: Path, *, seq: int, n_blocks: int, seed: int = 0) -> Path:
    """Real text: the bundled samples through router_tune's own pipeline (packed, both sources),
    full blocks only, so both trainers see the same number of real tokens per step."""
    from transformers import AutoTokenizer

    from router_tune.data import build_train_dataset, parse_sources

    if out.is_dir():
        return out
    samples = ROOT / "router_tune" / "assets" / "samples"
    specs = parse_sources(
        [
            {"source": "redpajama", "path": str(samples / "redpajama"), "weight": 0.75},
            {"source": "wizard_vicuna", "path": str(samples / "wizard_vicuna"), "weight": 0.25},
        ]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows: dict[str, list] = {k: [] for k in ("input_ids", "labels", "position_ids", "token_mask", "source_id")}
    for block in build_train_dataset(specs, tok, seq, seed=seed, check=False):
        if sum(block["token_mask"]) < seq:
            continue
        for k in rows:
            rows[k].append(block[k])
        if len(rows["input_ids"]) == n_blocks:
            break
    if len(rows["input_ids"]) < n_blocks:
        raise RuntimeError(f"the samples give only {len(rows['input_ids'])} full blocks of {seq} tokens")
    return _save_blocks(rows, out)


def active_params(config) -> dict[str, int]:
    """Parameters one token multiplies through (the N of 4N FLOPs per token), per part.

    Per layer: attention q/k/v/o projections, the router [E, H], and top_k experts' MLPs
    (3 x H x I each: gate, up, down). Plus the LM head [V, H]. Not counted: the input
    embedding (a lookup, no FLOPs), norms (O(H)), the other E - top_k experts (never run for
    this token), and attention scores (QK^T, AV: O(seq) per token, not parameters).
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = layers * (h * q + 2 * h * kv + q * h)
    router = layers * config.num_local_experts * h
    experts = layers * config.num_experts_per_tok * 3 * h * config.intermediate_size
    lm_head = config.vocab_size * h
    return {
        "attention": attention,
        "router": router,
        "active_experts": experts,
        "lm_head": lm_head,
        "total_active": attention + router + experts + lm_head,
    }


# ---- one measured run -------------------------------------------------------------------


class _RssSampler(threading.Thread):
    """Peak resident set size while training (psutil every 10 ms): ru_maxrss alone also holds
    the loading peak, which is the same for both trainers."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _freeze_all_but_topk_routers(model) -> int:
    """What a user writes: requires_grad by module class."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    for p in model.parameters():
        p.requires_grad_(False)
    trainable = 0
    for module in model.modules():
        if isinstance(module, MixtralTopKRouter):
            for p in module.parameters():
                p.requires_grad_(True)
                trainable += p.numel()
    return trainable


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = args.device == "cuda"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_after_imports = _maxrss_mb()
    data = load_from_disk(args.data)
    common = dict(
        output_dir=args.out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.steps,
        save_total_limit=None,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        use_cpu=not cuda,
    )

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu: list[float] = []  # process CPU seconds: less sensitive than wall time to other jobs
            self.peak_during_train = 0.0
            self.maxrss_at_end = 0.0

        def on_step_end(self, a, state, control, **kw):
            sync()
            self.times.append(time.perf_counter())
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.cpu.append(usage.ru_utime + usage.ru_stime)
            if state.global_step >= a.max_steps:  # before the final checkpoint is written
                self.maxrss_at_end = _maxrss_mb()
                sampler.running = False

    clock = StepClock()
    sampler = _RssSampler()
    start = time.perf_counter()
    if args.impl == "baseline":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)
        trainable = _freeze_all_but_topk_routers(model)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = 0.01
        model.config.use_cache = False
        data = data.select_columns(["input_ids"]).map(lambda r: {"labels": r["input_ids"]})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[clock])
    else:
        from router_tune.training.config import load_recipe
        from router_tune.training.trainer import RouterTrainer

        config = load_recipe(
            None,
            model_name_or_path=args.model_dir,
            model_dtype=args.dtype,
            router_aux_loss_coef=0.01,
            router_z_loss_coef=0.001,
            aux_loss_scope="layer",
            aux_loss_reduce="global",
            routing_log_every=args.routing_log_every,
            eval_before_after=False,
            router_lr_scale="none",  # the baseline's optimizer exactly: Adam at 1e-3 (speed, not quality)
            **{**common, **dict(kv.split("=", 1) for kv in args.set)},
        )
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
    rss_before_train = psutil_rss_mb()
    sampler.start()
    trainer.train()
    sampler.running = False
    sampler.join()

    details = router_tune_details(trainer, args, len(data[0]["input_ids"])) if args.impl == "router_tune" else {}
    if args.fsdp_one_rank:
        from router_tune.training.sharding import end_process_group

        end_process_group()
    measured = clock.times[args.warmup - 1 :] if args.warmup else [start] + clock.times
    tokens_per_step = args.batch * args.grad_accum * len(data[0]["input_ids"])
    seconds = measured[-1] - measured[0]
    ckpt = Path(args.out_dir) / f"checkpoint-{args.steps}"
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in ckpt.rglob("*") if f.is_file()}
    return {
        "impl": args.impl,
        "router_tune_sources": source_digest(),
        "device": args.device,
        "dtype": args.dtype,
        "weights_dtype": str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "threads": args.threads,
        "batch": args.batch,
        "grad_accum": args.grad_accum,
        "seq": len(data[0]["input_ids"]),
        "steps": args.steps,
        "warmup": args.warmup,
        "routing_log_every": args.routing_log_every,
        "trainable_params": trainable,
        "tokens_per_s": (len(measured) - 1) * tokens_per_step / seconds,
        "step_s": [b - a for a, b in zip(clock.times, clock.times[1:])],
        "tokens_per_cpu_s": (len(measured) - 1)
        * tokens_per_step
        / (clock.cpu[-1] - clock.cpu[args.warmup - 1 if args.warmup else 0]),
        "setup_s": setup_s,
        "rss_after_imports_mb": rss_after_imports,
        "rss_before_train_mb": rss_before_train,
        "peak_rss_train_mb": sampler.peak / 2**20,
        "maxrss_through_train_mb": clock.maxrss_at_end,
        "maxrss_process_mb": _maxrss_mb(),
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
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    mesh = init_device_mesh(device, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model  # RouterTrainer makes the routers fp32 after sharding, as under FSDP2 sharded at load time


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        trainer.moe,
        trainer.param_counts.total,
        trainer.param_counts.trainable,
        config.vocab_size,
        seq_len=seq * args.batch,
        dtype=trainer.moe.dtype,
        quantize=trainer.args.quantize,
        quantize_head=trainer.args.quantize_head,
        model=shapes,
        activation_checkpointing=bool(trainer.args.activation_checkpointing),
    )
    return {
        "router_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in routers}),
        "router_state_dtypes": sorted(
            {str(t.dtype).removeprefix("torch.") for p in routers for t in optimizer.state[p].values()}
        ),
        "frozen_dtypes": sorted(
            {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
        ),
        # FSDP2's DTensor shards have no plain storage to count (and the nf4 ratio compares unsharded runs)
        "model_bytes": None if args.fsdp_one_rank else stored_bytes(model),
        "plan_total_mb": plan["total_bytes"] / 2**20,
        "plan": plan,
    }


def pipeline_run(args) -> dict:
    """Tokens/s of router_tune's data pipeline (router_tune.data.pipeline_throughput) on the bundled samples."""
    from transformers import AutoTokenizer

    from router_tune.data import parse_sources, pipeline_throughput

    samples = ROOT / "router_tune" / "assets" / "samples"
    specs = parse_sources(
        [
            {"source": "redpajama", "path": str(samples / "redpajama"), "weight": 0.75},
            {"source": "wizard_vicuna", "path": str(samples / "wizard_vicuna"), "weight": 0.25},
        ]
    )
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    return {
        "impl": "data_pipeline",
        "block_size": args.seq,
        "blocks": args.blocks,
        "tokenizer": args.model_dir,
        "tokens_per_s": pipeline_throughput(specs, tok, args.seq, args.blocks, seed=0),
        "maxrss_process_mb": _maxrss_mb(),
    }


def source_digest() -> str:
    """Hash of router_tune's sources: the tree is shared, so each run records the code it measured."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "router_tune").rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def psutil_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


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
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "auto"], help="model_dtype (auto: as stored)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="router_tune: a recipe key")
    parser.add_argument("--fsdp-one-rank", action="store_true", help="router_tune: FSDP2-sharded in a world of one")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(pipeline_run(args) if args.impl == "data_pipeline" else run(args)))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
