"""`router-tune export RUN --out DIR`: the trained routers as a model every tool can read.

    router-tune export runs/raiden --out raiden-tuned                   # full checkpoint, source layout
    router-tune export runs/raiden --out raiden-gguf --layout legacy    # for llama.cpp's converter
    router-tune export runs/raiden/checkpoint-500 --out d --format routers   # kilobytes: apply later
    router-tune export runs/raiden --out adapter --format peft          # PeftModel.from_pretrained
    router-tune export MERGE_OF_COPIES --collapse-identical --out dense # the dense model it equals

The export itself is `router_tune.export.exporter.export_run`; the collapse is
`router_tune.export.collapse.collapse_identical`.
"""

from __future__ import annotations

import argparse

from router_tune.errors import RouterTuneError
from router_tune.export.collapse import collapse_identical
from router_tune.export.exporter import FORMATS, LAYOUTS, VERIFIED, export_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        metavar="RUN_OR_CHECKPOINT",
        help="training output directory, one of its checkpoint-N directories, or a routers delta "
        "(with --collapse-identical also a MoE checkpoint or hub id)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to create (must not exist)")
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="full",
        help="full: complete checkpoint (default); routers: router-only delta for `router-tune "
        "apply`; peft: adapter for PeftModel.from_pretrained on the source",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="same",
        help="expert layout of a full export: same as the source (default), legacy (per-expert "
        "w1/w2/w3, what llama.cpp reads) or fused (gate_up_proj/down_proj)",
    )
    parser.add_argument(
        "--source",
        metavar="MODEL",
        help="the source checkpoint, when it moved since training "
        "(default: the directory or hub id recorded in router_tune.json)",
    )
    parser.add_argument(
        "--collapse-identical",
        action="store_true",
        help="write the dense model the MoE equals (e.g. LlamaForCausalLM for a Mixtral merge of Llama "
        "copies), verified on logits; refused unless every layer's experts are identical and top-k "
        "weights are renormalised",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (only after success)")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the export against the source and the trained routers (the check "
        "streams the shards and loads no model: it costs about one more read of the checkpoint)",
    )


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    # the checks load the source and the export (configs, meta device): a "Loading weights" bar each would
    # read as work done twice; the result line says what was verified
    hf_logging.disable_progress_bar()
    if args.collapse_identical:
        if args.fmt != "full" or args.layout != "same" or args.source:
            raise RouterTuneError(
                "--collapse-identical writes a dense model: it takes no --format, --layout or --source."
            )
        out, summary = collapse_identical(args.run, args.out, force=args.force)
        print(f"router-tune export: wrote {out}: {summary}")
        return 0
    out = export_run(
        args.run, args.out, layout=args.layout, fmt=args.fmt, force=args.force, verify=args.verify, source=args.source
    )
    print(f"router-tune export: wrote {out}")
    print(f"verified: {VERIFIED[args.fmt]}" if args.verify else "not verified (--no-verify)")
    return 0
