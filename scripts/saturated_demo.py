"""Router training from saturated mergekit `random` gates, with and without router rescaling.

    python scripts/saturated_demo.py [--steps 150] [--out build/saturated]

mergekit's `gate_mode: random` fills every gate with torch.randn: rows of norm ~sqrt(H), a
one-hot softmax, and (almost) no gradient for the router. This script makes that variant of
the demo frankenMoE (same experts, gates drawn exactly as mergekit draws them), trains its
routers with recipes/demo.yaml twice for the same number of steps, `router_rescale: off`
and `auto`, and writes the held-out figures to OUT/saturated.json and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from provenance import provenance
from safetensors.torch import load_file, save_file

from router_tune import RouterTrainer, load_recipe

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "router_tune" / "assets" / "demo-moe"


def random_gate_variant(out: Path, seed: int = 42) -> Path:
    """The demo model with every router replaced by torch.randn(E, H), as mergekit's `random` mode."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(DEMO, out)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in sorted(tensors, key=lambda n: int(n.split(".")[2]) if n.startswith("model.layers.") else -1):
            if name.endswith("block_sparse_moe.gate.weight"):
                tensors[name] = torch.randn(tensors[name].shape, generator=generator).to(tensors[name].dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def train(model: Path, out: Path, rescale: str, steps: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        model_name_or_path=str(model),
        output_dir=str(out),
        router_rescale=rescale,
        max_steps=steps,
        report_to="none",
        save_strategy="no",
    )
    trainer = RouterTrainer(args=args)
    trainer.train()
    report = json.loads((out / "eval" / "report.json").read_text())
    return {
        "rescaling": trainer.router_rescaling,
        "before": report["before"]["perplexity"],
        "after": report["after"]["perplexity"],
        "max_load_after": report["after"]["balance"]["max_load"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "saturated")
    args = parser.parse_args()
    model = random_gate_variant(args.out / "random-gates-moe")
    runs = {mode: train(model, args.out / f"rescale-{mode}", mode, args.steps) for mode in ("off", "auto")}
    untrained = runs["off"]["before"]["overall"]
    summary = {"steps": args.steps, "untrained_random_gates": untrained, "runs": runs, **provenance()}
    for run in runs.values():
        run["reduction_vs_untrained"] = 1 - run["after"]["overall"] / untrained
    (args.out / "saturated.json").write_text(json.dumps(summary, indent=2))
    print(f"mixed held-out perplexity, mergekit random gates, {args.steps} router-only steps")
    print(f"  untrained (random gates)      {untrained:8.2f}")
    for mode, run in runs.items():
        print(
            f"  trained, router_rescale={mode:<4}  {run['after']['overall']:8.2f}  "
            f"({100 * run['reduction_vs_untrained']:.1f}% lower)"
        )


if __name__ == "__main__":
    main()
