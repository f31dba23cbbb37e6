"""`router-tune apply SOURCE ROUTERS --out DIR`: splice a router-only delta into a copy of its source.

    router-tune export runs/raiden --out raiden-routers --format routers     # kilobytes to share
    router-tune apply Kquant03/Raiden-16x3.43B raiden-routers --out raiden-tuned

The delta records the blake2b fingerprint of every expert it was trained with; `apply`
compares them with SOURCE's experts first and refuses routers trained for another model
(another merge, revision or dtype), since a router is meaningless on experts it never saw.
The fingerprints are computed on the loaded model, so `apply` needs about the model's size
in RAM even with --no-verify (see moe.expert_fingerprints). The output is written, verified
and published exactly like `router-tune export --format full`.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from router_tune.checkpoint import resolve_checkpoint
from router_tune.errors import RouterTuneError
from router_tune.export import LAYOUTS, publish
from router_tune.router_files import read_trained_routers
from router_tune.verify import trained_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="the source checkpoint: local directory or hub id")
    parser.add_argument("routers", metavar="ROUTERS",
                        help="a router delta: a directory from `export --format routers`, or its routers.safetensors")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to create (must not exist)")
    parser.add_argument("--layout", choices=LAYOUTS, default="same",
                        help="expert layout: same as SOURCE (default), legacy (llama.cpp) or fused")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (only after success)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading and comparing the output (the fingerprint check still runs)")


def run(args: argparse.Namespace) -> int:
    out = apply_routers(args.source, args.routers, args.out, layout=args.layout, force=args.force, verify=args.verify)
    print(f"router-tune apply: wrote {out}")
    return 0


def apply_routers(source: str | Path, routers: str | Path, out_dir: str | Path, *, layout: str = "same",
                  force: bool = False, verify: bool = True) -> Path:
    """Write SOURCE with the delta's routers spliced in; returns the output directory.

    Raises:
        RouterTuneError: the delta's expert fingerprints do not match SOURCE ("these routers were
            trained for a different model"), or any problem `export` reports.
    """
    trained = read_trained_routers(routers)
    if not trained.meta.get("fingerprints"):
        raise RouterTuneError(f"{routers} records no expert fingerprints, so router_tune cannot check that these "
                              "routers belong to SOURCE; re-export them with `router-tune export RUN --format "
                              "routers`.")
    source_dir = resolve_checkpoint(source)
    if not verify:  # verification checks the fingerprints on its own model load; without it, load once for them
        with trained_model(source_dir, trained.tensors, trained.meta.get("fingerprints"), str(trained.path),
                           trained.fingerprints_dtype):
            pass
    command = "router-tune apply " + shlex.join([str(source), str(routers), "--out", str(out_dir), "--layout", layout]
                                                + ([] if verify else ["--no-verify"]))
    return publish(trained, source_dir, out_dir, layout=layout, fmt="full", force=force, verify=verify,
                   command=command)
