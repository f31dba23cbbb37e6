"""Balancing counts per step (`aux_loss_reduce: global`) vs from the previous step (`global_prev`), on the demo.

    python scripts/compare_balancing.py [--steps 500] [--batchings 8x1 2x4] [--out bench]

Trains the demo's routers with recipes/demo.yaml for each mode, once as the recipe batches
(8 blocks, no accumulation) and once as large models are trained (2 blocks x 4 accumulation
steps, the same tokens per step), and reports the held-out perplexity (the deployed model, as
`router-tune eval` measures it), the share of the gap to oracle routing closed, and per-layer
max-load / mean and dead experts after training. Writes OUT/balancing.json and OUT/balancing.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from provenance import describe, provenance

from router_tune import RouterTrainer, load_recipe
from router_tune.data import build_eval_blocks, load_tokenizer, parse_sources
from router_tune.evaluation.evaluate import evaluate_model, evaluate_oracle
from router_tune.model.loading import load_moe

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo.yaml"
ORACLE = {"code": 0, "python_docs": 1, "book": 2, "chat": 3}  # experts in mergekit_moe.yml order
BATCHINGS = {"8x1": (8, 1), "2x4": (2, 4)}


def held_out_blocks(config):
    tokenizer = load_tokenizer(config.model_name_or_path)
    return build_eval_blocks(
        parse_sources(config.datasets),
        tokenizer,
        config.block_size,
        eval_fraction=config.eval_fraction,
        max_blocks=config.eval_max_blocks,
    )


def train(mode: str, batching: str, steps: int, work: Path, blocks) -> dict:
    batch, ga = BATCHINGS[batching]
    out = work / f"{mode}-{batching}"
    shutil.rmtree(out, ignore_errors=True)
    config = load_recipe(
        RECIPE,
        aux_loss_reduce=mode,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        output_dir=str(out),
        eval_before_after=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = RouterTrainer(args=config)
    trainer.train()
    result = evaluate_model(trainer.model, blocks, progress=False)
    r = result.routing
    return {
        "perplexity": result.perplexity,
        "max_load_per_layer": [round(float(x), 4) for x in r.max_load],
        "dead_experts": int(r.dead.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work" / "balancing")
    parser.add_argument("--batchings", nargs="+", choices=list(BATCHINGS), default=list(BATCHINGS))
    args = parser.parse_args()
    origin = provenance()
    config = load_recipe(RECIPE)
    blocks = held_out_blocks(config)
    model, _ = load_moe(config.model_name_or_path)
    before = evaluate_model(model, blocks, progress=False).perplexity["overall"]
    oracle = evaluate_oracle(model, blocks, ORACLE)["perplexity"]["overall"]
    del model
    runs = {}
    for batching in args.batchings:
        for mode in ("global", "global_prev"):
            run = train(mode, batching, args.steps, args.work_dir, blocks)
            run["gap_closed"] = (before - run["perplexity"]["overall"]) / (before - oracle)
            runs[f"{mode} {batching}"] = run
            print(f"{mode} {batching}: {run['perplexity']['overall']:.2f} ({100 * run['gap_closed']:.1f}% of the gap)")
    summary = {"steps": args.steps, "before": before, "oracle": oracle, "runs": runs, **origin}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "balancing.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Balancing counts: `global` vs `global_prev` on the demo",
        "",
        f"{describe(origin)}; `python scripts/compare_balancing.py --steps {args.steps} --batchings "
        f"{' '.join(args.batchings)}`. recipes/demo.yaml, "
        "batch x accumulation as in the first column (same tokens per step); held-out mixed perplexity of the "
        f"deployed model: untrained (mergekit gates) {before:.2f}, oracle routing {oracle:.2f}.",
        "",
        "| mode, batch x accumulation | mixed perplexity | gap to oracle closed | max-load/mean per layer | dead |",
        "|---|---:|---:|---|---:|",
    ]
    for name, run in runs.items():
        loads = " ".join(f"{x:.2f}" for x in run["max_load_per_layer"])
        lines.append(
            f"| {name} | {run['perplexity']['overall']:.2f} | {100 * run['gap_closed']:.1f}% | {loads} | "
            f"{run['dead_experts']} |"
        )
    (args.out / "balancing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
