"""A bf16 checkpoint trained on this CPU: `model_dtype: auto` (fp32 compute where the CPU has no native
bf16 matmul) against `model_dtype: bfloat16`, side by side in one run -> bench/cpu-dtype.json and .md.

    python -m scripts.bench_cpu_dtype [--repeats 2] [--steps 4]

The checkpoint is a random Mixtral stored in bf16 (hidden 512, 4 layers, 8 experts, top-2: 0.4B
parameters); each run is a fresh `scripts.bench_train` process, the two settings alternating.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from scripts import bench_train, harness

SETTINGS = ("auto", "bfloat16")


def run(args) -> dict:
    import torch

    from router_tune.model.loading import cpu_matmul_slowdown

    shape = dict(hidden=64, intermediate=128, layers=2, vocab=1000) if args.smoke else {}
    if args.smoke:
        args.repeats, args.steps, args.seq = 1, 3, 32
    vocab, n = shape.get("vocab", 32000), args.batch * args.steps
    name = f"mixtral-h{shape.get('hidden', 512)}-e8-bf16"
    model = harness.make_random_mixtral(args.work_dir / name, experts=8, dtype="bfloat16", **shape)
    blocks = harness.make_random_blocks(
        args.work_dir / f"random-v{vocab}-s{args.seq}-n{n}", vocab=vocab, seq=args.seq, n_blocks=n
    )
    runs = []
    for repeat in range(args.repeats):
        for setting in SETTINGS:
            out_dir = args.work_dir / f"cpu-dtype-{setting}-{repeat}"
            cmd = bench_train.cmd(
                impl="router_tune", model_dir=model, data=blocks, out_dir=out_dir, batch=args.batch,
                steps=args.steps, warmup=1, threads=args.threads, dtype=setting,
            )  # fmt: skip
            result = harness.run_json(cmd, args.threads)
            runs.append({"setting": setting, "repeat": repeat, **result})
            print(f"{setting}: {result['tokens_per_s']:.1f} tokens/s ({result['weights_dtype']} weights)", flush=True)
    per = {s: [r["tokens_per_s"] for r in runs if r["setting"] == s] for s in SETTINGS}
    median = {s: statistics.median(v) for s, v in per.items()}
    return {
        **harness.provenance(),
        "model": "random Mixtral stored in bf16: hidden 512, 4 layers, 8 experts, top-2",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "bf16_matmul_slowdown": cpu_matmul_slowdown(torch.bfloat16),
        "tokens_per_s": per,
        "median_tokens_per_s": median,
        "auto_over_bfloat16": median["auto"] / median["bfloat16"],
        "runs": runs,
    }


def render(r: dict) -> str:
    weights = {s: next(x["weights_dtype"] for x in r["runs"] if x["setting"] == s) for s in SETTINGS}
    median, per = r["median_tokens_per_s"], r["tokens_per_s"]
    repeats = r.get("repeats", len(per["auto"]))
    lines = [
        "# A bf16 checkpoint trained on this CPU: model_dtype auto against bfloat16",
        "",
        f"`python -m scripts.bench_cpu_dtype` at {harness.describe(r)}. {r['model']}; "
        f"{r['batch']} x {r['seq']} tokens per step, {r['steps']} steps per run (first untimed), "
        f"{repeats} alternating runs per setting, {r['threads']} threads. This CPU's bf16 matmul is "
        f"{r['bf16_matmul_slowdown']:.0f}x slower than fp32 (256 x 256, measured by router_tune).",
        "",
        "| model_dtype | weights computed in | tokens/s (median) | runs |",
        "|---|---|---:|---|",
        *(f"| {s} | {weights[s]} | {median[s]:.1f} | {', '.join(f'{v:.1f}' for v in per[s])} |" for s in SETTINGS),
        "",
        f"**auto / bfloat16: {r['auto_over_bfloat16']:.1f}x** the tokens per second.",
        "",
    ]
    return "\n".join(lines)


def add_args(p) -> None:
    p.add_argument("--work-dir", type=Path, default=harness.ROOT / "bench" / "work")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="steps per run, the first untimed")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)


if __name__ == "__main__":
    harness.main("cpu-dtype", __doc__, run, render, add_args)
