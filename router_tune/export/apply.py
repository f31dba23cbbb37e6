"""Splice a router-only delta into a copy of its source (the library side of `router-tune apply`).

The delta records the blake2b fingerprint of every expert it was trained with; `apply`
compares them with SOURCE's experts first and refuses routers trained for another model
(another merge, revision or dtype), since a router is meaningless on experts it never saw.
The fingerprints are read from SOURCE's safetensors bytes (model.fingerprints.checkpoint_fingerprints),
with no model in memory, so the check also runs with --no-verify. The output is written, verified
and published exactly like `router-tune export --format full`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from router_tune.export.exporter import publish
from router_tune.io.checkpoint import resolve_checkpoint
from router_tune.io.router_files import read_trained_routers


def apply_routers(
    source: str | Path,
    routers: str | Path,
    out_dir: str | Path,
    *,
    layout: str = "same",
    force: bool = False,
    verify: bool = True,
) -> Path:
    """Write SOURCE with the delta's routers spliced in; returns the output directory.

    Raises:
        RouterTuneError: the delta's expert fingerprints do not match SOURCE ("these routers were
            trained for a different model"), or any problem `export` reports.
    """
    trained = read_trained_routers(routers)
    source_dir = resolve_checkpoint(source)
    command = "router-tune apply " + shlex.join(
        [str(source), str(routers), "--out", str(out_dir), "--layout", layout] + ([] if verify else ["--no-verify"])
    )
    return publish(trained, source_dir, out_dir, layout=layout, fmt="full", force=force, verify=verify, command=command)
