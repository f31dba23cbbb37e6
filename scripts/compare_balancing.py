"""Balancing counts per step (`aux_loss_reduce: global`) vs from the previous step (`global_prev`), on the demo.

    python -m scripts.compare_balancing [--steps 500] [--batchings 8x1 2x4] [--out bench]

Trains the demo's routers with recipes/demo.yaml for each mode, as the recipe batches (8 blocks) and as
large models are trained (2 blocks x 4 accumulation steps, the same tokens per step); reports held-out
perplexity, the share of the gap to oracle routing closed, per-layer max-load / mean and dead experts.
Writes OUT/balancing.json and OUT/balancing.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from scripts import harness

BATCHINGS = {"8x1": (8, 1), "2x4": (2, 4)}
MODES = ("global", "global_prev")


def held_out_blocks(config):
    from router_tune.data import build_eval_blocks, load_tokenizer, parse_sources

    tokenizer = load_tokenizer(config.model_name_or_path)
    specs = parse_sources(config.datasets)
    return build_eval_blocks(
        specs, tokenizer, config.block_size, eval_fraction=config.eval_fraction, max_blocks=config.eval_max_blocks
    )


def train(mode: str, batching: str, steps: int, work: Path, blocks) -> dict:
    from router_tune import RouterTrainer
    from router_tune.evaluation.evaluate import evaluate_model

    batch, ga = BATCHINGS[batching]
    out = work / f"{mode}-{batching}"
    shutil.rmtree(out, ignore_errors=True)
    config = harness.recipe(
        harness.DEMO_RECIPE, aux_loss_reduce=mode, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
        max_steps=steps, output_dir=str(out),
    )  # fmt: skip
    trainer = RouterTrainer(args=config)
    trainer.train()
    r = evaluate_model(trainer.model, blocks, progress=False)
    max_load = [round(float(x), 4) for x in r.routing.max_load]
    return {"perplexity": r.perplexity, "max_load_per_layer": max_load, "dead_experts": int(r.routing.dead.sum())}


def run(args) -> dict:
    from router_tune import load_recipe
    from router_tune.evaluation.evaluate import evaluate_model, evaluate_oracle
    from router_tune.model.loading import load_moe

    if args.smoke:
        args.steps, args.batchings = 1, ["2x4"]
    origin = harness.provenance()
    config = load_recipe(harness.DEMO_RECIPE)
    blocks = held_out_blocks(config)
    model, _ = load_moe(config.model_name_or_path)
    before = evaluate_model(model, blocks, progress=False).perplexity["overall"]
    oracle = evaluate_oracle(model, blocks, harness.DEMO_ORACLE)["perplexity"]["overall"]
    del model
    runs = {}
    for batching in args.batchings:
        for mode in MODES:
            r = runs[f"{mode} {batching}"] = train(mode, batching, args.steps, args.work_dir, blocks)
            r["gap_closed"] = harness.gap_closed(before, r["perplexity"]["overall"], oracle)
            print(f"{mode} {batching}: {r['perplexity']['overall']:.2f} ({100 * r['gap_closed']:.1f}% of the gap)")
    return {
        "steps": args.steps,
        "batchings": args.batchings,
        "before": before,
        "oracle": oracle,
        "runs": runs,
        **origin,
    }


def render(d: dict) -> str:
    batchings = d.get("batchings") or sorted({name.split()[1] for name in d["runs"]}, key=list(BATCHINGS).index)
    lines = [
        "# Balancing counts: `global` vs `global_prev` on the demo",
        "",
        f"{harness.describe(d)}; `python -m scripts.compare_balancing --steps {d['steps']} --batchings "
        f"{' '.join(batchings)}`. recipes/demo.yaml, "
        "batch x accumulation as in the first column (same tokens per step); held-out mixed perplexity of the "
        f"deployed model: untrained (mergekit gates) {d['before']:.2f}, oracle routing {d['oracle']:.2f}.",
        "",
        "| mode, batch x accumulation | mixed perplexity | gap to oracle closed | max-load/mean per layer | dead |",
        "|---|---:|---:|---|---:|",
    ]
    for name, r in d["runs"].items():
        loads = " ".join(f"{x:.2f}" for x in r["max_load_per_layer"])
        lines.append(
            f"| {name} | {r['perplexity']['overall']:.2f} | {100 * r['gap_closed']:.1f}% | {loads} | "
            f"{r['dead_experts']} |"
        )
    return "\n".join(lines) + "\n"


def add_args(p) -> None:
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--work-dir", type=Path, default=harness.ROOT / "bench" / "work" / "balancing")
    p.add_argument("--batchings", nargs="+", choices=list(BATCHINGS), default=list(BATCHINGS))


if __name__ == "__main__":
    harness.main("balancing", __doc__, run, render, add_args)
