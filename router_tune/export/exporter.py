"""Export trained routers as a model every tool can read (the library side of `router-tune export`).

`full` splices the routers into the source's safetensors shards (byte ranges are copied, so
memory stays at a few MB whatever the shard size) and writes a model card. Output goes to a
hidden sibling directory, is verified, then renamed: DIR appears complete or not at all.
Verification (export.verify) compares the export's bytes with the source's and the trained
routers range by range, loads it with transformers on the meta device and checks its side
files: no model is materialised, so the verified export also stays within tens of MB above
the interpreter whatever the model size (scripts/bench_export.py). `--no-verify` skips it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from router_tune.architectures import LAYOUTS as DISK_LAYOUTS
from router_tune.errors import RouterTuneError
from router_tune.export import model_card
from router_tune.export import verify as checks
from router_tune.export.peft_adapter import check_adapter, write_adapter
from router_tune.export.splice import splice_checkpoint, staged_output
from router_tune.io.router_files import ROUTERS_FILE, TrainedRouters, read_trained_routers, write_router_delta

FORMATS = ("full", "routers", "peft")
LAYOUTS = ("same", *DISK_LAYOUTS)  # "same": the source checkpoint's layout


# What a passed verification proved, per format (export_run raises on the first failed check).
VERIFIED = {
    "full": "every non-router tensor is byte-identical to the source's, every router equals the trained one, "
    "the side files are the source's, and transformers loads it with no missing or unexpected key",
    "routers": "the written routers read back identical to the trained ones, fingerprints included",
    "peft": "the source with the adapter gives the trained model's logits",
}


def export_run(
    run_or_checkpoint: str | Path,
    out_dir: str | Path,
    layout: str = "same",
    fmt: str = "full",
    force: bool = False,
    verify: bool = True,
    source: str | Path | None = None,
) -> Path:
    """Export trained routers; returns the output directory.

    Args:
        run_or_checkpoint: a training output directory, a `checkpoint-N` directory in it, or a
            router delta (directory or routers.safetensors file).
        out_dir: directory to create; refused if it exists unless `force`.
        layout: `same`, `legacy` or `fused` (full format only).
        fmt: `full`, `routers` or `peft`.
        verify: check the output against the source and the trained routers before publishing it.
        source: the source checkpoint when it moved since training.

    Raises:
        RouterTuneError: bad input, a source that does not match the routers, or a failed verification
            (the output directory is then not created).
    """
    if fmt not in FORMATS or layout not in LAYOUTS:
        raise RouterTuneError(f"unknown --format {fmt!r} or --layout {layout!r}: formats {FORMATS}, layouts {LAYOUTS}.")
    if fmt != "full" and layout != "same":
        raise RouterTuneError(f"--layout applies to --format full only ({fmt} exports hold no expert tensors).")
    trained = read_trained_routers(run_or_checkpoint)
    command = "router-tune export " + shlex.join(
        [str(run_or_checkpoint), "--out", str(out_dir), "--format", fmt, "--layout", layout]
        + ([] if verify else ["--no-verify"])
    )
    if fmt == "routers":  # no source needed: the delta is self-describing
        with staged_output(out_dir, force=force, protect=[], keep=[trained.path]) as tmp:
            write_router_delta(tmp, trained)
            if verify:
                _check_delta(tmp, trained)
            _write_card(tmp, Path(out_dir).name, trained, fmt, trained.meta.get("layout", "same"), verify, command)
        return Path(out_dir)
    source_dir = trained.source_dir(source)
    return publish(trained, source_dir, out_dir, layout=layout, fmt=fmt, force=force, verify=verify, command=command)


def publish(
    trained: TrainedRouters,
    source_dir: Path,
    out_dir: str | Path,
    *,
    layout: str,
    fmt: str,
    force: bool,
    verify: bool,
    command: str,
) -> Path:
    """Write a full checkpoint or a PEFT adapter of `trained` on `source_dir` (shared by export and apply)."""

    checks.check_source(source_dir, trained)  # always, first: nothing is written for routers of another model

    with staged_output(out_dir, force=force, protect=[source_dir], keep=[trained.path]) as tmp:
        if fmt == "peft":  # the adapter is made from the trained model itself, so it is loaded anyway
            ref = checks.build_reference(
                source_dir,
                trained.tensors,
                lambda model: write_adapter(model, tmp, trained.source_model or str(source_dir)),
            )
            if verify:
                check_adapter(source_dir, tmp, ref)
            out_layout = trained.meta.get("layout", "same")
        else:
            result = splice_checkpoint(source_dir, tmp, trained.tensors, layout=layout)
            if verify:
                checks.check_export(source_dir, tmp, trained, result)
            out_layout = result.layout
        _write_card(tmp, Path(out_dir).name, trained, fmt, out_layout, verify, command, source_dir)
    return Path(out_dir)


def _check_delta(out: Path, trained: TrainedRouters) -> None:
    """Read the written delta back with safetensors and compare every tensor with the trained one."""
    again = read_trained_routers(out / ROUTERS_FILE)
    bad = sorted(set(trained.tensors) ^ set(again.tensors)) + [
        n for n, t in trained.tensors.items() if n in again.tensors and not torch.equal(again.tensors[n], t.float())
    ]
    if bad or again.meta.get("fingerprints") != trained.meta.get("fingerprints"):
        raise RouterTuneError(
            f"the written {ROUTERS_FILE} does not read back identically ({bad[:3]}); nothing was written."
        )


def _write_card(
    out: Path,
    here: str,
    trained: TrainedRouters,
    fmt: str,
    layout: str,
    verified: bool,
    command: str,
    source_dir: Path | None = None,
) -> None:
    meta = trained.meta
    report = model_card.read_report(trained.run_dir, meta.get("global_step"))
    names = sorted(trained.tensors)
    text = model_card.render(
        meta,
        fmt=fmt,
        layout=layout,
        here=here,
        report=report,
        router_names=names,
        router_params=sum(t.numel() for t in trained.tensors.values()),
        verified=verified,
        command=command,
        source_dir=source_dir,
    )
    (out / "README.md").write_text(text)
