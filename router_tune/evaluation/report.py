"""The evaluation report: report.json, report.md and PNGs from one or more `EvalResult`s.

    write_report("runs/demo/eval", {"before": before, "after": after})   # -> runs/demo/eval/report.json
    print(format_comparison({"before": before, "after": after}))

With two results the second is compared with the first (or with `baseline`): deltas, relative
changes, per-layer routing before and after. report.json keys:
    title, models {name: what was evaluated}, figures [file names],
    lower_is_better [metric-name prefixes, read by model_card.py],
    <name>: EvalResult.to_dict() for each result (e.g. "before", "after"),
    comparison (two results only): baseline, candidate, perplexity/loss {source: {before, after,
        delta, relative_change}}, balance {max_load|maxvio|within_max_load|across_max_load|entropy|dead:
        {before, after, delta}}, routing {layers, max_load|maxvio|within_max_load|across_max_load|entropy|dead:
        {before, after, delta} per layer} (within / across: balance inside and between groups of twin
        experts, see routing/twins.py; present when both results have them),
    plus every key of `meta` (the trainer passes global_step).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.image import imsave

from router_tune.errors import RouterTuneError
from router_tune.evaluation.evaluate import EvalResult
from router_tune.routing.plots import plot_source_expert, plot_usage_start_end, render_usage_heatmap

REPORT_JSON, REPORT_MD = "report.json", "report.md"
# Metric-name prefixes where a decrease is an improvement (model_card.py marks better / worse).
LOWER_IS_BETTER = ("perplexity", "loss", "max_load", "maxvio", "within_max_load", "across_max_load", "dead")
# Per-layer routing metrics compared: RoutingSummary attribute -> report name.
LAYER_METRICS = {"max_load": "max_load", "token_entropy": "entropy", "dead": "dead"}


def _pair(before: float, after: float) -> dict[str, float]:
    return {
        "before": before,
        "after": after,
        "delta": after - before,
        "relative_change": (after - before) / before if before else None,
    }


def _ordered(results: Mapping[str, EvalResult], baseline: str | None) -> tuple[str, str]:
    if len(results) != 2:
        raise RouterTuneError(f"a comparison needs exactly two results, got {len(results)}: {', '.join(results)}.")
    names = list(results)
    if baseline is None:
        return names[0], names[1]
    if baseline not in results:
        raise RouterTuneError(f"baseline {baseline!r} is not one of the results ({', '.join(names)}).")
    return baseline, next(n for n in names if n != baseline)


def comparison(results: Mapping[str, EvalResult], baseline: str | None = None) -> dict:
    """Deltas of the candidate against the baseline (see the module docstring for the keys)."""
    base, cand = _ordered(results, baseline)
    b, a = results[base], results[cand]
    if list(b.perplexity) != list(a.perplexity):
        raise RouterTuneError(
            f"{base} and {cand} were evaluated on different sources "
            f"({list(b.perplexity)} vs {list(a.perplexity)}): evaluate both on the same blocks."
        )
    if b.routing.layers != a.routing.layers:
        raise RouterTuneError(f"{base} and {cand} have different MoE layers: they are not the same architecture.")
    routing: dict = {"layers": list(b.routing.layers)}
    for attr, name in LAYER_METRICS.items():
        x, y = np.asarray(getattr(b.routing, attr)), np.asarray(getattr(a.routing, attr))
        routing[name] = {"before": x.tolist(), "after": y.tolist(), "delta": (y - x).tolist()}
    lb, la = b.layer_balance(), a.layer_balance()
    for name in (n for n in lb if n in la and n != "max_load"):
        x, y = np.asarray(lb[name]), np.asarray(la[name])
        routing[name] = {"before": x.tolist(), "after": y.tolist(), "delta": (y - x).tolist()}
    bb, ab = b.balance(), a.balance()
    return {
        "baseline": base,
        "candidate": cand,
        "perplexity": {s: _pair(b.perplexity[s], a.perplexity[s]) for s in b.perplexity},
        "loss": {s: _pair(b.loss[s], a.loss[s]) for s in b.loss},
        "balance": {k: {"before": bb[k], "after": ab[k], "delta": ab[k] - bb[k]} for k in bb if k in ab},
        "routing": routing,
    }


def _pct(before: float, after: float) -> str:
    return f"{100 * (after - before) / before:+.1f}%" if before else "n/a"


def _perplexity_rows(results: Mapping[str, EvalResult], base: str | None, cand: str | None) -> list[list[str]]:
    first = next(iter(results.values()))
    rows = []
    for source in first.perplexity:
        row = [source, f"{first.tokens.get(source, 0):,}"] + [f"{r.perplexity[source]:.3f}" for r in results.values()]
        if base is not None:
            x, y = results[base].perplexity[source], results[cand].perplexity[source]
            row += [f"{y - x:+.3f}", _pct(x, y)]
        rows.append(row)
    return rows


def _grouped(results: Mapping[str, EvalResult]) -> bool:
    """Every result knows its twin groups: the layer table shows balance within and across them."""
    return all(r.routing.expert_groups for r in results.values())


def _layer_rows(results: Mapping[str, EvalResult]) -> list[list[str]]:
    first = next(iter(results.values()))
    balance = {name: r.layer_balance() for name, r in results.items()}
    grouped = ("within_max_load", "across_max_load") if _grouped(results) else ()
    rows = []
    for i, layer in enumerate(first.routing.layers):
        row = [f"L{layer}"]
        for attr, fmt in (("max_load", "{:.2f}"), ("token_entropy", "{:.3f}"), ("dead", "{:d}")):
            row += [
                fmt.format(int(v) if attr == "dead" else float(v))
                for v in (np.asarray(getattr(r.routing, attr))[i] for r in results.values())
            ]
        for key in grouped:
            row += [f"{balance[name][key][i]:.2f}" for name in results]
        rows.append(row)
    return rows


def _layer_header(results: Mapping[str, EvalResult]) -> list[str]:
    metrics = ["max/mean", "H(tok)", "dead"] + (["within twins", "across twins"] if _grouped(results) else [])
    return ["layer"] + [f"{metric} {n}" for metric in metrics for n in results]


def _twins_note(results: Mapping[str, EvalResult]) -> str:
    """What the twin columns mean, and which experts are twins (from the first result)."""
    first = next(iter(results.values()))
    if not _grouped(results) or first.twins is None:
        return ""
    twins = [
        f"L{layer} " + " ".join("{" + ",".join(map(str, g)) + "}" for g in groups if len(g) > 1)
        for layer, groups in zip(first.routing.layers, first.routing.expert_groups)
        if any(len(g) > 1 for g in groups)
    ]
    return (
        f"twins: {first.twins.describe()}; {'; '.join(twins) if twins else 'none found'}. within twins: the worst "
        "twin group's max/mean (1 = twins share evenly); across twins: max/mean with each group's tokens split "
        "evenly among its members. MaxVio = max/mean - 1."
    )


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


def _tables(results: Mapping[str, EvalResult], baseline: str | None, markdown: bool) -> tuple[str, str]:
    names = list(results)
    base, cand = _ordered(results, baseline) if len(results) == 2 else (None, None)
    ppl_header = ["source", "target tokens"] + names + (["delta", "change"] if base else [])
    return (
        _table(ppl_header, _perplexity_rows(results, base, cand), markdown),
        _table(_layer_header(results), _layer_rows(results), markdown),
    )


def format_comparison(results: Mapping[str, EvalResult], baseline: str | None = None) -> str:
    """The console table: perplexity per source (with delta and % change for two results) and
    per-layer routing (max/mean load: 1 = balanced; H(tok): routing entropy in nats; dead experts)."""
    ppl, layers = _tables(results, baseline, markdown=False)
    return (
        "held-out perplexity of the deployed model (lower is better)\n"
        + ppl
        + _fp32_routers_note(results)
        + "\n\nrouting per MoE layer\n"
        + layers
        + (f"\n{note}" if (note := _twins_note(results)) else "")
    )


def _fp32_routers_note(results: Mapping[str, EvalResult]) -> str:
    """What the figures are: routers as exported (model dtype, stock forward); the fp32-logit figures beside."""
    fp32 = {n: r.perplexity_fp32_routers for n, r in results.items() if r.perplexity_fp32_routers}
    if not fp32:
        return "\n(routers and model in fp32: the deployed model computes exactly as training did)"
    figures = ", ".join(f"{n} {p['overall']:.3f}" for n, p in fp32.items())
    return (
        "\n(deployed: routers rounded to the model's dtype, the architecture's own forward, as the export runs; "
        f"with fp32 router logits, as training computes them, overall: {figures})"
    )


def _source_expert_md(result: EvalResult) -> str:
    r = result.routing
    header = ["source"] + [f"e{e}" for e in range(r.num_experts)]
    rows = [[name] + [f"{100 * v:.1f}" for v in np.asarray(r.source_load)[i]] for i, name in enumerate(r.sources)]
    return _table(header, rows, markdown=True)


def write_figures(out_dir: Path, results: Mapping[str, EvalResult], baseline: str | None = None) -> list[str]:
    """source_expert_<name>.png per result, and usage_<baseline>_vs_<candidate>.png (two results) or
    usage_<name>.png (one); returns the file names."""

    names = []
    for name, result in results.items():
        names.append(plot_source_expert(result.routing, out_dir / f"source_expert_{name}.png").name)
    if len(results) == 2:
        base, cand = _ordered(results, baseline)
        path = out_dir / f"usage_{base}_vs_{cand}.png"
        names.append(
            plot_usage_start_end(
                results[base].routing, results[cand].routing, path, start_label=base, end_label=cand
            ).name
        )
    else:
        for name, result in results.items():
            imsave(out_dir / f"usage_{name}.png", render_usage_heatmap(result.routing, title=f"{name}: expert usage"))
            names.append(f"usage_{name}.png")
    return names


def write_report(
    out_dir: str | Path,
    results: Mapping[str, EvalResult],
    *,
    title: str = "router_tune evaluation",
    baseline: str | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Write report.json, report.md and the PNGs into `out_dir` (created); returns report.json's path.

    Args:
        results: {name: EvalResult}; names become report.json keys and file names (e.g. before/after).
        baseline: the reference of a two-result comparison (default: the first result).
        meta: extra top-level report.json keys, e.g. {"global_step": 150} (model cards check it);
            `weights` (what precision the models ran in) is also printed in report.md.
    """
    if not results:
        raise RouterTuneError("write_report needs at least one EvalResult.")
    bad = [n for n in results if not n or "/" in n or n in ("comparison", "models", "figures", "title")]
    if bad:
        raise RouterTuneError(f"result names {bad} cannot be used: pick plain names like before / after.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(out, results, baseline)
    data: dict = {
        "title": title,
        "models": {n: r.model for n, r in results.items()},
        "figures": figures,
        "lower_is_better": list(LOWER_IS_BETTER),
        **dict(meta or {}),
    }
    data.update({n: r.to_dict() for n, r in results.items()})
    if len(results) == 2:
        data["comparison"] = comparison(results, baseline)
    (out / REPORT_JSON).write_text(json.dumps(data, indent=2) + "\n")
    (out / REPORT_MD).write_text(_markdown(title, results, baseline, figures, (meta or {}).get("weights")))
    return out / REPORT_JSON


def _markdown(
    title: str, results: Mapping[str, EvalResult], baseline: str | None, figures: list[str], weights: str | None
) -> str:
    ppl, layers = _tables(results, baseline, markdown=True)
    first = next(iter(results.values()))
    parts = [f"# {title}\n", "Models:\n"]
    parts += [f"- **{name}**: {r.model or '(unnamed)'}" for name, r in results.items()]
    parts += [
        "",
        *([f"Weights evaluated: {weights}.\n"] if weights else []),
        f"Held-out data: {', '.join(f'{s} ({n} blocks)' for s, n in first.blocks.items())}; "
        f"{first.routing.tokens:,} real tokens routed per model, {first.routing.num_experts} experts, "
        f"top-{first.routing.top_k}.\n",
        "## Perplexity (held-out, token-weighted; lower is better)\n",
        ppl,
        _fp32_routers_note(results).strip(),
        "",
        "## Routing per MoE layer\n",
        "max/mean: the busiest expert's share over the mean share (1 = balanced, E = one expert takes "
        "all); H(tok): mean entropy of each token's routing distribution in nats (0 = saturated); "
        "dead: experts never selected.\n",
        layers,
        "",
        *([_twins_note(results), ""] if _twins_note(results) else []),
    ]
    for name, result in results.items():
        parts += [
            f"## Source x expert share: {name}\n",
            "% of each source's top-k selections per expert, averaged over layers.\n",
            _source_expert_md(result),
            "",
        ]
    parts += ["## Figures\n"] + [f"![{f}]({f})" for f in figures]
    return "\n".join(parts) + "\n"
