"""Export benchmark: the default (verified) export and the bare splice vs loading and re-saving the model.

    python scripts/bench_export.py --out bench/export.json [--work-dir bench/work] [--repeats 3]

Generates (once, kept in the work dir) a random bf16 Mixtral checkpoint of >= 1 GB in three
shards, legacy layout, plus a run directory with trained routers. Then, each in a fresh
subprocess so that peak RSS is the method's own, `repeats` times, interleaved:
  export  `export_run(run, out)`: the default, fingerprint check + splice + verification
  splice  `export_run(run, out, verify=False)`: fingerprint check + splice (`--no-verify`)
  reload  `from_pretrained` + `load_router_state_dict` + `save_pretrained`
and reports the median wall time of the operation (imports excluded) and the median peak RSS
(VmHWM, which includes torch + transformers after import: also reported).
`bench.py` calls `run_benchmark(work_dir)`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import vm_hwm
from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
# 12 layers x (8 experts x 3 x 1024 x 2048 + attention) + 2 x 32000 x 1024 embeddings = 0.67 G params = 1.34 GB in bf16
SHAPE = dict(
    hidden_size=1024,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
)
SHARDS = 3


def make_checkpoint(model_dir: Path) -> Path:
    """Random bf16 Mixtral in the legacy layout, written tensor by tensor (never a whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    if (model_dir / "model.safetensors.index.json").is_file():
        return model_dir
    tmp = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = MixtralConfig(**SHAPE, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(tmp)
    h, i, e = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_local_experts"]
    kv = SHAPE["num_key_value_heads"]
    head = h // SHAPE["num_attention_heads"]
    layers = []
    for n in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{n}"
        t = {
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv * head, h),
            f"{p}.self_attn.v_proj.weight": (kv * head, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.block_sparse_moe.gate.weight": (e, h),
        }
        for x in range(e):
            t.update(
                {
                    f"{p}.block_sparse_moe.experts.{x}.w1.weight": (i, h),
                    f"{p}.block_sparse_moe.experts.{x}.w3.weight": (i, h),
                    f"{p}.block_sparse_moe.experts.{x}.w2.weight": (h, i),
                }
            )
        layers.append(t)
    layers[0] = {"model.embed_tokens.weight": (SHAPE["vocab_size"], h), **layers[0]}
    layers[-1] = {**layers[-1], "model.norm.weight": (h,), "lm_head.weight": (SHAPE["vocab_size"], h)}
    per_shard = -(-len(layers) // SHARDS)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        shapes = {k: v for layer in layers[s * per_shard : (s + 1) * per_shard] for k, v in layer.items()}
        tensors = {
            k: (torch.ones(v) if len(v) == 1 else torch.randn(v, generator=gen) * 0.02).to(torch.bfloat16)
            for k, v in shapes.items()
        }
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tmp.rename(model_dir)
    return model_dir


def make_run(model_dir: Path, run_dir: Path) -> Path:
    """A run directory whose routers are random fp32 tensors (what training writes)."""
    import torch
    from safetensors.torch import save_file

    from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
    from router_tune.model.fingerprints import checkpoint_fingerprints

    run_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    routers = {
        f"model.layers.{n}.mlp.gate.weight": torch.randn(
            SHAPE["num_local_experts"], SHAPE["hidden_size"], generator=gen
        )
        * 0.02
        for n in range(SHAPE["num_hidden_layers"])
    }
    save_file(
        routers,
        str(run_dir / "routers.safetensors"),
        metadata={"format": "router_tune.routers", "source_model": str(model_dir)},
    )
    meta = {
        "source_model": str(model_dir),
        "source_dir": str(model_dir),
        "architecture": "mixtral",
        "layout": "legacy",
        "num_experts": SHAPE["num_local_experts"],
        "top_k": SHAPE["num_experts_per_tok"],
        "fingerprints": checkpoint_fingerprints(model_dir),
        "fingerprint_format": FINGERPRINT_FORMAT,
        "global_step": 0,
        "recipe": {},
    }
    (run_dir / "router_tune.json").write_text(json.dumps(meta, indent=2))
    return run_dir


def peak_rss_mb() -> float:
    return vm_hwm() / 2**20


def child(method: str, model_dir: Path, run_dir: Path, out_dir: Path) -> dict:
    """One measured export, in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM  # imported before timing in both methods

    from router_tune.export.exporter import export_run
    from router_tune.io.router_files import read_trained_routers
    from router_tune.model.routers import load_router_state_dict

    torch.set_num_threads(2)
    base_rss = peak_rss_mb()
    start = time.perf_counter()
    if method in ("export", "splice"):  # the default export verifies; --no-verify is the splice alone
        export_run(run_dir, out_dir, fmt="full", layout="same", verify=method == "export")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        load_router_state_dict(model, read_trained_routers(run_dir).tensors)
        model.save_pretrained(out_dir)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_after_imports_mb": base_rss}


def run_benchmark(work_dir: str | Path = ROOT / "bench" / "work", repeats: int = 3) -> dict:
    """Generate the checkpoint once, then time both methods `repeats` times each; returns medians."""
    work = Path(work_dir).absolute()
    model_dir = make_checkpoint(work / "mixtral-random-bf16")
    make_run(model_dir, work / "run")  # the child processes export this run
    shards = sorted(model_dir.glob("*.safetensors"))
    samples: dict[str, list[dict]] = {"export": [], "splice": [], "reload_save": []}
    for _ in range(repeats):
        for method in samples:
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", method, "--work-dir", str(work)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=False,
            )
            if proc.returncode:
                raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
            samples[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
    result = {
        "checkpoint_gb": round(sum(f.stat().st_size for f in shards) / 1e9, 3),
        "largest_shard_mb": round(max(f.stat().st_size for f in shards) / 2**20, 1),
        "shards": len(shards),
        "dtype": "bfloat16",
        "repeats": repeats,
        **provenance(),
    }
    for method, runs in samples.items():
        result[method] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        result[method]["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    model_mb = sum(f.stat().st_size for f in shards) / 2**20
    for method in ("export", "splice"):  # against the model's bytes (issue 12: <= 0.25 verified)
        m = result[method]
        m["peak_rss_over_model"] = round(m["peak_rss_mb"] / model_mb, 3)
        m["added_rss_over_model"] = round((m["peak_rss_mb"] - m["rss_after_imports_mb"]) / model_mb, 3)
    for method in ("export", "splice"):  # against from_pretrained + save_pretrained
        result[f"{method}_time_ratio"] = round(result[method]["seconds"] / result["reload_save"]["seconds"], 3)
        result[f"{method}_rss_ratio"] = round(result[method]["peak_rss_mb"] / result["reload_save"]["peak_rss_mb"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["export", "splice", "reload_save"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = args.work_dir
        print(json.dumps(child(args.child, work / "mixtral-random-bf16", work / "run", work / f"out-{args.child}")))
        return
    result = run_benchmark(args.work_dir, args.repeats)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
