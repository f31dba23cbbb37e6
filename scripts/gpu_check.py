"""The GPU check of issue 26: one prepared run, at most 8 minutes on one GPU, of the paths a GPU user takes.

    scripts/gpu_check.sh                      # on a GPU: writes bench/gpu/check.json and bench/gpu/check.md
    scripts/gpu_check.sh --dry-run --out DIR  # every stage on this CPU with tiny sizes (under a minute idle)

A Raiden-width model with 4 layers (scripts/make_scale_model.py, ~11.6 GB bf16) and random 2048-token blocks;
each of STAGES is one fresh `scripts.bench_train` process, checked against TARGETS (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts import bench, bench_train, harness
from scripts.harness import ROOT, describe, log

RECIPE = ["bf16=true", "activation_checkpointing=true", "ce_chunk_tokens=4096"]
STAGES = {  # name: (impl, extra bench_train arguments)
    "baseline": ("baseline", []),
    "router_tune": ("router_tune", []),
    "recipe": ("router_tune", [a for kv in RECIPE for a in ("--set", kv)]),
    # the head of a model sharded outside transformers' loader is a DTensor: the plain CE reads it
    "fsdp2": ("router_tune", ["--fsdp-one-rank", "--set", "bf16=true", "--set", "ce_chunk_tokens=0"]),
    "nf4": ("router_tune", ["--set", "quantize=nf4", "--set", "bf16=true", "--set", "activation_checkpointing=true"]),
}
TARGETS = {  # check: (comparison, bound), from issue 26
    "speed_ratio": (">=", 1.0),
    "mfu": (">=", 0.35),
    "plan_error": ("<=", 0.15),
    "nf4_weights_ratio": ("<=", 0.35),
}


def sizes(dry_run: bool) -> dict:
    if dry_run:
        return {"seq": 32, "batch": 2, "steps": 3, "warmup": 1, "device": "cpu", "threads": 2}
    return {"seq": 2048, "batch": 2, "steps": 6, "warmup": 2, "device": "cuda", "threads": 8}


def build_model(work: Path, dry_run: bool) -> Path:
    """The model every stage loads: Raiden's widths with 4 layers on a GPU, a tiny Mixtral in a dry run."""
    if dry_run:
        return harness.make_random_mixtral(
            work / "tiny", experts=4, hidden=64, layers=2, intermediate=128, vocab=1000, dtype="bfloat16"
        )
    out = work / "raiden-4-layers"
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(harness.module_cmd("make_scale_model", "--out", out, "--layers", 4), check=True, cwd=ROOT)
    return out


def run_stages(model: Path, data: Path, work: Path, size: dict) -> dict:
    runs = {}
    for name, (impl, extra) in STAGES.items():
        out = work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = bench_train.cmd(
            impl=impl, model_dir=model, data=data, out_dir=out, batch=size["batch"], steps=size["steps"],
            warmup=size["warmup"], threads=size["threads"], device=size["device"], dtype="bfloat16",
            routing_log_every=0, logging_steps=size["steps"],
        )  # fmt: skip
        started = time.perf_counter()
        runs[name] = harness.run_json(cmd + extra, size["threads"], timeout=600)
        runs[name]["wall_s"] = time.perf_counter() - started
        log(f"  {name:<12} {runs[name]['tokens_per_s']:10.1f} tok/s  ({runs[name]['wall_s']:.0f} s)")
        shutil.rmtree(out, ignore_errors=True)
    return runs


def summarise(runs: dict, model: Path) -> dict:
    """Per stage: tokens/s, MFU, peak memory against the plan, dtypes; and every target's verdict."""
    fpt, _ = bench.flops_per_token(str(model))
    gpu = next((r["gpu_name"] for r in runs.values() if r.get("gpu_name")), None)
    peak = next((v for k, v in bench.PEAK_BF16_TFLOPS.items() if gpu and k in gpu), None)
    stages = {}
    for name, r in runs.items():
        peak_mb = r["cuda_peak_allocated_mb"]
        stages[name] = {
            "tokens_per_s": r["tokens_per_s"],
            "mfu": r["tokens_per_s"] * fpt / (peak * 1e12) if peak else None,
            "peak_mb": peak_mb,
            "plan_mb": r.get("plan_total_mb"),
            "plan_error": peak_mb / r["plan_total_mb"] - 1 if peak_mb and r.get("plan_total_mb") else None,
            "router_dtypes": r.get("router_dtypes"),
            "router_state_dtypes": r.get("router_state_dtypes"),
            "frozen_dtypes": r.get("frozen_dtypes"),
            "model_bytes": r.get("model_bytes"),
        }
    tuned = [s for n, s in stages.items() if n != "baseline"]
    checks = {
        "speed_ratio": stages["router_tune"]["tokens_per_s"] / stages["baseline"]["tokens_per_s"],
        "mfu": stages["router_tune"]["mfu"],
        "plan_error": max((abs(s["plan_error"]) for s in tuned if s["plan_error"] is not None), default=None),
        "nf4_weights_ratio": stages["nf4"]["model_bytes"] / stages["router_tune"]["model_bytes"],
        "routers_fp32": all(s["router_dtypes"] == s["router_state_dtypes"] == ["float32"] for s in tuned),
    }
    verdicts = {name: harness.judge(checks[name], target) for name, target in TARGETS.items()}
    verdicts["routers_fp32"] = "PASS" if checks["routers_fp32"] else "MISS"
    return {"gpu_name": gpu, "flops_per_token_4N": fpt, "stages": stages, "checks": checks, "verdicts": verdicts}


def markdown(result: dict) -> str:
    def num(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = [
        f"# GPU check ({'dry run on a CPU' if result['dry_run'] else result['gpu_name']})",
        "",
        f"{describe(result['provenance'])}; `scripts/gpu_check.sh`; model {result['model']}, "
        f"{result['sizes']['batch']} x {result['sizes']['seq']} tokens per step, {result['sizes']['steps']} steps "
        f"({result['sizes']['warmup']} untimed); {result['seconds']:.0f} s.",
        "",
        "| stage | tokens/s | MFU (4N) | peak MB | plan MB | peak vs plan | routers / Adam | frozen | weights MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["stages"].items():
        routers = "/".join(s["router_dtypes"] or ["-"]) + " / " + "/".join(s["router_state_dtypes"] or ["-"])
        weights_mb = s["model_bytes"] / 2**20 if s["model_bytes"] else None
        lines.append(
            f"| {name} | {num(s['tokens_per_s'])} | {num(s['mfu'], '{:.1%}')} | {num(s['peak_mb'], '{:.0f}')} | "
            f"{num(s['plan_mb'], '{:.0f}')} | {num(s['plan_error'], '{:+.1%}')} | {routers} | "
            f"{'/'.join(s['frozen_dtypes'] or ['-'])} | {num(weights_mb, '{:.0f}')} |"
        )
    lines += ["", "| check | value | target | verdict |", "|---|---|---|---|"]
    for name, (op, bound) in TARGETS.items():
        lines.append(
            f"| {name} | {num(result['checks'][name], '{:.3f}')} | {op} {bound} | {result['verdicts'][name]} |"
        )
    lines.append(
        f"| routers_fp32 | {result['checks']['routers_fp32']} | every router_tune stage | "
        f"{result['verdicts']['routers_fp32']} |"
    )
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    args.dry_run = args.dry_run or args.smoke
    started, record = time.time(), harness.provenance()  # before any file is written: the tree as measured
    size = sizes(args.dry_run)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work_dir, args.dry_run)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    n_blocks = size["batch"] * size["steps"]
    data = harness.make_random_blocks(
        args.work_dir / f"blocks-s{size['seq']}-n{n_blocks}", vocab=vocab, seq=size["seq"], n_blocks=n_blocks
    )
    log(f"model {model}, blocks {data}")
    result = {
        "dry_run": args.dry_run,
        "provenance": record,
        "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
        "sizes": size,
        **summarise(run_stages(model, data, args.work_dir, size), model),
    }
    return {**result, "seconds": time.time() - started}


def add_args(p) -> None:
    p.add_argument("--dry-run", action="store_true", help="every stage on this CPU with tiny sizes (= --smoke)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "build" / "gpu-check", help="model, blocks, runs")


if __name__ == "__main__":
    import sys

    argv = sys.argv[1:] if "--out" in sys.argv else [*sys.argv[1:], "--out", str(ROOT / "bench" / "gpu")]
    harness.main("check", __doc__, run, markdown, add_args, argv)
