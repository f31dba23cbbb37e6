"""Splice a router-only delta into a copy of its source (the library side of `router-tune apply`).

The delta records the blake2b fingerprint of every expert it was trained with; `apply`
compares them with SOURCE's experts first and refuses routers trained for another model
(another merge, revision or dtype), since a router is meaningless on experts it never saw.
The fingerprints are computed on the loaded model, so `apply` needs about the model's size
in RAM even with --no-verify (see model.fingerprints.expert_fingerprints). The output is written, verified
and published exactly like `router-tune export --format full`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from router_tune.errors import RouterTuneError
from router_tune.export.exporter import publish
from router_tune.export.verify import trained_model
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
    if not trained.meta.get("fingerprints"):
        raise RouterTuneError(
            f"{routers} records no expert fingerprints, so router_tune cannot check that these "
            "routers belong to SOURCE; re-export them with `router-tune export RUN --format "
            "routers`."
        )
    source_dir = resolve_checkpoint(source)
    if not verify:  # verification checks the fingerprints on its own model load; without it, load once for them
        with trained_model(
            source_dir, trained.tensors, trained.meta.get("fingerprints"), str(trained.path), trained.fingerprints_dtype
        ):
            pass
    command = "router-tune apply " + shlex.join(
        [str(source), str(routers), "--out", str(out_dir), "--layout", layout] + ([] if verify else ["--no-verify"])
    )
    return publish(trained, source_dir, out_dir, layout=layout, fmt="full", force=force, verify=verify, command=command)
