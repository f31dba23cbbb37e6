"""A bf16 checkpoint trained on this CPU: `model_dtype: auto` (fp32 compute where the CPU has no native
bf16 matmul) against `model_dtype: bfloat16`, side by side in one run -> bench/cpu-dtype.json and .md.

    python scripts/bench_cpu_dtype.py [--repeats 2] [--steps 4]

The checkpoint is a random Mixtral stored in bf16 (hidden 512, 4 layers, 8 experts, top-2: 0.4B
parameters, like the hub's bf16 frankenMoEs in all but width); each run is a fresh process
(scripts/bench_train.py) of router_tune's trainer, the two settings alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import bench_train
from provenance import ROOT, describe, provenance

import bench


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="steps per run, the first untimed")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    model = bench_train.make_random_mixtral(args.work_dir / "mixtral-h512-e8-bf16", experts=8, dtype="bfloat16")
    blocks = bench_train.make_random_blocks(
        args.work_dir / f"random-s{args.seq}-n{args.batch * args.steps}",
        vocab=32000,
        seq=args.seq,
        n_blocks=args.batch * args.steps,
    )
    import torch

    from router_tune.model.loading import cpu_matmul_slowdown

    runs = []
    for repeat in range(args.repeats):
        for setting in ("auto", "bfloat16"):
            out_dir = args.work_dir / f"cpu-dtype-{setting}-{repeat}"
            cmd = ["--impl", "router_tune", "--model-dir", str(model), "--data", str(blocks), "--out-dir", str(out_dir)]
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", "1"]
            cmd += ["--threads", str(args.threads), "--dtype", setting]
            result = bench.run_child(cmd, args.threads)
            runs.append({"setting": setting, "repeat": repeat, **result})
            print(f"{setting}: {result['tokens_per_s']:.1f} tokens/s ({result['weights_dtype']} weights)", flush=True)

    per = {s: [r["tokens_per_s"] for r in runs if r["setting"] == s] for s in ("auto", "bfloat16")}
    median = {s: statistics.median(v) for s, v in per.items()}
    results = {
        **provenance(),
        "model": "random Mixtral stored in bf16: hidden 512, 4 layers, 8 experts, top-2",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "threads": args.threads,
        "bf16_matmul_slowdown": cpu_matmul_slowdown(torch.bfloat16),
        "tokens_per_s": per,
        "median_tokens_per_s": median,
        "auto_over_bfloat16": median["auto"] / median["bfloat16"],
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-dtype.json").write_text(json.dumps(results, indent=1) + "\n")
    weights = {s: next(r["weights_dtype"] for r in runs if r["setting"] == s) for s in per}
    lines = [
        "# A bf16 checkpoint trained on this CPU: model_dtype auto against bfloat16",
        "",
        f"`python scripts/bench_cpu_dtype.py` at {describe(results)}. {results['model']}; "
        f"{args.batch} x {args.seq} tokens per step, {args.steps} steps per run (first untimed), "
        f"{args.repeats} alternating runs per setting, {args.threads} threads. This CPU's bf16 matmul is "
        f"{results['bf16_matmul_slowdown']:.0f}x slower than fp32 (256 x 256, measured by router_tune).",
        "",
        "| model_dtype | weights computed in | tokens/s (median) | runs |",
        "|---|---|---:|---|",
        *(
            f"| {s} | {weights[s]} | {median[s]:.1f} | {', '.join(f'{v:.1f}' for v in per[s])} |"
            for s in ("auto", "bfloat16")
        ),
        "",
        f"**auto / bfloat16: {results['auto_over_bfloat16']:.1f}x** the tokens per second.",
        "",
    ]
    (args.out / "cpu-dtype.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
