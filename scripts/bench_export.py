"""Export benchmark: the default (verified) export and the bare splice vs loading and re-saving the model.

    python -m scripts.bench_export [--out bench] [--work-dir bench/work] [--repeats 3]   # OUT/export.json, .md

On a random bf16 Mixtral of >= 1 GB in three shards and a run of trained routers, each method in a fresh
process, `repeats` times, interleaved: `export` (fingerprint check + splice + verification), `splice`
(`--no-verify`) and `reload_save` (`from_pretrained` + `load_router_state_dict` + `save_pretrained`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from scripts import harness
from scripts.make_scale_model import write_checkpoint

# 12 layers x (8 experts x 3 x 1024 x 2048 + attention) + 2 x 32000 x 1024 embeddings = 0.67 G params = 1.34 GB in bf16
SHAPE = dict(
    hidden_size=1024, intermediate_size=2048, num_hidden_layers=12, num_local_experts=8, num_experts_per_tok=2,
    num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
)  # fmt: skip
SMOKE = {**SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 1000}
SMOKE.update(num_attention_heads=4, num_key_value_heads=2)
SHARDS = 3
METHODS = ("export", "splice", "reload_save")


def make_run(model_dir: Path, run_dir: Path) -> Path:
    """A run directory whose routers are random fp32 tensors (what training writes)."""
    import torch
    from safetensors.torch import save_file

    from router_tune.model.fingerprints import FORMAT, checkpoint_fingerprints

    config = json.loads((model_dir / "config.json").read_text())
    experts, layers = config["num_local_experts"], config["num_hidden_layers"]
    run_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    routers = {
        f"model.layers.{n}.mlp.gate.weight": torch.randn(experts, config["hidden_size"], generator=gen) * 0.02
        for n in range(layers)
    }
    meta = {"format": "router_tune.routers", "source_model": str(model_dir)}
    save_file(routers, str(run_dir / "routers.safetensors"), metadata=meta)
    meta = {
        "source_model": str(model_dir),
        "source_dir": str(model_dir),
        "architecture": "mixtral",
        "layout": "legacy",
        "num_experts": experts,
        "top_k": config["num_experts_per_tok"],
        "fingerprints": checkpoint_fingerprints(model_dir),
        "fingerprint_format": FORMAT,
        "global_step": 0,
        "recipe": {},
    }
    (run_dir / "router_tune.json").write_text(json.dumps(meta, indent=2))
    return run_dir


def child(args) -> dict:
    """One measured export (`--child METHOD`), in this fresh process."""
    import torch
    from transformers import AutoModelForCausalLM  # imported before timing in both methods

    from router_tune.export.exporter import export_run
    from router_tune.io.router_files import read_trained_routers
    from router_tune.model.routers import load_router_state_dict

    torch.set_num_threads(2)
    method, work = args.child, args.work_dir
    model_dir, run_dir, out_dir = work / "mixtral-random-bf16", work / "run", work / f"out-{method}"
    base_rss = harness.vm_hwm() / 2**20
    start = time.perf_counter()
    if method in ("export", "splice"):  # the default export verifies; --no-verify is the splice alone
        export_run(run_dir, out_dir, fmt="full", layout="same", verify=method == "export")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        load_router_state_dict(model, read_trained_routers(run_dir).tensors)
        model.save_pretrained(out_dir)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": harness.vm_hwm() / 2**20, "rss_after_imports_mb": base_rss}


def measure(work_dir: Path = harness.ROOT / "bench" / "work", repeats: int = 3, shape: dict = SHAPE) -> dict:
    """Make the checkpoint once, then time every method `repeats` times; returns medians."""
    work = Path(work_dir).absolute()
    model_dir = work / "mixtral-random-bf16"
    if not (model_dir / "model.safetensors.index.json").is_file():
        write_checkpoint(model_dir, {**shape, "tie_word_embeddings": False}, shards=SHARDS, tokenizer=False)
    make_run(model_dir, work / "run")  # the child processes export this run
    shards = sorted(model_dir.glob("*.safetensors"))
    samples: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in samples:
            shutil.rmtree(work / f"out-{method}", ignore_errors=True)
            cmd = harness.module_cmd("bench_export", "--child", method, "--work-dir", work)
            samples[method].append(harness.run_json(cmd))
            shutil.rmtree(work / f"out-{method}", ignore_errors=True)
    size = sum(f.stat().st_size for f in shards)
    result = {
        "checkpoint_gb": round(size / 1e9, 3),
        "largest_shard_mb": round(max(f.stat().st_size for f in shards) / 2**20, 1),
        "shards": len(shards),
        "dtype": "bfloat16",
        "repeats": repeats,
        **harness.provenance(),
    }
    for method, runs in samples.items():
        result[method] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        result[method]["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    base = result["reload_save"]
    for method in ("export", "splice"):  # against the model's bytes (<= 0.25 verified) and the reload
        m = result[method]
        m["peak_rss_over_model"] = round(m["peak_rss_mb"] / (size / 2**20), 3)
        m["added_rss_over_model"] = round((m["peak_rss_mb"] - m["rss_after_imports_mb"]) / (size / 2**20), 3)
        result[f"{method}_time_ratio"] = round(m["seconds"] / base["seconds"], 3)
        result[f"{method}_rss_ratio"] = round(m["peak_rss_mb"] / base["peak_rss_mb"], 3)
    return result


def run(args) -> dict:
    return measure(args.work_dir, 1 if args.smoke else args.repeats, SMOKE if args.smoke else SHAPE)


def render(e: dict) -> str:
    from scripts.bench import export_table

    return "\n".join([f"Export benchmark, {harness.describe(e)}.", "", *export_table(e)])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", type=Path, default=harness.ROOT / "bench" / "work")
    p.add_argument("--repeats", type=int, default=3)


if __name__ == "__main__":
    harness.main("export", __doc__, run, render, add_args, child=child)
