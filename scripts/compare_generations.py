"""python -m scripts.compare_generations BEFORE AFTER --out generations.md [--max-new-tokens 40]

Greedy generations of two checkpoints of one model (e.g. the mergekit merge and the export after router
training) for one fixed prompt per domain of the real demo, side by side in markdown (JSON beside it); each
model loaded with `AutoModelForCausalLM.from_pretrained`, fp32 on the CPU, chats in the tokenizer's template.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# One prompt per domain of recipes/demo-real.yaml, none of them in the bundled samples.
PROMPTS = {
    "code": 'def read_config(path):\n    """Read a JSON config file and return it as a dict."""\n',
    "python_docs": ":mod:`heapq` --- Heap queue algorithm\n=====================================\n\n",
    "book": "Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n2",
    "chat": "What is the capital of France?",
}
CHAT_DOMAINS = ("chat",)


def generate(model_dir: str, max_new_tokens: int) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False).eval()
    out = {}
    for domain, prompt in PROMPTS.items():
        if domain in CHAT_DOMAINS:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            new = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )[0, ids["input_ids"].shape[1] :]
        out[domain] = tokenizer.decode(new, skip_special_tokens=True)
    return out


def fenced(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="model directory: e.g. the merge as mergekit-moe wrote it")
    parser.add_argument("after", help="model directory: e.g. the exported model after router training")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write (JSON beside it)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    texts = {
        name: generate(path, args.max_new_tokens) for name, path in (("before", args.before), ("after", args.after))
    }
    lines = [
        f"# Greedy generations, {args.max_new_tokens} new tokens",
        "",
        f"- before: `{args.before}`",
        f"- after: `{args.after}`",
        "",
    ]
    for domain, prompt in PROMPTS.items():
        lines += [
            f"## {domain}",
            "",
            "Prompt" + (" (in the model's chat template)" if domain in CHAT_DOMAINS else "") + ":",
        ]
        lines += ["", fenced(prompt), "", "Before:", "", fenced(texts["before"][domain]), "", "After:", ""]
        lines += [fenced(texts["after"][domain]), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    args.out.with_suffix(".json").write_text(
        json.dumps({"prompts": PROMPTS, **texts, "max_new_tokens": args.max_new_tokens}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(f"generations of before and after in {args.out} ({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
