"""Where router_tune spends time and memory (issue 8, item 5): set-up stages and training steps.

    python scripts/bench_profile.py setup --model-dir bench/work/mixtral-h512-e8
    python scripts/bench_profile.py steps --model-dir bench/work/mixtral-h512-e8 --data bench/work/random-s512-n10 \
        --impl router_tune [--steps 3]

`setup`: RSS and seconds after each stage of `RouterTrainer.__init__`, done by hand in the same
order, next to the baseline's load. `steps`: torch.profiler over training steps (after one
warm-up step), top operators by self CPU time and by allocated memory.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def setup(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router_tune import moe

    t = time.perf_counter()
    marks = []

    def mark(stage):
        nonlocal t
        now = time.perf_counter()
        marks.append((stage, now - t, rss_mb()))
        t = now

    mark("imports")
    if args.impl == "baseline":
        from transformers import Trainer, TrainingArguments

        import bench_train

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        mark("from_pretrained")
        bench_train._freeze_all_but_topk_routers(model)
        Trainer(model=model, args=TrainingArguments(output_dir="/tmp/bench_profile_run", use_cpu=True, report_to="none"))
        mark("freeze + Trainer.__init__")
    else:
        from router_tune.config import load_recipe
        from router_tune.trainer import RouterTrainer

        model, info = moe.load_moe(args.model_dir, dtype="auto")
        mark("load_moe (from_pretrained + describe + routers_to_fp32)")
        fingerprints = moe.expert_fingerprints(model)
        mark("expert_fingerprints")
        moe.identical_expert_groups(fingerprints)
        moe.routers_to_fp32(model)
        mark("routers_to_fp32")
        moe.freeze_all_but_routers(model)
        mark("freeze_all_but_routers")
        AutoTokenizer.from_pretrained(args.model_dir)
        mark("AutoTokenizer")
        config = load_recipe(None, model_name_or_path=args.model_dir, output_dir="/tmp/bench_profile_run", use_cpu=True,
                             eval_before_after=False)
        mark("load_recipe")
        from datasets import load_from_disk

        RouterTrainer(model=model, args=config, train_dataset=load_from_disk(args.data), source_names=["bench"])
        mark("RouterTrainer.__init__ (on the loaded model)")
    for stage, seconds, rss in marks:
        print(f"{stage:<58} {seconds:7.2f} s   RSS {rss:7.0f} MB")


def _measure_routers_without_head(model, batch):
    """The proposed router_tune.rescale.measure_routers: the same forward with the frozen LM head
    skipped (lm_head_as_identity), so no [batch, seq, vocab] logits tensor is made."""
    import torch

    from router_tune.lm_loss import lm_head_as_identity

    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    with torch.no_grad(), lm_head_as_identity(model):
        out = model(**inputs, output_router_logits=True, use_cache=False)
    model.train(was_training)
    mask = batch.get("token_mask", batch.get("attention_mask"))
    keep = mask.reshape(-1).bool() if mask is not None else slice(None)
    result = []
    for logits in out.router_logits:
        logits = logits.float()[keep]
        result.append({"top1": logits.softmax(-1).max(-1).values.mean().item(),
                       "logit_std": logits.std(-1).mean().item()})
    return result


def _ce_forward_inplace(ctx, hidden, weight, targets, chunk):
    """The proposed _FrozenHeadCrossEntropySum.forward: softmax in place on the chunk's logits
    (torch.logsumexp allocates a second [chunk, vocab] temporary for exp(x - max))."""
    import torch

    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        logits = (h @ weight.T).float()
        rows = torch.arange(y.shape[0], device=y.device)
        target_logit = logits[rows, y]
        top = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(top).exp_()  # exp(x - max), in place
        total = probs.sum(dim=-1, keepdim=True)
        loss = loss + (total.log().squeeze(-1) + top.squeeze(-1) - target_logit).sum()
        if grad_hidden is not None:
            probs.div_(total)
            probs[rows, y] -= 1.0
            grad_hidden[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
    ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
    return loss


def ce(args) -> None:
    """lm_loss_sum forward + backward alone on [batch*seq, hidden] x [vocab, hidden]: peak RSS above start, seconds."""
    import json

    import torch
    from torch import nn

    from router_tune import lm_loss

    torch.set_num_threads(args.threads)
    if args.patched:
        lm_loss._FrozenHeadCrossEntropySum.forward = staticmethod(_ce_forward_inplace)
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    import threading

    import psutil

    proc, peak, run = psutil.Process(), [0], [True]

    def sample():
        while run[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    start_rss = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    loss = lm_loss.lm_loss_sum(hidden, head, labels, args.ce_chunk_tokens)
    loss.backward()
    seconds = time.perf_counter() - t
    run[0] = False
    thread.join()
    print(json.dumps({"patched": args.patched, "chunk": args.ce_chunk_tokens, "seconds": seconds,
                      "peak_above_start_mb": (peak[0] - start_rss) / 2**20, "loss": loss.item(),
                      "grad_sum": hidden.grad.double().abs().sum().item()}))


def init(args) -> None:
    """RouterTrainer.__init__ alone (model loading excluded): seconds, RSS after, peak RSS delta."""
    import json
    import resource

    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_from_disk

    from router_tune import moe, rescale
    from router_tune.config import load_recipe
    from router_tune.trainer import RouterTrainer

    if args.patched:
        rescale.measure_routers = _measure_routers_without_head
    model, _ = moe.load_moe(args.model_dir)
    data = load_from_disk(args.data)
    config = load_recipe(None, model_name_or_path=args.model_dir, output_dir="/tmp/bench_profile_run", use_cpu=True,
                         eval_before_after=False, per_device_train_batch_size=args.batch, report_to="none")
    before, maxrss_before = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    RouterTrainer(model=model, args=config, train_dataset=data, source_names=["bench"])
    seconds = time.perf_counter() - t
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"patched": args.patched, "init_s": seconds, "rss_growth_mb": rss_mb() - before,
                      "peak_above_loaded_mb": maxrss - max(before, maxrss_before) if maxrss > maxrss_before else 0.0,
                      "maxrss_mb": maxrss}))


def steps(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import bench_train

    data = load_from_disk(args.data)
    common = dict(output_dir="/tmp/bench_profile_run", max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
                  learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
                  report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=5)
    if args.impl == "baseline":
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        bench_train._freeze_all_but_topk_routers(model)
        model.config.output_router_logits, model.config.router_aux_loss_coef, model.config.use_cache = True, 0.01, False
        data = data.select_columns(["input_ids"]).map(lambda r: {"labels": r["input_ids"]})
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data)
    else:
        from router_tune.config import load_recipe
        from router_tune.trainer import RouterTrainer

        config = load_recipe(None, model_name_or_path=args.model_dir, routing_log_every=args.routing_log_every,
                             ce_chunk_tokens=args.ce_chunk_tokens, eval_before_after=False, **common)
        trainer = RouterTrainer(args=config, train_dataset=data, source_names=["bench"])

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)

    class Start(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                prof.__enter__()

    trainer.add_callback(Start())
    trainer.train()
    prof.__exit__(None, None, None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=args.rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["setup", "steps", "init", "ce"])
    p.add_argument("--patched", action="store_true", help="init: with the proposed rescale change")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data")
    p.add_argument("--impl", choices=["router_tune", "baseline"], default="router_tune")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--routing-log-every", type=int, default=10)
    p.add_argument("--ce-chunk-tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    {"setup": setup, "steps": steps, "init": init, "ce": ce}[args.what](args)


if __name__ == "__main__":
    main()
