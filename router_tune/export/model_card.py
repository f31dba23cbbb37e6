"""The README.md written with every export: what changed, on which data, how well, how to use it.

Before/after figures come from the run's `eval/report.json` when it exists. The keys read
are `before` and `after` (dicts whose numeric leaves are metrics; nested dicts are flattened
as `perplexity/overall`), optionally `global_step` (the report is shown only when it matches
the exported routers' step), `headline` (the top-level metric groups shown, default
perplexity and balance: token counts and per-layer routing stay in the report itself),
`lower_is_better` and `higher_is_better` (metric-name prefixes that get a better/worse mark;
default: perplexity, ppl, loss, nll are lower-is-better), and `after.blocks` / `after.tokens` (the
held-out blocks and target tokens per source, written beside the table).

The card is titled after the source model, names local sources and data by absolute path, and shows
the recipe as router_tune's own keys plus the TrainingArguments that differ from transformers'
defaults (the run file keeps all of them).
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import yaml
from transformers import TrainingArguments

REPORT = Path("eval") / "report.json"
LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "nll")
HEADLINE = ("perplexity", "balance")
# TrainingArguments keys that describe the machine or the invocation, not the recipe
LOCAL_KEYS = ("output_dir", "logging_dir", "resume_from_checkpoint")

# What the verification of each format proved (export.verify, export.peft_adapter, exporter._check_delta).
VERIFIED = {
    "full": "The export was verified: every non-router tensor is byte-identical to the source's, every router "
    "equals the trained one in the stored dtype, config.json is the source's, and transformers loads it with no "
    "missing, unexpected or mismatched keys: it is the trained model, so it computes the trained model's logits.",
    "peft": "The adapter was verified: loaded with peft onto the source model, it computes the trained model's logits.",
    "routers": "The delta was verified: it reads back identical to the trained routers, fingerprints included.",
}


def read_report(run_dir: Path | None, global_step) -> dict | None:
    """The run's evaluation report, if it exists and describes these routers."""
    if run_dir is None or not (run_dir / REPORT).is_file():
        return None
    try:
        report = json.loads((run_dir / REPORT).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (
        not isinstance(report, dict)
        or not isinstance(report.get("before"), dict)
        or not isinstance(report.get("after"), dict)
    ):
        return None
    if report.get("global_step") is not None and global_step is not None and report["global_step"] != global_step:
        return None
    return report


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def figures_table(report: dict) -> str:
    groups = tuple(report.get("headline") or HEADLINE)
    before, after = (_flatten({k: v for k, v in report[side].items() if k in groups}) for side in ("before", "after"))
    lower = tuple(report.get("lower_is_better") or LOWER_IS_BETTER)
    higher = tuple(report.get("higher_is_better") or ())
    rows = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name in (n for n in before if n in after):
        b, a = before[name], after[name]
        change = f"{100 * (a - b) / abs(b):+.1f}%" if b else f"{a - b:+.4g}"
        direction = _direction(name, lower, higher)
        mark = "" if a == b or not direction else " (better)" if (a - b) * direction > 0 else " (worse)"
        rows.append(f"| {name} | {b:.4g} | {a:.4g} | {change}{mark} |")
    return "\n".join(rows)


def _direction(name: str, lower: tuple[str, ...], higher: tuple[str, ...]) -> int:
    """-1 when lower is better, +1 when higher is better, 0 when unknown (then no mark)."""
    parts = name.split("/")
    if any(p.startswith(lower) for p in parts):
        return -1
    return 1 if higher and any(p.startswith(higher) for p in parts) else 0


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _absolute(name: str) -> str:
    """A path that exists from here, made absolute (a relative one means nothing to a card's reader);
    anything else (a hub id) as is."""
    return str(Path(name).absolute()) if name and Path(name).exists() else name


def source_name(meta: dict, source_dir: Path | None = None) -> str:
    """The source model as a reader can find it: its hub id, else the absolute path of its directory."""
    source = str(meta.get("source_model") or "")
    if _is_hub_id(source):
        return source
    if source_dir is not None:
        return str(Path(source_dir).absolute())
    recorded = str(meta.get("source_dir") or "")
    return _absolute(recorded if recorded and Path(recorded).exists() else source) or "the source model"


def card_recipe(recipe: dict) -> dict:
    """router_tune's own keys, and the TrainingArguments keys whose value differs from transformers'
    default (a run file holds every one of ~170 fields), with local paths made absolute."""
    defaults = TrainingArguments().to_dict()
    shown = {
        key: value
        for key, value in recipe.items()
        if key not in defaults or (key not in LOCAL_KEYS and value != defaults[key])
    }
    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        if isinstance(shown.get(key), str):
            shown[key] = _absolute(shown[key])
    if isinstance(shown.get("datasets"), list):
        shown["datasets"] = [
            {**d, "path": _absolute(str(d["path"]))} if isinstance(d, dict) and "path" in d else d
            for d in shown["datasets"]
        ]
    return shown


def held_out_note(report: dict, block_size) -> str:
    """What the evaluation table was measured on: held-out blocks and target tokens per source."""
    blocks, tokens = report["after"].get("blocks") or {}, report["after"].get("tokens") or {}
    if not blocks:
        return ""
    size = f" of {block_size} tokens" if block_size else ""
    per_source = ", ".join(
        f"{name} {n} block{'s' if n != 1 else ''}"
        + (f" ({tokens[name]:,} target tokens)" if isinstance(tokens.get(name), int) else "")
        for name, n in blocks.items()
    )
    return f"Measured on {sum(blocks.values())} held-out blocks{size}, never trained on: {per_source}.\n"


def render(
    meta: dict,
    *,
    fmt: str,
    layout: str,
    here: str,
    report: dict | None,
    router_names: list[str],
    router_params: int,
    verified: bool,
    command: str,
    source_dir: Path | None = None,
) -> str:
    """The card's markdown. `here`: the export's directory name (what the usage snippets load);
    `source_dir`: the local source checkpoint the export was made from (and verified against)."""
    source = source_name(meta, source_dir)
    recipe = card_recipe(meta.get("recipe") or {})
    title = f"{source if _is_hub_id(source) else Path(source).name} with trained routers"
    head = {
        "library_name": "peft" if fmt == "peft" else "transformers",
        "tags": ["moe", "frankenmoe", "router-tune", str(meta.get("architecture", "moe"))],
    }
    if _is_hub_id(source):
        head["base_model"] = source
    what = {
        "full": "a complete checkpoint",
        "routers": "a router-only delta (apply it to the source model)",
        "peft": "a PEFT adapter holding the trained routers",
    }[fmt]
    parts = [
        f"---\n{yaml.safe_dump(head, sort_keys=True)}---\n",
        f"# {title}\n",
        f"`{source}` with its routers (the gates that pick experts in each MoE layer) trained by router_tune, "
        f"as {what}. Every other weight is byte-identical to the source"
        + (
            f" (expert tensors re-arranged from the {meta.get('layout')} layout)"
            if fmt == "full" and meta.get("layout") not in (None, layout)
            else ""
        )
        + ": only routing changed.\n",
        "## What changed\n",
        f"- Architecture: {meta.get('architecture')}, {len(meta.get('fingerprints') or [])} MoE layers x "
        f"{meta.get('num_experts')} experts, top-{meta.get('top_k')}",
        f"- Trained tensors: {len(router_names)} routing tensors, {router_params:,} parameters "
        f"(e.g. `{router_names[0]}`)"
        if router_names
        else "- Trained tensors: none",
        f"- Training steps: {meta.get('global_step')}",
        *_quantized_base(meta.get("quantization")),
        f"- On-disk expert layout: {layout}" + (" (what llama.cpp's converter reads)" if layout == "legacy" else ""),
        "",
    ]
    if report:
        parts += ["## Evaluation (held-out data, before -> after router training)\n", figures_table(report), ""]
        note = held_out_note(report, recipe.get("block_size"))
        if note:
            parts += [note]
        if report.get("weights"):
            parts += [f"Weights evaluated: {report['weights']}.\n"]
    datasets = recipe.get("datasets") or []
    if datasets:
        parts.append("## Training data\n")
        for d in datasets:
            extra = ", ".join(f"{k} {d[k]}" for k in ("weight", "template") if k in d)
            name = f" ({d['name']})" if d.get("name") else ""
            parts.append(f"- {d.get('source', '?')}{name}: `{d.get('path', '?')}`" + (f" ({extra})" if extra else ""))
        parts.append("")
    if recipe:
        parts += [
            "## Recipe\n",
            "router_tune's keys, and the TrainingArguments that differ from transformers' defaults:\n",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    parts += [
        "## How it was made\n",
        f"Routers trained and exported with router_tune {version('router-tune')}: `{command}`. "
        + (VERIFIED[fmt] if verified else "The export was written with --no-verify (not checked after writing)."),
        "",
        "## Use\n",
        _usage(fmt, source, layout, here),
    ]
    return "\n".join(parts) + "\n"


def _quantized_base(quantization: dict | None) -> list[str]:
    if not quantization:
        return []
    return [
        f"- Routers trained against an {quantization['mode']}-quantized base (bitsandbytes "
        f"{quantization.get('bitsandbytes')}, frozen experts and attention"
        + (" and LM head" if quantization.get("head") else "")
        + "); the weights here are the original full-precision ones, only the routers are new"
    ]


def _usage(fmt: str, source: str, layout: str, here: str) -> str:
    if fmt == "routers":
        return (
            "```bash\nrouter-tune apply " + source + " routers.safetensors --out merged-model\n```\n"
            "`apply` checks that the source's experts are the ones these routers were trained with."
        )
    if fmt == "peft":
        return (
            "```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{source}"), "{here}")\n'
            "model = model.merge_and_unload()  # optional: a plain transformers model\n```\n"
            "The routers are stored whole (`modules_to_save`); peft needs one LoRA target, so the adapter also "
            "holds a rank-1 LoRA on one attention projection whose factors are zero: it changes nothing."
        )
    gguf = (
        f"```bash\npython convert_hf_to_gguf.py {here} --outfile model-f16.gguf\n"
        "llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M\n```"
        if layout == "legacy"
        else "llama.cpp's converter reads only the legacy layout: re-export with `--layout legacy` for GGUF."
    )
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f'model = AutoModelForCausalLM.from_pretrained("{here}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{here}")\n```\n\nllama.cpp / GGUF:\n\n' + gguf
    )
