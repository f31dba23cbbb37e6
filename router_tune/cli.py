"""The `router-tune` command line: one sub-command per step of the router-tuning workflow.

    router-tune inspect MODEL          what is in a MoE checkpoint, are its routers sane
    router-tune train RECIPE.yaml      train only the routers (also under `accelerate launch -m router_tune`)
    router-tune eval MODEL             held-out perplexity and routing report
    router-tune export RUN --out DIR   a verified model, router-only delta or PEFT adapter
    router-tune apply SOURCE ROUTERS   splice a router-only delta into a copy of its source

Each sub-command is a module of `router_tune.commands` named after it, imported only when
chosen so that `--help` stays fast; it provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

from router_tune.errors import RouterTuneError

COMMANDS = {
    "inspect": "Describe a MoE checkpoint and check the health of its routers.",
    "train": "Train only the routers of a MoE model from a recipe.",
    "eval": "Held-out perplexity and routing report, optionally against another model.",
    "export": "Export a trained run as a full model, a router-only delta or a PEFT adapter.",
    "apply": "Splice a router-only delta into a copy of its source model.",
}


def command_module(name: str):
    """router_tune.commands.<name>, imported only when that command is chosen."""
    return importlib.import_module(f"router_tune.commands.{name}")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router-tune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('router-tune')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            command_module(name).add_arguments(sp)
    return parser


def hide_wandb_offline_notice() -> None:
    """transformers prints "[INFO] Running in WANDB offline mode" on stdout when its integrations module is
    imported under WANDB_MODE=offline, whatever `report_to` says (a run with `report_to: none` printed it, and
    wandb announces offline runs itself). That module reads the variable for this print only: it is imported
    here once with the variable hidden. Nothing happens (no import) when the variable is not "offline"."""
    module = "transformers.integrations.integration_utils"
    if os.environ.get("WANDB_MODE") != "offline" or module in sys.modules:
        return
    del os.environ["WANDB_MODE"]
    try:
        importlib.import_module(module)
    finally:
        os.environ["WANDB_MODE"] = "offline"  # wandb itself reads it when a run starts


def quiet_deepspeed_on_a_cpu() -> None:
    """DeepSpeed, imported by transformers' Trainer whenever it is installed, prints "Setting accelerator to
    CPU. If you have GPU or other accelerator, we were unable to detect it." on stdout in every CPU training
    run when it has to guess the accelerator. On a machine without CUDA, XPU or MPS the answer is known:
    DS_ACCELERATOR=cpu says it (a value already set is kept, and a GPU machine is left to DeepSpeed)."""
    if "DS_ACCELERATOR" in os.environ or "deepspeed" in sys.modules:
        return
    import torch

    xpu = getattr(torch, "xpu", None)
    if torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or torch.backends.mps.is_available():
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    module = command_module(args.command)
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # `train` takes any recipe key as --key value
    try:
        hide_wandb_offline_notice()
        if args.command == "train":
            quiet_deepspeed_on_a_cpu()
        return int(module.run(args) or 0)
    except RouterTuneError as err:
        print(f"router-tune {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"router-tune {args.command}: interrupted", file=sys.stderr)
        return 130
