"""RouterTrainer on tiny checkpoints, shared by the trainer tests and the launched rank scripts
(tests/ddp_script.py, fsdp_script.py, zero3_train_script.py, node_local_script.py)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_tune.training.config import load_recipe
from router_tune.training.trainer import RouterTrainer

BLOCK = 32


def text_blocks(model_dir: Path, n: int, block: int = BLOCK) -> Dataset:
    """Real text (stdlib sources: stable across runs) tokenized and cut into `n` blocks, two sources."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "\n".join(Path(m.__file__).read_text() for m in (argparse, textwrap))
    ids = tok(text)["input_ids"]
    rows = [
        {
            "input_ids": ids[i * block : (i + 1) * block],
            "labels": ids[i * block : (i + 1) * block],
            "position_ids": list(range(block)),
            "token_mask": [1] * block,
            "source_id": i % 2,
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def uneven_blocks(model_dir: Path, n: int, block: int = BLOCK) -> Dataset:
    """Like `text_blocks`, but every block has its own number of target tokens (a prefix of ignored
    labels, as assistant-only chats have) and of real tokens (a padded tail, token_mask 0), so a
    per-rank or per-micro-batch mean differs from the global one."""
    rows = text_blocks(model_dir, n, block).to_list()
    for i, row in enumerate(rows):
        ignored, padded = (7 * i) % (block // 2), (5 * i) % (block // 3)
        keep = block - padded
        row["labels"] = [-100] * ignored + row["labels"][ignored:keep] + [-100] * padded
        row["input_ids"] = row["input_ids"][:keep] + [2] * padded
        row["token_mask"] = [1] * keep + [0] * padded
    return Dataset.from_list(rows)


def make_trainer(model_dir, out, *, steps=4, batch=4, ga=1, lr=0.3, data="text", **kw) -> RouterTrainer:
    """A RouterTrainer on `data` (default: 64 text blocks; None: the recipe's `datasets`)."""
    defaults = dict(
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        routing_log_every=2,
        logging_steps=1,
        save_steps=1000,
        seed=0,
        data_seed=0,
        use_cpu=True,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        eval_before_after=False,
    )
    defaults.update(kw)
    args = load_recipe(
        None,
        model_name_or_path=str(model_dir),
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        learning_rate=lr,
        **defaults,
    )
    return RouterTrainer(
        args=args,
        train_dataset=text_blocks(model_dir, 64) if isinstance(data, str) else data,
        source_names=["even", "odd"] if data is not None else None,
    )


def distributed_trainer(model_dir, out, *, steps, batch, ga, **kw) -> RouterTrainer:
    """The trainer tests/ddp_script.py, fsdp_script.py and zero3_train_script.py run on every rank (and
    alone, as the 1-process reference): uneven blocks in a fixed order, global_prev balancing, an
    overload loss with threshold 1.0 (active on any imbalance) and a z-loss strong enough that a
    normalisation error shows in the routers."""
    return make_trainer(
        model_dir,
        out,
        steps=steps,
        batch=batch,
        ga=ga,
        data=uneven_blocks(Path(model_dir), 24),
        train_sampling_strategy="sequential",
        use_cpu=False,
        aux_loss_reduce="global_prev",
        router_aux_loss_coef=0.1,
        router_overload_loss_coef=0.5,
        router_overload_threshold=1.0,
        router_z_loss_coef=0.01,
        **kw,
    )


def source_tensors(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}
