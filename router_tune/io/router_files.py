"""Trained routers on disk: read a run directory, a checkpoint or a router-only delta; write a delta.

    trained = read_trained_routers("runs/raiden")          # or runs/raiden/checkpoint-500
    write_router_delta("raiden-routers", trained)           # routers.safetensors + router_tune.json

`routers.safetensors` holds the router tensors under transformers 5 parameter names, in fp32
(the master weights: lossless, and `apply` casts them to the source dtype exactly as the full
export does). Its safetensors metadata repeats what `apply` needs (source model,
architecture, layout, expert fingerprints), so the file alone is a complete delta.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from router_tune.errors import RouterTuneError
from router_tune.io import checkpoint

ROUTERS_FILE = "routers.safetensors"
META_FILE = "router_tune.json"
FORMAT = "router_tune.routers"
# router_tune.json keys repeated in the safetensors metadata (values JSON-encoded when not strings)
DELTA_KEYS = (
    "source_model",
    "architecture",
    "layout",
    "num_experts",
    "top_k",
    "fingerprints",
    "fingerprints_dtype",
    "fingerprint_format",
    "global_step",
)


@dataclass
class TrainedRouters:
    """Router tensors and what the run recorded about them."""

    path: Path  # the directory or file they were read from
    run_dir: Path | None  # the training run directory, when known (holds eval/report.json)
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def source_model(self) -> str:
        return str(self.meta.get("source_model") or "")

    @property
    def fingerprints_dtype(self) -> str:
        """The dtype the experts had when fingerprinted: the recipe's model_dtype ("auto" = as stored)."""
        return str(self.meta.get("fingerprints_dtype") or (self.meta.get("recipe") or {}).get("model_dtype") or "auto")

    def source_dir(self, override: str | Path | None = None) -> Path:
        """The local source checkpoint: the override, the directory recorded at training, or the hub id."""
        if override is not None:
            return checkpoint.resolve_checkpoint(override)
        recorded = self.meta.get("source_dir")
        if recorded and Path(recorded, "config.json").is_file():
            return checkpoint.resolve_checkpoint(recorded)
        if not self.source_model:
            raise RouterTuneError(
                f"{self.path} does not say which model the routers belong to (no source_model); "
                "pass the source checkpoint with --source."
            )
        return checkpoint.resolve_checkpoint(self.source_model)


def read_trained_routers(path: str | Path) -> TrainedRouters:
    """Read a run directory, a `checkpoint-N` directory, a delta directory or a routers.safetensors file.

    Raises:
        RouterTuneError: nothing router_tune wrote at `path`, or a run that has not finished.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return _read_file(path, meta=None, run_dir=None)
    if not path.is_dir():
        raise RouterTuneError(
            f"{path} does not exist: pass a training output directory, one of its "
            "checkpoint-N directories, or a routers.safetensors file."
        )
    if not (path / ROUTERS_FILE).is_file():
        steps = sorted(
            (p for p in path.glob("checkpoint-*") if (p / ROUTERS_FILE).is_file()),
            key=lambda p: int(p.name.rpartition("-")[2]) if p.name.rpartition("-")[2].isdigit() else -1,
        )
        hint = f"; export the latest checkpoint instead: {steps[-1]}" if steps else ""
        raise RouterTuneError(
            f"{path} has no {ROUTERS_FILE}: it is not a router_tune run, checkpoint or delta, or "
            f"the training has not finished{hint}."
        )
    meta_path = path / META_FILE
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RouterTuneError(
                f"{meta_path} is not valid JSON ({err}): re-create it or pass the {ROUTERS_FILE} file alone."
            ) from None
    run_dir = path.parent if (path.parent / META_FILE).is_file() and path.name.startswith("checkpoint-") else path
    return _read_file(path / ROUTERS_FILE, meta, run_dir)


def _read_file(file: Path, meta: dict | None, run_dir: Path | None) -> TrainedRouters:
    try:
        with safe_open(str(file), "pt") as st:
            file_meta = st.metadata() or {}
            tensors = {k: st.get_tensor(k) for k in st.keys()}
    except (SafetensorError, OSError) as err:
        raise RouterTuneError(f"{file} is not a readable safetensors file ({err}).") from None
    if file_meta.get("format") != FORMAT and meta is None:
        raise RouterTuneError(
            f"{file} is not a router_tune routers file (metadata format is "
            f"{file_meta.get('format')!r}, expected {FORMAT!r})."
        )
    if meta is None:
        meta = {k: _decode(v) for k, v in file_meta.items() if k in DELTA_KEYS}
    if not tensors:
        raise RouterTuneError(f"{file} holds no router tensors.")
    return TrainedRouters(file.parent if file.name == ROUTERS_FILE else file, run_dir, tensors, meta)


def _decode(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def write_router_delta(out_dir: Path, trained: TrainedRouters, *, extra: dict | None = None) -> list[str]:
    """routers.safetensors (fp32, self-describing metadata) and router_tune.json into `out_dir`."""
    meta = {**trained.meta, "fingerprints_dtype": trained.fingerprints_dtype, **(extra or {})}
    file_meta = {"format": FORMAT}
    file_meta.update(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if k in DELTA_KEYS and v is not None}
    )
    save_file(
        {k: v.detach().float().contiguous() for k, v in sorted(trained.tensors.items())},
        str(out_dir / ROUTERS_FILE),
        metadata=file_meta,
    )
    # safetensors writes through a private temporary file (mode 0600); give it the mode of every other file
    (out_dir / ROUTERS_FILE).chmod(0o666 & ~current_umask())
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return [ROUTERS_FILE, META_FILE]


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_fingerprints(expected: list[list[str]] | None, actual: list[list[str]], source: str, routers: str) -> None:
    """Refuse routers whose training model had different experts than this source."""
    if not expected:
        raise RouterTuneError(
            f"{routers} records no expert fingerprints, so router_tune cannot check that they "
            f"belong to {source}; re-export them from the training run."
        )
    if [len(layer) for layer in expected] != [len(layer) for layer in actual]:
        raise RouterTuneError(
            f"these routers were trained for a different model: {routers} expects {len(expected)} MoE layers with "
            f"{[len(x) for x in expected][:1]} experts, {source} has {len(actual)} with "
            f"{[len(x) for x in actual][:1]}. "
            "Apply them to the model they were trained on (see source_model in router_tune.json)."
        )
    differ = [(i, e) for i, (a, b) in enumerate(zip(expected, actual)) for e, (x, y) in enumerate(zip(a, b)) if x != y]
    if differ:
        total = sum(len(layer) for layer in expected)
        raise RouterTuneError(
            f"these routers were trained for a different model: {len(differ)} of {total} experts of {source} differ "
            f"from the ones they were trained with (first: MoE layer {differ[0][0]}, expert {differ[0][1]}). Apply "
            "them to the exact checkpoint they were trained on (same revision and dtype; see source_model in "
            "router_tune.json)."
        )
