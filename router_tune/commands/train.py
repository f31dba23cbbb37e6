"""`router-tune train RECIPE [--dry-run] [--key value ...]`

    router-tune train recipes/demo.yaml --max_steps 50
    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu-ddp.yaml \\
        -m router_tune train recipes/demo.yaml   (two CPU processes)

Every recipe key (docs/recipe-keys.md) can be overridden as `--key value`.
`--dry-run` checks the recipe, the model (config only: no weights are read) and the data,
then prints the plan: trainable parameters, tokens per step, steps, estimated memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from router_tune.errors import RouterTuneError
from router_tune.io.router_files import ROUTERS_FILE
from router_tune.training.checkpoints import check_fresh_output_dir, clear_previous_run
from router_tune.training.config import load_recipe
from router_tune.training.plan import plan
from router_tune.training.recipe_keys import keys_text
from router_tune.training.trainer import RouterTrainer

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/), e.g. recipes/demo.yaml")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate recipe, model and data and print the plan; train nothing"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train from step 0 into an output_dir that holds an earlier run, removing its results and checkpoints",
    )
    parser.epilog = (
        "Any recipe key can follow as --key value, e.g. --learning_rate 3e-4 --max_steps 100.\n\n" + keys_text()
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    config = load_recipe(args.recipe, args.overrides)
    replaces = check_fresh_output_dir(config.output_dir, config.resume_from_checkpoint, args.overwrite)
    if args.dry_run:
        if replaces:
            print(f"router-tune train: warning: {replaces}", file=sys.stderr)
        print(format_plan(plan(config)))
        return 0
    if replaces:
        raise RouterTuneError(replaces)
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:
        clear_previous_run(config.output_dir)  # before any rank's first step (a collective with this rank)
    return train(config)


def format_plan(p: dict) -> str:
    rows = [
        ("model", f"{p['model']} ({p['architecture']}, {p['layout']} layout)"),
        ("routing", f"{p['moe_layers']} MoE layers x {p['experts']} experts, top-{p['top_k']}"),
        ("weights", p["weights_dtype"] + (f" ({p['dtype_note']})" if p["dtype_note"] else "")),
        (
            "trainable",
            f"{p['trainable_parameters']:,} of {p['total_parameters']:,} parameters ({p['trainable_percent']:.4f}%)",
        ),
        ("data", ", ".join(f"{s} ({n} of the first 16 blocks)" for s, n in p["first_blocks_per_source"].items())),
        ("tokens/step", f"{p['tokens_per_step']:,} ({p['processes']} process(es), block {p['block_size']})"),
        ("steps", f"{p['max_steps']:,} ({p['total_tokens']:,} tokens)"),
        (
            "memory",
            f"~{p['memory']['total_bytes'] / 2**30:.2f} GiB peak per process: weights "
            f"{p['memory']['weights_bytes'] / 2**30:.2f} GiB, activations "
            f"{p['memory']['activations_bytes'] / 2**30:.2f} GiB for {p['memory']['seq_len']:,} tokens"
            + (" (activation checkpointing)" if p["memory"]["activation_checkpointing"] else "")
            + (
                f", frozen weights in {p['memory']['quantize']} ({p['memory']['quantized_elements']:,} elements "
                f"quantized), dequantization buffer {p['memory']['dequant_bytes'] / 2**30:.2f} GiB"
                if p["memory"]["quantize"] != "none"
                else ""
            )
            + " (router_tune.model.memory)",
        ),
        ("output", p["output_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "dry run: nothing trained\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def resume_command(argv: list[str]) -> str:
    """The command that was run (`train RECIPE --key value ...`, every override kept), resuming."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume_from_checkpoint":
            skip = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    return shlex.join(["router-tune", *kept, "--resume_from_checkpoint", "true"])


def train(config) -> int:
    """Train, print where the results are and what to run next; 0, or 128 + the signal that stopped it."""
    trainer = RouterTrainer(args=config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(results_summary(trainer, Path(config.output_dir)))
        print(json.dumps({"global_step": trainer.state.global_step, "nonfinite_steps": trainer.nonfinite_steps}))
    # Destroys the process group (launched runs) while the interpreter is alive: left to exit, gloo's
    # worker threads can still hold tensors and abort the process after a finished run (PITFALLS.md).
    # Only on success: a rank that failed must not wait in a collective teardown for the others.
    trainer.accelerator.end_training()
    return 128 + int(trainer._interrupted) if trainer._interrupted else 0


def results_summary(trainer, out: Path) -> str:
    """The last lines of a run: where its routers, report and plots are, and the next command."""
    state = "stopped early (interrupted)" if trainer._interrupted else "finished"
    lines = [f"router-tune train: {state} at step {trainer.state.global_step}; routers in {out / ROUTERS_FILE}"]
    if trainer.report is not None:
        lines.append(f"report: {trainer.report.with_suffix('.md')} (held-out perplexity and routing, before/after)")
    if trainer.plots:
        lines.append(f"plots:  {out / 'plots'}/ ({', '.join(p.name for p in trainer.plots)})")
    if trainer._interrupted:
        lines.append(f"resume with: {resume_command(sys.argv[1:])}")
    else:
        run = shlex.quote(str(out))
        lines.append(f"next:   router-tune eval {run}   (the run against its source model, on held-out text)")
        lines.append(f"        router-tune export {run} --out {shlex.quote(str(out) + '-export')}   (a verified model)")
    return "\n".join(lines)
