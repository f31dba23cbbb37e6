"""Expert fingerprints: a blake2b digest per expert, so a router delta is never applied to experts
it was not trained with, and identical experts (copies merged by mergekit) are found.

One expert's digest covers its gate, up and down projections, each as
`"{gate|up|down}:{shape}:{safetensors dtype};"` followed by the raw bytes, in that order. The
same digest comes from a loaded model (`expert_fingerprints`) and straight from a checkpoint's
safetensors bytes in either on-disk layout (`checkpoint_fingerprints`: one streaming read of the
expert bytes, no model in memory), because the fused `gate_up_proj[e]` is the bytes of the gate
rows followed by the up rows. Checking a delta against its source therefore needs no model load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from router_tune.architectures import architecture_for, architecture_named
from router_tune.architectures.on_disk import FUSED_EXPERT, LEGACY_EXPERT
from router_tune.errors import RouterTuneError
from router_tune.io.checkpoint import weight_files
from router_tune.io.shards import CHUNK, TORCH_DTYPES, Segment, read_header

FORMAT = 2  # recorded as `fingerprint_format` in run files: digests of other formats are not comparable
SAFETENSORS_DTYPE = {dtype: name for name, dtype in TORCH_DTYPES.items()}
PROJECTIONS = ("gate", "up", "down")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
HASH_THREADS = max(1, min(16, CORES))


def _new_digest():
    return hashlib.blake2b(digest_size=16)


def _header(h, projection: str, shape: tuple[int, ...], dtype: str) -> None:
    h.update(f"{projection}:{tuple(shape)}:{dtype};".encode())


def tensor_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """blake2b-128 of named tensors: names, shapes, dtypes and raw bytes (equal digest = bit-identical)."""
    h = _new_digest()
    for name, t in named:
        t = t.detach()
        _header(h, name, tuple(t.shape), SAFETENSORS_DTYPE.get(t.dtype, str(t.dtype)))
        h.update(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return h.hexdigest()


def expert_fingerprints(model: nn.Module) -> list[list[str]]:
    """[moe layer][expert] -> digest of the expert's gate, up and down weights, one expert at a time."""
    arch = architecture_for(model.config)
    num_experts, block_cls = arch.num_experts(model.config), arch.block_class()
    naming = arch.legacy_naming
    result = []
    for layer in model.get_decoder().layers:
        for block in (m for m in layer.modules() if isinstance(m, block_cls)):
            experts = block.experts
            if isinstance(experts, nn.ModuleList):  # per-expert modules (older / remote-code models)
                per_expert = [[(p, e.get_submodule(getattr(naming, p)).weight) for p in PROJECTIONS] for e in experts]
            else:  # fused [E, 2I, H] and [E, H, I] parameters: gate rows, then up rows
                inter = experts.down_proj.shape[-1]
                per_expert = [
                    [
                        ("gate", experts.gate_up_proj[e, :inter]),
                        ("up", experts.gate_up_proj[e, inter:]),
                        ("down", experts.down_proj[e]),
                    ]
                    for e in range(num_experts)
                ]
            result.append([tensor_digest(params) for params in per_expert])
    return result


def checkpoint_fingerprints(checkpoint_dir: str | Path) -> list[list[str]]:
    """The same digests as `expert_fingerprints`, read from the safetensors shards of a checkpoint.

    Raises:
        RouterTuneError: pickle weights (load the model and use `expert_fingerprints`), an
            unsupported architecture, or expert tensors missing from the shards.
    """
    root = Path(checkpoint_dir)
    arch = architecture_named(json.loads((root / "config.json").read_text()).get("model_type", "?"))
    naming = arch.legacy_naming
    legacy_projection = {naming.gate: "gate", naming.up: "up", naming.down: "down"}
    # layer prefix -> expert -> projection -> (shape, dtype, [segments])
    experts: dict[str, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    for file in weight_files(root):
        if file.suffix != ".safetensors":
            raise RouterTuneError(f"{root} stores pickle weights: its experts are fingerprinted from the loaded model.")
        for t in read_header(file)[1].values():
            if m := LEGACY_EXPERT.match(t.name):
                experts[m["layer"]][int(m["e"])][legacy_projection[m["proj"]]] = (t.shape, t.dtype, [t.segment()])
            elif m := FUSED_EXPERT.match(t.name):
                per_expert = t.nbytes // t.shape[0]
                for e in range(t.shape[0]):
                    if m["proj"] == "down_proj":
                        experts[m["layer"]][e]["down"] = (t.shape[1:], t.dtype, [t.segment(e * per_expert, per_expert)])
                        continue
                    half, shape = per_expert // 2, (t.shape[1] // 2, t.shape[2])
                    experts[m["layer"]][e]["gate"] = (shape, t.dtype, [t.segment(e * per_expert, half)])
                    experts[m["layer"]][e]["up"] = (shape, t.dtype, [t.segment(e * per_expert + half, half)])
    layers = sorted(experts, key=lambda prefix: int(re.search(r"(\d+)$", prefix)[1]))
    jobs = [[(layer, e) for e in sorted(experts[layer])] for layer in layers]
    # One thread per core: file reads and blake2b updates of large buffers release the GIL, so the
    # experts hash in parallel (the read is one pass over the experts' bytes either way).
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, sum(map(len, jobs)) or 1)) as pool:
        digests = [[pool.submit(_stream_digest, root, layer, e, experts[layer][e]) for layer, e in row] for row in jobs]
        return [[d.result() for d in row] for row in digests]


def _stream_digest(root: Path, layer: str, expert: int, projections: dict[str, tuple]) -> str:
    missing = [p for p in PROJECTIONS if p not in projections]
    if missing:
        raise RouterTuneError(f"{root}: expert {expert} of {layer} has no {', '.join(missing)} projection tensor.")
    h = _new_digest()
    for projection in PROJECTIONS:
        shape, dtype, segments = projections[projection]
        _header(h, projection, shape, dtype)
        for segment in segments:
            _hash_bytes(h, segment)
    return h.hexdigest()


def _hash_bytes(h, segment: Segment) -> None:
    with open(segment.file, "rb") as fh:
        fh.seek(segment.start)
        left = segment.length
        while left:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                raise RouterTuneError(f"{segment.file} ended early: the file is truncated; re-download it.")
            h.update(chunk)
            left -= len(chunk)


def fingerprints_of(model: nn.Module, source: str | Path | None) -> list[list[str]]:
    """From the source checkpoint's safetensors bytes when there is one (the stored dtype, whatever
    dtype the model was loaded in: what `apply` and `export` check against), else from the model."""
    if source is not None and Path(source, "config.json").is_file():
        if all(f.suffix == ".safetensors" for f in weight_files(source)):
            return checkpoint_fingerprints(source)
    return expert_fingerprints(model)


def identical_expert_groups(fingerprints: list[list[str]]) -> list[list[list[int]]]:
    """Per MoE layer, the groups (size >= 2) of experts whose weights are bit-identical."""
    out = []
    for layer in fingerprints:
        groups: dict[str, list[int]] = {}
        for e, digest in enumerate(layer):
            groups.setdefault(digest, []).append(e)
        out.append([g for g in groups.values() if len(g) > 1])
    return out
