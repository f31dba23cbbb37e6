"""Router training from saturated mergekit `random` gates, with and without router rescaling.

    python -m scripts.saturated_demo [--steps 150] [--out bench] [--work-dir build/saturated]

mergekit's `gate_mode: random` fills every gate with torch.randn: rows of norm ~sqrt(H), a one-hot
softmax, (almost) no gradient for the router. This makes that variant of the demo frankenMoE (same
experts, gates drawn as mergekit draws them), trains its routers with recipes/demo.yaml twice,
`router_rescale: off` and `auto`, and writes OUT/saturated.json and OUT/saturated.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from scripts import harness


def random_gate_variant(out: Path, seed: int = 42) -> Path:
    """The demo model with every router replaced by torch.randn(E, H), as mergekit's `random` mode."""
    import torch
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(harness.DEMO, out)
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in sorted(tensors, key=lambda n: int(n.split(".")[2]) if n.startswith("model.layers.") else -1):
            if name.endswith("block_sparse_moe.gate.weight"):
                tensors[name] = torch.randn(tensors[name].shape, generator=generator).to(tensors[name].dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def train(model: Path, out: Path, rescale: str, steps: int) -> dict:
    from router_tune import RouterTrainer

    shutil.rmtree(out, ignore_errors=True)
    args = harness.recipe(
        harness.DEMO_RECIPE, model_name_or_path=str(model), output_dir=str(out), router_rescale=rescale,
        max_steps=steps, eval_before_after=True,
    )  # fmt: skip
    trainer = RouterTrainer(args=args)
    trainer.train()
    report = json.loads((out / "eval" / "report.json").read_text())
    return {
        "rescaling": trainer.router_rescaling,
        "before": report["before"]["perplexity"],
        "after": report["after"]["perplexity"],
        "max_load_after": report["after"]["balance"]["max_load"],
    }


def run(args) -> dict:
    steps = 1 if args.smoke else args.steps
    model = random_gate_variant(args.work_dir / "random-gates-moe")
    runs = {mode: train(model, args.work_dir / f"rescale-{mode}", mode, steps) for mode in ("off", "auto")}
    untrained = runs["off"]["before"]["overall"]
    for r in runs.values():
        r["reduction_vs_untrained"] = 1 - r["after"]["overall"] / untrained
    return {"steps": steps, "untrained_random_gates": untrained, "runs": runs, **harness.provenance()}


def render(d: dict) -> str:
    lines = [
        f"# Saturated routers: mixed held-out perplexity, mergekit random gates, {d['steps']} router-only steps",
        "",
        f"`python -m scripts.saturated_demo --steps {d['steps']}` at {harness.describe(d)}.",
        "",
        "| | mixed held-out perplexity | vs untrained |",
        "|---|---:|---:|",
        f"| untrained `random` gates | {d['untrained_random_gates']:.2f} | |",
    ]
    for mode, r in d["runs"].items():
        lines.append(
            f"| trained, `router_rescale: {mode}` | {r['after']['overall']:.2f} | "
            f"-{100 * r['reduction_vs_untrained']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def add_args(p) -> None:
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--work-dir", type=Path, default=harness.ROOT / "build" / "saturated")


if __name__ == "__main__":
    harness.main("saturated", __doc__, run, render, add_args)
