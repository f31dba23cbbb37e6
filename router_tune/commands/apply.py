"""`router-tune apply SOURCE ROUTERS --out DIR`: splice a router-only delta into a copy of its source.

    router-tune export runs/raiden --out raiden-routers --format routers     # kilobytes to share
    router-tune apply Kquant03/Raiden-16x3.43B raiden-routers --out raiden-tuned

The splice itself is `router_tune.export.apply.apply_routers`.
"""

from __future__ import annotations

import argparse

from router_tune.export.apply import apply_routers
from router_tune.export.exporter import LAYOUTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="the source checkpoint: local directory or hub id")
    parser.add_argument(
        "routers",
        metavar="ROUTERS",
        help="a router delta: a directory from `export --format routers`, or its routers.safetensors",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to create (must not exist)")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="same",
        help="expert layout: same as SOURCE (default), legacy (llama.cpp) or fused",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists (only after success)")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking the output against the source and the routers (the fingerprint check still runs)",
    )


def run(args: argparse.Namespace) -> int:
    out = apply_routers(args.source, args.routers, args.out, layout=args.layout, force=args.force, verify=args.verify)
    print(f"router-tune apply: wrote {out}")
    return 0
