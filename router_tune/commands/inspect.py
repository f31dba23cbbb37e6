"""`router-tune inspect MODEL`: what is in a MoE checkpoint, and are its routers sane.

    router-tune inspect path/to/frankenmoe            # aligned plain-text report
    router-tune inspect org/model --json              # the same data as a stable JSON dict

The report itself is `router_tune.routing.inspection.inspect_model`; this module parses the
arguments and prints it.
"""

from __future__ import annotations

import argparse
import json
import math

from router_tune.routing.inspection import inspect_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Train memory is an estimate for one 2048-token sequence: frozen weights in their dtype + "
        "routers as fp32 masters, fp32 router gradients and Adam states, and every layer's "
        "activations (see router_tune.model.memory.training_memory for the formula)."
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id")
    parser.add_argument(
        "--sample-text",
        metavar="FILE",
        help="text to route for the routing statistics "
        "(default: the package's sample if shipped, else a built-in paragraph)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--tokenizer",
        metavar="DIR_OR_HUB_ID",
        help="the tokenizer for the sample-text routing statistics, when the checkpoint has none",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin weights (can run code)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        metavar="N",
        help="route at most N tokens of the sample text (default 512)",
    )


def run(args: argparse.Namespace) -> int:
    report = inspect_model(
        args.model,
        sample_text=args.sample_text,
        max_tokens=args.max_tokens,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        tokenizer=args.tokenizer,
    )
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _twins_note(report: dict) -> str:
    t = report["twins"]
    found = t["description"] if t["method"] == "output cosine" else "bit-identical weights (no sample text routed)"
    return (
        f"twins: {found}; max/mean: busiest expert's share over the mean (MaxVio = max/mean - 1), "
        "within: worst twin group, across: with each group's tokens split evenly among its members"
    )


def render_text(report: dict) -> str:
    """The aligned plain-text table printed by `router-tune inspect`."""
    m, p, mem = report["model"], report["parameters"], report["memory"]
    norm = "renormalised" if m["normalizes_topk"] else "not renormalised (norm_topk_prob=False)"
    sample = report["sample"]
    head = [
        ("Model", f"{m['source']}"),
        ("Architecture", f"{m['model_class']} ({m['architecture']}), {m['layout']} layout, {m['dtype']}"),
        *([("Computed in", f"{m['computed_in']}: {m['dtype_note']}")] if m.get("dtype_note") else []),
        ("Layers", f"{m['num_layers']}, of which MoE: {len(m['moe_layers'])}"),
        ("Experts", f"{m['num_experts']} per MoE layer, top-{m['top_k']}, top-k weights {norm}"),
        ("Parameters", f"{p['total']:,} total, {p['trainable']:,} trainable with routers only ({p['percent']:.4f}%)"),
        (
            "Train memory",
            f"~{_size(mem['total_bytes'])} for one {mem['seq_len']}-token sequence: weights "
            f"{_size(mem['weights_bytes'])}, router grads + Adam "
            f"{_size(mem['gradients_bytes'] + mem['adam_bytes'])}, activations "
            f"{_size(mem['activations_bytes'])}",
        ),
        (
            "Quantized",
            "; ".join(
                f"{mode}: weights {_size(q['weights_bytes'])}, peak ~{_size(q['total_bytes'])}"
                for mode, q in report["memory_quantized"].items()
            )
            + f" (quantize: nf4 | int8, activation checkpointing, {mem['seq_len']} tokens)",
        ),
        ("Sample text", f"{sample['source']} ({sample['tokens']} tokens)" if sample else "none (no tokenizer)"),
    ]
    width = max(len(k) for k, _ in head)
    lines = [f"{k:<{width}}  {v}" for k, v in head] + [""]
    cols = [
        "layer",
        "router norm mean/min/max",
        "top-1 prob",
        "H(tok)",
        "load per expert",
        "max/mean all/within/across",
    ]
    cols += ["twins", "identical experts"]
    rows = []
    for ly in report["layers"]:
        n = ly["router_norm"]
        rows.append(
            [
                str(ly["layer"]),
                f"{n['mean']:.3f} / {n['min']:.3f} / {n['max']:.3f}",
                f"{ly['top1_prob']:.3f}" if "top1_prob" in ly else "-",
                f"{ly['entropy']:.3f}" if "entropy" in ly else "-",
                " ".join(f"{x:.2f}" for x in ly["load"]) if "load" in ly else "-",
                f"{ly['max_load']:.2f} / {ly['within_max_load']:.2f} / {ly['across_max_load']:.2f}"
                if "max_load" in ly
                else "-",
                "; ".join(",".join(map(str, g)) for g in ly["twin_groups"] if len(g) > 1) or "-",
                "; ".join(",".join(map(str, g)) for g in ly["identical_experts"]) or "-",
            ]
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for r in [cols] + rows:
        lines.append(
            "  ".join(x.rjust(w) if i == 0 else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))).rstrip()
        )
    lines += [
        "",
        f"H(tok): mean entropy of each token's routing distribution in nats, as train and eval report it "
        f"(ln {m['num_experts']} = {math.log(m['num_experts']):.3f} = uniform, 0 = saturated); "
        "load: share of top-k slots",
        _twins_note(report),
        "",
        "Findings",
    ]
    lines += [f"  - {f}" for f in report["findings"]]
    return "\n".join(lines)
