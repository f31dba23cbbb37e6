"""Run directories as RouterTrainer writes them, and file checks on exports, shared by the export tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
from router_tune.model.fingerprints import expert_fingerprints
from router_tune.model.loading import load_moe
from router_tune.model.routers import router_state_dict


def make_run(
    source: Path, root: Path, *, seed: int = 0, step: int = 7, report: dict | None = None, recipe: dict | None = None
) -> tuple[Path, dict]:
    """A run directory as the trainer writes it: routers = source routers + noise (fp32)."""
    model, info = load_moe(source)
    gen = torch.Generator().manual_seed(seed)
    routers = {n: t + 0.5 * torch.randn(t.shape, generator=gen) for n, t in router_state_dict(model).items()}
    meta = {
        "source_model": str(source),
        "source_dir": str(source),
        "architecture": info.architecture,
        "layout": info.layout,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "fingerprints": expert_fingerprints(model),
        "fingerprint_format": FINGERPRINT_FORMAT,
        "global_step": step,
        "recipe": recipe
        or {
            "model_name_or_path": str(source),
            "max_steps": step,
            "learning_rate": 1e-4,
            "datasets": [{"source": "text", "path": "corpus.txt", "weight": 1.0}],
        },
    }
    run = root / "run"
    for d, tensors, s in ((run, routers, step), (run / "checkpoint-3", {n: t * 0.5 for n, t in routers.items()}, 3)):
        d.mkdir(parents=True)
        save_file(
            tensors,
            str(d / "routers.safetensors"),
            metadata={"source_model": str(source), "format": "router_tune.routers"},
        )
        (d / "router_tune.json").write_text(json.dumps({**meta, "global_step": s}))
    if report is not None:
        (run / "eval").mkdir()
        (run / "eval" / "report.json").write_text(json.dumps(report))
    return run, routers


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def router_disk(name: str, legacy_mixtral: bool) -> str:
    return name.replace(".mlp.", ".block_sparse_moe.") if legacy_mixtral else name


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
