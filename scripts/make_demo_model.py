"""nice -n 5 python -m scripts.make_demo_model  [--work build/demo-work] [--out router_tune/assets/demo-moe]

Rebuild the embedded demo frankenMoE from the bundled samples, bit for bit (what it builds: docs/results.md and
the README it writes beside the model). Needs the dev extra (`pip install -e .[dev]`: mergekit 0.1.5).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from router_tune.data import chat_doc_key, is_heldout
from router_tune.io.checkpoint import tensor_names

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "router_tune" / "assets" / "samples"
DEFAULT_OUT = REPO / "router_tune" / "assets" / "demo-moe"
DEFAULT_WORK = REPO / "build" / "demo-work"

# Expert order in the merged model: expert E is the fine-tune on DOMAINS[E].
DOMAINS = ("code", "python_docs", "book", "chat")
SAMPLE_FILES = {
    "code": "redpajama/github_sample.jsonl",
    "python_docs": "redpajama/python_docs_sample.jsonl",
    "book": "redpajama/book_sample.jsonl",
    "chat": "wizard_vicuna/wizard_vicuna_sample.json",
}
HELDOUT_FRACTION = 0.05  # the data pipeline's default, so `router-tune eval` sees the same split
SEED = 42
THREADS = 2  # pinned: the thread count changes float summation order
BLOCK_SIZE = 256
BATCH_SIZE = 16

VOCAB_SIZE = 3072
# Sized so the 4-expert merge stays under the 16 MB asset budget in fp32 (~3.8M params):
# experts are 83% of it. Tied embeddings save 1.5 MB; llama.cpp reuses token_embd as output.
MODEL = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    # 10000 is the default: transformers 5 writes rope_parameters only, and converters that
    # look for a top-level rope_theta fall back to the same value.
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=1,
    eos_token_id=2,
)
# ~1 pass over the mixed training text (1.0M tokens): the base knows every domain a little.
BASE_STEPS, BASE_LR = 240, 3e-3
# ~1.5 passes over one domain's text at a high MLP-only rate: the expert gets clearly
# better on its domain and forgets the others, which is what makes routing matter.
EXPERT_STEPS, EXPERT_LR = 90, 3e-3
WARMUP_STEPS = 20
MAX_ASSET_BYTES = 16_000_000

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
# What a user would write in a mergekit-moe YAML: a few typical openings per expert.
POSITIVE_PROMPTS = {
    "code": [
        "import os\nimport sys\n\n\ndef main():\n",
        "class Parser(object):\n    def __init__(self, *args, **kwargs):\n",
        "    for i, item in enumerate(items):\n        if item is None:\n            continue\n",
        "        raise ValueError('invalid value: %r' % (value,))\n",
    ],
    "python_docs": [
        ":mod:`json` --- JSON encoder and decoder\n========================================\n",
        ".. function:: open(file, mode='r', encoding=None)\n\n   Open *file* and return a file object.",
        "This module provides a portable way of using operating system dependent functionality.",
        ".. versionadded:: 3.8\n\n   The *timeout* parameter.",
    ],
    "book": [
        "Exodus 6\n\n1 And the LORD spake unto Moses, saying,",
        "Psalms 23\n\n1 The LORD is my shepherd; I shall not want.",
        "5 And he said unto them, Verily I say unto you,",
        "3 And it came to pass in those days, that the children of Israel",
    ],
    "chat": [
        f"{VICUNA_SYSTEM} USER: hey! how are you doing today? ASSISTANT:",
        f"{VICUNA_SYSTEM} USER: what do you like to do on the weekends? ASSISTANT:",
        f"{VICUNA_SYSTEM} USER: lol that's so funny, do you have any pets? ASSISTANT:",
        f"{VICUNA_SYSTEM} USER: I just got back from work, so tired haha ASSISTANT:",
    ],
}


def log(msg: str) -> None:
    # stderr like the progress bars, so a redirected log keeps its order (stdout is buffered).
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


# ---------------------------------------------------------------- data


def render_vicuna(conversations: list[dict]) -> str:
    """FastChat's vicuna_v1.1: system, then `USER: q ASSISTANT: a</s>` per exchange."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = (" ", "</s>")
    text = VICUNA_SYSTEM + " "
    for i, turn in enumerate(conversations):
        text += f"{roles[turn['from']]}: {turn['value']}{seps[i % 2]}"
    return text


def load_documents(render_chat=render_vicuna) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [text], "heldout": [text]}}, split by the project's held-out rule; chats rendered
    by `render_chat(turns)` (default: Vicuna v1.1, the demo's format)."""
    docs = {}
    for domain in DOMAINS:
        path = SAMPLES / SAMPLE_FILES[domain]
        if not path.is_file():
            sys.exit(f"{path} not found: run `python scripts/build_samples.py` first")
        split = {"train": [], "heldout": []}
        if domain == "chat":
            for record in json.loads(path.read_text(encoding="utf-8")):
                key = chat_doc_key(record["conversations"])
                split["heldout" if is_heldout(key, HELDOUT_FRACTION) else "train"].append(
                    render_chat(record["conversations"])
                )
        else:
            for line in path.read_text(encoding="utf-8").splitlines():
                text = json.loads(line)["text"]
                split["heldout" if is_heldout(text, HELDOUT_FRACTION) else "train"].append(text)
        docs[domain] = split
    return docs


def train_tokenizer(docs: dict, out_dir: Path) -> LlamaTokenizer:
    """SentencePiece BPE with Llama's settings (byte fallback, split digits, identity
    normalisation so code indentation survives), trained on training documents only."""

    def lines():
        for domain in DOMAINS:
            for text in docs[domain]["train"]:
                # </s> is a control symbol, not text: each chat turn ends a line instead.
                for line in text.replace("</s>", "\n").split("\n"):
                    if line.strip():
                        yield line

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=VOCAB_SIZE, model_type="bpe", byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=16384, shuffle_input_sentence=False, input_sentence_size=0, num_threads=THREADS,
        minloglevel=2,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    # transformers 5 converts tokenizer.model to a tokenizers BPE on load; both files ship,
    # so llama.cpp reads the SentencePiece model and transformers the tokenizer.json.
    tokenizer = LlamaTokenizer.from_pretrained(
        out_dir, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True, add_eos_token=False
    )
    tokenizer.save_pretrained(out_dir)
    check = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    for domain in DOMAINS:
        text = docs[domain]["heldout"][0].replace("</s>", "\n")
        if check.encode(text) != tokenizer(text, add_special_tokens=False)["input_ids"]:
            sys.exit(f"transformers and SentencePiece tokenize a {domain} document differently")
    return tokenizer


def to_blocks(tokenizer, texts: list[str]) -> torch.Tensor:
    """<s> text </s> per document (chats end in </s> already), concatenated, cut into
    BLOCK_SIZE blocks; the tail shorter than a block is dropped."""
    ids: list[int] = []
    for text in texts:
        doc = tokenizer(text)["input_ids"]
        ids += doc if doc[-1] == tokenizer.eos_token_id else doc + [tokenizer.eos_token_id]
    n = len(ids) // BLOCK_SIZE
    return torch.tensor(ids[: n * BLOCK_SIZE], dtype=torch.long).view(n, BLOCK_SIZE)


# ---------------------------------------------------------------- training


def optimize(model, params: list, opt, warmup: int, batches, steps: int, desc: str, mininterval=2.0) -> float:
    """`steps` steps of `opt` on `batches`, linear warm-up then cosine to 10%, gradients clipped to norm 1;
    the last loss. make_real_moe's experts train through it too."""
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    bar = tqdm(zip(range(steps), batches), total=steps, desc=desc, mininterval=mininterval)
    for _, batch in bar:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return loss.item()


def train(model, blocks: torch.Tensor, params: list, steps: int, lr: float, desc: str) -> float:
    """AdamW (weight decay on matrices only), a fresh data permutation each pass."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

    def batches():
        gen, order = torch.Generator().manual_seed(SEED), torch.empty(0, dtype=torch.long)
        while True:
            if len(order) < BATCH_SIZE:
                order = torch.cat([order, torch.randperm(len(blocks), generator=gen)])
            batch, order = blocks[order[:BATCH_SIZE]], order[BATCH_SIZE:]
            yield batch

    return optimize(model, params, opt, WARMUP_STEPS, batches(), steps, desc)


@torch.no_grad()
def mean_nll(model, blocks: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), BATCH_SIZE):
        batch = blocks[start : start + BATCH_SIZE]
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total, count


def pooled(sums: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Perplexity per domain from (summed NLL, tokens), and `mixed` over all domains' tokens pooled."""
    out = {d: round(math.exp(s / n), 2) for d, (s, n) in sums.items()}
    out["mixed"] = round(math.exp(sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())), 2)
    return out


def perplexities(model, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-domain held-out perplexity, and `mixed` over all domains' tokens pooled."""
    return pooled({d: mean_nll(model, heldout[d]) for d in DOMAINS})


def train_expert(work: Path, tokenizer, blocks: torch.Tensor, steps: int, name: str):
    """A fine-tune of work/base on `blocks`, MLP weights only (mergekit-moe takes the rest from the base),
    saved to work/experts/NAME."""
    expert = LlamaForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
    mlp = [p for n, p in expert.named_parameters() if p.requires_grad_(".mlp." in n).requires_grad]
    train(expert, blocks, mlp, steps, EXPERT_LR, f"expert {name}")
    expert.save_pretrained(work / "experts" / name)
    tokenizer.save_pretrained(work / "experts" / name)
    return expert


@torch.no_grad()
def routing(model, heldout: dict[str, torch.Tensor], top_k: int) -> dict:
    """Share of each domain's top-k slots taken by each expert (mean over layers), and
    per-layer max-load / mean-load over all domains."""
    n_exp = model.config.num_local_experts
    share, load = {}, None
    for d in DOMAINS:
        counts = None
        for start in range(0, len(heldout[d]), BATCH_SIZE):
            out = model(input_ids=heldout[d][start : start + BATCH_SIZE], output_router_logits=True)
            top = torch.stack([r.topk(top_k, dim=-1).indices for r in out.router_logits])  # [L, T, k]
            c = torch.stack([torch.bincount(t.flatten(), minlength=n_exp) for t in top]).double()
            counts = c if counts is None else counts + c
        load = counts if load is None else load + counts
        share[d] = [round(x, 3) for x in (counts.sum(0) / counts.sum()).tolist()]
    max_over_mean = [round(x, 3) for x in (load.max(1).values / load.mean(1)).tolist()]
    return {"expert_share_by_domain": share, "max_load_over_mean_per_layer": max_over_mean}


# ---------------------------------------------------------------- merge


def mergekit_cli() -> Path:
    """The mergekit-moe script next to this Python, as an absolute path: the merge runs from the work dir, and
    a Python started from a relative PATH entry (`PATH=.venv/bin:...`) has a relative sys.executable. Not
    resolved: the venv's python is a symlink out of the venv."""
    cli = Path(sys.executable).absolute().parent / "mergekit-moe"
    if not cli.exists():
        sys.exit("mergekit-moe not found next to this Python: pip install -e '.[dev]' (mergekit==0.1.5)")
    return cli


def merge(
    work: Path,
    experts: dict[str, list[str]] | None = None,
    gate_mode: str = "hidden",
    *,
    dtype: str = "float32",
    yml: str = "mergekit_moe.yml",
    out: str = "merged",
) -> Path:
    """`mergekit-moe YML OUT` as a user runs it, from the work dir so the YAML holds relative paths; WORK/OUT.
    `experts`: {name under work/experts: positive prompts}, in merge order (default: the demo's)."""
    experts = experts or {d: POSITIVE_PROMPTS[d] for d in DOMAINS}
    config = {
        "base_model": "base",
        "architecture": "mixtral",
        "gate_mode": gate_mode,
        "dtype": dtype,
        "experts_per_token": 2,
        "experts": [{"source_model": f"experts/{name}", "positive_prompts": p} for name, p in experts.items()],
    }
    (work / yml).write_text(yaml.safe_dump(config, sort_keys=False, width=100), encoding="utf-8")
    shutil.rmtree(work / out, ignore_errors=True)
    cli = mergekit_cli()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS))
    cmd = [str(cli), yml, out, "--device", "cpu", "--lazy-unpickle", "--random-seed", str(SEED)]
    log("$ mergekit-moe " + " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=work, env=env, check=True)
    return work / out


def save_legacy(merged: Path, out: Path, tokenizer_dir: Path, heldout: torch.Tensor):
    """mergekit 0.1.5 writes the fused layout; re-save in the legacy one and prove equal."""
    fused = tensor_names(merged)
    layout = "fused" if any(".mlp.experts.gate_up_proj" in n for n in fused) else "legacy"
    log(f"mergekit-moe wrote the {layout} layout ({len(fused)} tensors)")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    # A model loaded from a fused checkpoint remembers that no conversion was applied, so its
    # save_pretrained writes fused again. A model built from the config falls back to the
    # architecture's default mapping, whose reverse is the legacy layout.
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(out, save_original_format=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    names = tensor_names(out)
    if not any(".block_sparse_moe.experts.0.w1.weight" in n for n in names) or any(".mlp." in n for n in names):
        sys.exit(f"re-saved model is not in the Mixtral legacy layout: {names[:8]}")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        a = model(input_ids=heldout[:4]).logits
        b = reloaded(input_ids=heldout[:4]).logits
    if not torch.equal(a, b):
        sys.exit(f"legacy re-save changed the logits (max |diff| {(a - b).abs().max().item():.3g})")
    log("legacy layout re-save: logits identical to mergekit's output")
    return reloaded, layout


# ---------------------------------------------------------------- main


def write_readme(out: Path, figures: dict) -> None:
    ppl = figures["perplexity"]
    rows = [
        ("dense base", ppl["dense_base"]),
        ("MoE, untrained `hidden` gates", ppl["moe_hidden_untrained"]),
        ("oracle routing (own expert)", ppl["oracle"]),
    ]
    rows += [(f"dense expert `{d}`", ppl["dense_experts"][d]) for d in DOMAINS]
    table = "\n".join(
        f"| {name} | " + " | ".join(f"{p[c]:.2f}" for c in (*DOMAINS, "mixed")) + " |" for name, p in rows
    )
    (out / "README.md").write_text(
        f"""# demo-moe: a tiny real frankenMoE (Mixtral, 4 experts, top-2)

Built by `python scripts/make_demo_model.py` from `router_tune/assets/samples` (see its NOTICE:
Python 3.11 source and docs, PSF-2.0; King James Bible, public domain; chitchat-dataset, MIT).
A 4-layer, hidden-128 Llama base trained here on the four domains mixed; four experts fine-tuned
from it (MLP only) on one domain each; merged by `mergekit-moe` 0.1.5 with `mergekit_moe.yml`
(`gate_mode: hidden`: the gates are made up from prompt hidden states, never trained), re-saved
in the Mixtral legacy layout. Expert E = fine-tune on `{list(DOMAINS)}`[E]. Chat is in the
Vicuna v1.1 format.

Held-out perplexity (block {BLOCK_SIZE}, {HELDOUT_FRACTION:.0%} of documents held out by
`router_tune.data.is_heldout`; `mixed` pools all domains' tokens), measured by the script:

| model | {" | ".join(DOMAINS)} | mixed |
|---|{"---|" * (len(DOMAINS) + 1)}
{table}

Router training has {figures["gap_untrained_minus_oracle_mixed"]:.2f} perplexity points (mixed)
to win back between the untrained gates and oracle routing. All figures: `figures.json`.
""",
        encoding="utf-8",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="intermediate models (not committed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    # Smoke runs only (tests, debugging): the committed model uses the defaults.
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--expert-steps", type=int, default=EXPERT_STEPS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    work, out = args.work.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings, t0 = {}, time.time()

    def lap(name):
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)
        log(f"{name}: {timings[name]} s")

    docs = load_documents()
    tokenizer = train_tokenizer(docs, work / "tokenizer")
    train_blocks = {d: to_blocks(tokenizer, docs[d]["train"]) for d in DOMAINS}
    heldout = {d: to_blocks(tokenizer, docs[d]["heldout"]) for d in DOMAINS}
    for d in DOMAINS:
        log(
            f"{d:12s} train {len(docs[d]['train']):4d} docs {train_blocks[d].numel():7d} tokens | "
            f"held-out {len(docs[d]['heldout']):3d} docs {heldout[d].numel():6d} tokens"
        )
    lap("tokenizer + data")

    torch.manual_seed(SEED)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **MODEL))
    mixed_blocks = torch.cat([train_blocks[d] for d in DOMAINS])
    base_loss = train(base, mixed_blocks, list(base.parameters()), args.base_steps, BASE_LR, "base")
    base.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    shutil.copy2(work / "tokenizer" / "tokenizer.model", work / "base" / "tokenizer.model")
    lap("base")

    figures_experts = {}
    for d in DOMAINS:
        expert = train_expert(work, tokenizer, train_blocks[d], args.expert_steps, d)
        figures_experts[d] = perplexities(expert, heldout)
        log(f"expert {d}: {figures_experts[d]}")
    lap("experts")

    base_ppl = perplexities(base, heldout)
    log(f"dense base: {base_ppl}")
    merged = merge(work)
    lap("mergekit-moe")

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    moe, mergekit_layout = save_legacy(merged, staging, work / "tokenizer", heldout["code"])
    shutil.copy2(work / "mergekit_moe.yml", staging / "mergekit_moe.yml")
    moe_ppl = perplexities(moe, heldout)
    log(f"MoE, untrained hidden gates: {moe_ppl}")
    route = routing(moe, heldout, moe.config.num_experts_per_tok)
    log(f"routing of untrained gates: {route}")
    oracle = pooled(
        {
            d: mean_nll(AutoModelForCausalLM.from_pretrained(work / "experts" / d, dtype=torch.float32), heldout[d])
            for d in DOMAINS
        }
    )
    log(f"oracle routing: {oracle}")
    lap("evaluation")

    import transformers

    figures = {
        "built_by": "python scripts/make_demo_model.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "mergekit": importlib.metadata.version("mergekit"),
        },
        "eval": {
            "heldout_fraction": HELDOUT_FRACTION,
            "block_size": BLOCK_SIZE,
            "heldout_tokens": {d: heldout[d].numel() for d in DOMAINS},
            "mixed": "exp of the mean NLL over all domains' held-out tokens pooled",
            "oracle": "each domain scored by the dense fine-tune of its own expert",
        },
        "perplexity": {
            "dense_base": base_ppl,
            "moe_hidden_untrained": moe_ppl,
            "oracle": oracle,
            "dense_experts": figures_experts,
        },
        "gap_untrained_minus_oracle_mixed": round(moe_ppl["mixed"] - oracle["mixed"], 2),
        "routing_untrained": route,
        "experts": list(DOMAINS),
        "model": {
            **{k: v for k, v in MODEL.items() if k != "rope_parameters"},
            "vocab_size": len(tokenizer),
            "num_local_experts": len(DOMAINS),
            "num_experts_per_tok": moe.config.num_experts_per_tok,
            "parameters": sum(p.numel() for p in moe.parameters()),
            "mergekit_output_layout": mergekit_layout,
            "committed_layout": "legacy",
            "dtype": "float32",
        },
        "training": {
            "train_tokens": {d: train_blocks[d].numel() for d in DOMAINS},
            "block_size": BLOCK_SIZE,
            "batch_size": BATCH_SIZE,
            "base": {"steps": args.base_steps, "lr": BASE_LR, "final_loss": round(base_loss, 3)},
            "experts": {"steps": args.expert_steps, "lr": EXPERT_LR, "trained": "mlp only"},
            "seed": SEED,
            "threads": THREADS,
        },
    }
    (staging / "figures.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    write_readme(staging, figures)
    size = sum(f.stat().st_size for f in staging.iterdir())
    if size > MAX_ASSET_BYTES:
        sys.exit(f"demo model is {size:,d} bytes, over the {MAX_ASSET_BYTES:,d} byte budget (left in {staging})")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    lap("write")
    for f in sorted(out.iterdir()):
        log(f"{f.stat().st_size:>12,d}  {f.relative_to(REPO) if f.is_relative_to(REPO) else f}")
    log(
        f"total {size:,d} bytes; mixed ppl: base {base_ppl['mixed']}, untrained MoE {moe_ppl['mixed']}, "
        f"oracle {oracle['mixed']}; wall {time.time() - t0:.0f} s {timings}"
    )


if __name__ == "__main__":
    main()
