"""`router-tune eval MODEL`: held-out perplexity and routing report, optionally against another model.

    router-tune eval runs/demo                      # the run vs its source model, into runs/demo/eval
                                                    # (eval-2, ... when a report is there: reports are never replaced)
    router-tune eval tuned-model --compare source-model --data recipes/demo.yaml --out report
    router-tune eval MODEL --data a.jsonl chats.json --max-blocks 16

The evaluation itself is router_tune.evaluation; this module is the command line around it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields as dc_fields
from pathlib import Path

import torch

from router_tune.data import build_eval_blocks, check_block_size, parse_sources
from router_tune.data.sources import sources_from_files
from router_tune.errors import RouterTuneError
from router_tune.evaluation.evaluate import (
    DEFAULT_SAMPLES,
    check_same_tokenizer,
    evaluate_model,
    evaluate_oracle,
    is_run_dir,
    load_for_eval,
    tokenizer_of,
)
from router_tune.evaluation.report import REPORT_JSON, format_comparison, write_report
from router_tune.io.router_files import read_trained_routers
from router_tune.training.config import RouterTuneConfig, load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "--data takes one recipe YAML (its datasets, block_size, eval_fraction, eval_max_blocks) or data files "
        "and directories, each one source named after the file: *.jsonl is RedPajama-style text (a `text` "
        "field), *.json is Wizard-Vicuna chats (`conversations`, Vicuna v1.1 template); a directory is typed "
        "by the files in it. Default: the run's recipe when MODEL is a run, else the bundled samples. "
        "Only held-out documents (the same split training uses) are evaluated."
    )
    parser.add_argument(
        "model", metavar="MODEL", help="model directory or hub id, or a router_tune run / checkpoint-N directory"
    )
    parser.add_argument(
        "--compare",
        metavar="OTHER",
        help="the reference model (report name `before`; MODEL is `after`), evaluated on the same "
        "blocks. Default for a run: its source model",
    )
    parser.add_argument("--no-compare", action="store_true", help="evaluate MODEL alone, even when it is a run")
    parser.add_argument("--data", nargs="+", metavar="RECIPE_OR_FILES", help="recipe YAML or data files / dirs")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="report directory, refused if it holds a report (default: MODEL/eval for a run, else "
        "./eval-report; eval-2, eval-3, ... when taken)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the report in --out (or the default directory) instead of refusing / writing a new one",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="tokens per block (default: the recipe's, else 1024 or the model's maximum when smaller)",
    )
    parser.add_argument(
        "--max-blocks",
        type=int,
        metavar="N",
        help="held-out blocks per source (default: the recipe's eval_max_blocks, else 64)",
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="blocks per forward pass (8)")
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEV",
        help="where the model is loaded and evaluated: cpu (default), cuda, cuda:N, mps, or auto (split over "
        "all GPUs with device_map='auto', for models larger than one device)",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        metavar="F",
        help="share of documents held out; must "
        "equal the training run's to evaluate on unseen data (default: the recipe's, else 0.05)",
    )
    parser.add_argument(
        "--oracle",
        metavar="SOURCE=EXPERT,...",
        type=_oracle_mapping,
        help="also measure oracle routing: each source sent to its own expert (e.g. "
        "code=0,python_docs=1,book=2,chat=3 for the demo), the bound router training approaches",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="DIR_OR_HUB_ID",
        help="the tokenizer, when the checkpoint has none "
        "(default: the run's tokenizer_name_or_path, else the checkpoint's own)",
    )
    parser.add_argument(
        "--quantize",
        choices=("nf4", "int8"),
        help="evaluate with the frozen weights quantized as in a quantized training run (MODEL and OTHER). "
        "Default: full precision, the model export writes and users deploy",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (can run code)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")


def _oracle_mapping(text: str) -> dict[str, int]:
    try:
        return {source: int(expert) for source, expert in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SOURCE=EXPERT pairs separated by commas, got {text!r}") from None


def eval_device_map(device: str) -> str:
    """The `device_map` for `--device`, checked before any weight loads: a device that does not
    exist here is an error, not a silent CPU run."""
    if device == "auto":
        if not torch.cuda.is_available():
            raise RouterTuneError(
                "--device auto splits the model over GPUs, and this machine has none: use --device cpu."
            )
        return "auto"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RouterTuneError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N, mps or auto.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise RouterTuneError(f"--device {device}: no {dev.type} device on this machine; use --device cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RouterTuneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices.")
    return str(dev)


def _recipe_defaults() -> dict:
    keys = ("block_size", "eval_fraction", "eval_max_blocks")
    return {f.name: f.default for f in dc_fields(RouterTuneConfig) if f.name in keys}


def eval_settings(args: argparse.Namespace, run_recipe: dict | None, max_positions: int | None) -> dict:
    """datasets, block_size, eval_fraction, max_blocks: flags > recipe (--data or the run's) > defaults."""
    recipe: dict = {}
    if args.data and any(d.endswith(RECIPE_SUFFIXES) for d in args.data):
        if len(args.data) != 1:
            raise RouterTuneError("--data takes either one recipe YAML or data files, not both.")
        config = load_recipe(args.data[0])
        recipe = {k: getattr(config, k) for k in ("datasets", *_recipe_defaults())}
        if not recipe["datasets"]:
            raise RouterTuneError(f"recipe {args.data[0]} has no `datasets` to evaluate on.")
    elif args.data:
        recipe = {"datasets": sources_from_files(args.data)}
    elif run_recipe:
        recipe = {k: run_recipe[k] for k in ("datasets", *_recipe_defaults()) if run_recipe.get(k) is not None}
    defaults = _recipe_defaults()
    if "block_size" not in recipe and max_positions:
        defaults["block_size"] = min(defaults["block_size"], max_positions)
    settings = {**defaults, "datasets": DEFAULT_SAMPLES, **recipe}
    for flag, key in (
        ("block_size", "block_size"),
        ("eval_fraction", "eval_fraction"),
        ("max_blocks", "eval_max_blocks"),
    ):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if settings["eval_max_blocks"] is not None and settings["eval_max_blocks"] < 1:
        raise RouterTuneError(f"--max-blocks must be at least 1, got {settings['eval_max_blocks']}.")
    return settings


def run(args: argparse.Namespace) -> int:
    device_map = eval_device_map(args.device)
    trained = read_trained_routers(args.model) if is_run_dir(args.model) else None
    out = report_dir(args, trained is not None)
    compare = None if args.no_compare else args.compare or (str(trained.source_dir()) if trained else None)
    if compare is not None:  # fail on a missing model or a tokenizer mismatch before any long evaluation
        check_same_tokenizer(
            tokenizer_of(args.model, args.trust_remote_code, args.tokenizer),
            tokenizer_of(compare, args.trust_remote_code, args.tokenizer),
            args.model,
            compare,
        )
    quantize = args.quantize or "none"
    load = dict(
        quantize=quantize,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
        device_map=device_map,
    )
    model, tokenizer, info, label = load_for_eval(args.model, **load)
    settings = eval_settings(
        args, (trained.meta.get("recipe") if trained else None), getattr(model.config, "max_position_embeddings", None)
    )
    check_block_size(settings["block_size"], model.config)
    blocks = build_eval_blocks(
        parse_sources(settings["datasets"]),
        tokenizer,
        settings["block_size"],
        eval_fraction=settings["eval_fraction"],
        max_blocks=settings["eval_max_blocks"],
    )
    print(
        f"router-tune eval: {sum(map(len, blocks.values()))} held-out blocks of {settings['block_size']} tokens "
        f"({', '.join(f'{s}: {len(b)}' for s, b in blocks.items())})"
    )
    top_k, dtype = info.top_k, info.dtype
    stored = info.stored_dtype if info.dtype_note else None  # computed in another dtype than stored
    result = evaluate_model(model, blocks, top_k=top_k, batch_size=args.batch_size, label=label, stored_dtype=stored)
    oracle = (
        evaluate_oracle(model, blocks, args.oracle, top_k=top_k, batch_size=args.batch_size) if args.oracle else None
    )
    del model, info  # one model in memory at a time (MoeInfo holds references to the router modules)
    results = {"model": result}
    if compare is not None:
        # Same weights dtype as MODEL, so the comparison measures routing, not precision (a run
        # still loads in its own recipe's dtype).
        other, _, _, other_label = load_for_eval(compare, dtype=dtype, **load)
        results = {
            "before": evaluate_model(
                other, blocks, top_k=top_k, batch_size=args.batch_size, label=other_label, stored_dtype=stored
            ),
            "after": result,
        }
        del other
    step = trained.meta.get("global_step") if trained else None
    meta = {"global_step": step} if step is not None else {}
    trained_on = (trained.meta.get("quantization") or {}).get("mode") if trained else None
    meta["weights"] = (
        f"{quantize}-quantized (bitsandbytes), as in quantized training"
        if quantize != "none"
        else "full precision, as exported"
        + (f" (routers trained against an {trained_on}-quantized base)" if trained_on else "")
    )
    if stored is not None:
        name = str(stored).removeprefix("torch.")
        meta["weights"] += (
            f"; {name} weights as stored, computed in {str(dtype).removeprefix('torch.')} on this CPU (no fast "
            f"{name} matmul), routers rounded to {name} as the export stores them"
        )
    if oracle:
        meta["oracle"] = oracle
    report = write_report(out, results, title=f"router_tune evaluation: {args.model}", meta=meta)
    print(format_comparison(results))
    if oracle:
        print(format_oracle(results, oracle))
    figures = json.loads(report.read_text())["figures"]
    print(
        f"\nreport: {report.parent / 'report.md'}\n        {report}\nfigures: "
        + ", ".join(str(report.parent / f) for f in figures)
    )
    return 0


def report_dir(args: argparse.Namespace, is_run: bool) -> Path:
    """Where the report goes, never over an earlier one unless --force: an --out that holds a report is
    refused (as export refuses an existing --out); the default directory (a run's eval/, ./eval-report)
    becomes eval-2, eval-3, ... when taken."""
    if args.out:
        out = Path(args.out)
        if (out / REPORT_JSON).exists() and not args.force:
            raise RouterTuneError(
                f"{out} already holds a report ({out / REPORT_JSON}); choose another --out or pass --force to "
                "replace it."
            )
        return out
    base = Path(args.model) / "eval" if is_run else Path("eval-report")
    out, n = base, 1
    while (out / REPORT_JSON).exists() and not args.force:
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    if out != base:
        print(f"router-tune eval: {base} holds an earlier report (kept); this one goes to {out} (--force replaces it)")
    return out


def format_oracle(results: dict, oracle: dict) -> str:
    """Oracle perplexities and, with a before/after pair, the share of the gap router training closed."""
    lines = [
        "oracle routing (each source to its own expert): "
        + ", ".join(f"{s} {p:.2f}" for s, p in oracle["perplexity"].items())
    ]
    if "before" in results and "after" in results:
        before, after = results["before"].perplexity["overall"], results["after"].perplexity["overall"]
        best = oracle["perplexity"]["overall"]
        if before > best:
            lines.append(
                f"router training closed {100 * (before - after) / (before - best):.0f}% of the gap from "
                f"{before:.2f} (before) to the oracle's {best:.2f}: now {after:.2f}"
            )
    return "\n".join(lines)
