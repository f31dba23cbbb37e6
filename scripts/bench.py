"""router_tune against the plain transformers baseline, side by side, on this machine (docs/benchmarks.md).

make bench                                  # = python -m scripts.bench --out bench  (< 20 min, 2 cores)
python -m scripts.bench --quick             # ~3 min: main case, 1 repeat, no export
python -m scripts.bench --device cuda --dtype bfloat16 --cases train   # on a GPU: adds MFU
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

from scripts import bench_export, bench_train, harness
from scripts.harness import DEMO, ROOT, log

# Dense bf16 peak per GPU (TFLOP/s), for MFU; pass --peak-tflops for any other device.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}
TARGETS = {  # (ratio router_tune / baseline, comparison, bound)
    "tokens_per_s": (">=", 1.0),
    "peak_rss": ("<=", 0.8),
    "checkpoint_bytes": ("<=", 0.01),
    "export_s": ("<=", 0.33),
    "export_rss": ("<=", 0.25),
    "telemetry_overhead": ("<=", 0.03),
    "expert_scaling": ("<=", 0.15),
}
IMPLS = ("router_tune", "baseline")
METRICS = (  # of the runs, summarised per case and implementation (train_rss_increment_mb: computed)
    "tokens_per_s", "tokens_per_cpu_s", "peak_rss_train_mb", "train_rss_increment_mb", "checkpoint_bytes",
    "checkpoint_save_s", "cuda_peak_allocated_mb",
)  # fmt: skip
HEAD = ["| | router_tune | baseline | ratio | target | |", "|---|---|---|---|---|---|"]  # of the tables of `row`s


def plan(args) -> dict:
    """Models, blocks and the training variants (one variant = one child command per repeat)."""
    work, seq, n_blocks = args.work_dir, args.seq, args.batch * args.steps
    shape = dict(hidden=64, intermediate=128, layers=2, vocab=1000) if args.smoke else {}
    models = {
        e: harness.make_random_mixtral(work / f"mixtral-h{shape.get('hidden', 512)}-e{e}", experts=e, **shape)
        for e in ((8,) if args.quick else (4, 8, 16))
    }
    vocab = shape.get("vocab", 32000)
    blocks = {
        s: harness.make_random_blocks(work / f"random-v{vocab}-s{s}-n{n_blocks}", vocab=vocab, seq=s, n_blocks=n_blocks)
        for s in ((seq,) if args.quick else (seq // 2, seq, seq * 2))
    }
    both = lambda case, model, data, **v: [{"case": case, "impl": i, "model": model, "data": data, **v} for i in IMPLS]
    variants = both("main", models[8], blocks[seq])
    variants.append({"case": "telemetry_off", "impl": "router_tune", "model": models[8], "data": blocks[seq]})
    variants[-1]["routing_log_every"] = 0
    if not args.quick:
        variants += [v for e in (4, 16) for v in both(f"experts{e}", models[e], blocks[seq])]
        variants += [v for s in (seq // 2, seq * 2) for v in both(f"seq{s}", models[8], blocks[s])]
    notes, demo = [], (DEMO / "config.json").is_file()
    if demo and not args.quick:
        n = args.demo_batch * args.steps
        demo_blocks = make_text_blocks(work / f"demo-text-s{args.demo_seq}-n{n}", DEMO, seq=args.demo_seq, n_blocks=n)
        variants += both("demo", DEMO, demo_blocks, batch=args.demo_batch)
    elif not args.quick:
        notes.append(f"demo: skipped, {DEMO.relative_to(ROOT)} does not exist (python -m scripts.make_demo_model).")
    return {"variants": variants, "notes": notes, "tokenizer": DEMO if demo else models[8]}


def make_text_blocks(out: Path, model_dir: Path, *, seq: int, n_blocks: int, seed: int = 0) -> Path:
    """Real text: the bundled samples through router_tune's own pipeline (packed, both sources), full blocks
    only, so both trainers see the same number of real tokens per step."""
    from transformers import AutoTokenizer

    from router_tune.data import build_train_dataset

    if out.is_dir():
        return out
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = build_train_dataset(harness.sample_sources(), tok, seq, seed=seed, check=False)
    full = list(itertools.islice((b for b in blocks if sum(b["token_mask"]) >= seq), n_blocks))
    if len(full) < n_blocks:
        raise RuntimeError(f"the samples give only {len(full)} full blocks of {seq} tokens")
    keys = ("input_ids", "labels", "position_ids", "token_mask", "source_id")
    return harness.save_blocks({k: [b[k] for b in full] for k in keys}, out)


def measure_training(variants: list[dict], args, after_round) -> list[dict]:
    """Every variant `repeats` times, interleaved; the order flips each repeat. `after_round` writes the
    results so far (a run cut short still leaves its completed rounds)."""
    runs = []
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            out = args.work_dir / "runs" / f"{v['case']}-{v['impl']}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            cmd = bench_train.cmd(
                impl=v["impl"], model_dir=v["model"], data=v["data"], out_dir=out, batch=v.get("batch", args.batch),
                steps=args.steps, warmup=args.warmup, threads=args.threads, logging_steps=args.logging_steps,
                routing_log_every=v.get("routing_log_every", args.routing_log_every), device=args.device,
                dtype=args.dtype,
            )  # fmt: skip
            result = harness.run_json(cmd, args.threads)
            result.update(case=v["case"], repeat=r, wall_s=time.perf_counter() - t, model=str(v["model"]))
            runs.append(result)
            log(
                f"  [{r + 1}/{args.repeats}] {v['case']:<14} {v['impl']:<11} {result['tokens_per_s']:8.1f} tok/s  "
                f"peak {result['peak_rss_train_mb']:7.0f} MB  ({result['wall_s']:.0f} s)"
            )
            shutil.rmtree(out, ignore_errors=True)
        after_round(runs, r + 1)
    return runs


def measure_data(tokenizer: Path, args) -> list[dict]:
    runs = []
    for r in range(args.repeats):
        cmd = bench_train.cmd(impl="data_pipeline", model_dir=tokenizer, seq=args.seq, blocks=args.data_blocks)
        runs.append(harness.run_json(cmd, args.threads))
        log(f"  [{r + 1}/{args.repeats}] data pipeline {runs[-1]['tokens_per_s']:10.0f} tok/s")
    return runs


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict], metric) -> dict:
    """{case: {impl: spread}} of one metric (a key of the runs, or a function of a run)."""
    out: dict[str, dict] = {}
    for run in runs:
        out.setdefault(run["case"], {}).setdefault(run["impl"], []).append(
            metric(run) if callable(metric) else run[metric]
        )
    return {case: {impl: spread(v) for impl, v in impls.items()} for case, impls in out.items()}


def verdict(name: str, value: float | None) -> str:
    return harness.judge(value, TARGETS[name])


def flops_per_token(model_dir: str) -> tuple[int, dict]:
    from transformers import AutoConfig

    counts = bench_train.active_params(AutoConfig.from_pretrained(model_dir))
    return 4 * counts["total_active"], counts


def build_results(runs, data_runs, export, notes, args, started) -> dict:
    increment = lambda r: r["peak_rss_train_mb"] - r["rss_before_train_mb"]
    summaries = {m: summarise(runs, increment if m == "train_rss_increment_mb" else m) for m in METRICS}
    gpu_name = next((r["gpu_name"] for r in runs if r.get("gpu_name")), None)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu_name and k in gpu_name), None)
    cases = {}
    for case in summaries["tokens_per_s"]:
        first = next(r for r in runs if r["case"] == case)
        fpt, counts = flops_per_token(first["model"])
        c = cases[case] = {name: s[case] for name, s in summaries.items()}
        c.update(flops_per_token_4N=fpt, active_params=counts, seq=first["seq"], batch=first["batch"])
        for impl, s in c["tokens_per_s"].items():
            c.setdefault("achieved_tflops", {})[impl] = s["median"] * fpt / 1e12
            if peak:
                c.setdefault("mfu", {})[impl] = s["median"] * fpt / (peak * 1e12)
    data = {"runs": data_runs, "tokens_per_s": spread([r["tokens_per_s"] for r in data_runs])} if data_runs else None
    return {
        "machine": machine_info(args),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": started,
        "seconds": time.time() - started,
        "notes": notes,
        "cases": cases,
        "data_pipeline": data,
        "export": export,
        "runs": runs,
    }


def machine_info(args) -> dict:
    import accelerate
    import datasets
    import safetensors
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    names = [ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")]
    info = {
        "cpu": names[0] if names else platform.processor(),
        "logical_cores": os.cpu_count(),
        "threads_used": args.threads,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
    info.update({pkg.__name__: pkg.__version__ for pkg in (accelerate, datasets, safetensors)})
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return {**info, **args.provenance}  # recorded at the start: the results written each round dirty the tree


# ---- markdown ---------------------------------------------------------------------------------------


def fmt(s: dict | None, scale: float = 1.0, digits: int = 0) -> str:
    if not s:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}-{f.format(s['max'] * scale)}]"


def ratio(a: dict | None, b: dict | None) -> float | None:
    return a["median"] / b["median"] if a and b and b["median"] else None


def row(label, pair: dict, target_name=None, scale=1.0, digits=0, rdigits=2) -> str:
    """A router_tune | baseline | ratio | target | verdict row of one metric's {impl: spread}."""
    rt, bl = pair.get("router_tune"), pair.get("baseline")
    r = ratio(rt, bl)
    target = "" if target_name is None else f"{TARGETS[target_name][0]} {TARGETS[target_name][1]:g}"
    return (
        f"| {label} | {fmt(rt, scale, digits)} | {fmt(bl, scale, digits)} | "
        f"{'-' if r is None else f'{r:.{rdigits}f}'} | {target} | {verdict(target_name, r) if target_name else ''} |"
    )


def render(res: dict) -> str:
    m, cases, s = res["machine"], res["cases"], res["settings"]
    out = [
        "# router_tune vs the transformers baseline",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads_used']} torch threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}; "
        + (harness.describe(m) if "commit" in m else "commit not recorded")
        + "; "
        f"load average at start {m['load_average'][0]:.1f} (shared machine: ratios are side by side, interleaved).",
        f"Settings: device {s['device']}, dtype {s['dtype']}, {s['repeats']} repeats, {s['steps']} steps per run "
        f"({s['warmup']} warm-up, untimed), batch {s['batch']}, routing_log_every {s['routing_log_every']}. "
        f"Cells: median [min-max]. Regenerate: `make bench` ({res['seconds'] / 60:.0f} min).",
        "",
        *[f"> {n}" for n in res["notes"]],
        *([""] if res["notes"] else []),
        "## Training",
        "",
        "Baseline: `transformers.Trainer`, only `MixtralTopKRouter` trainable, "
        "`output_router_logits=True`, model aux loss 0.01, labels = input_ids. router_tune: `RouterTrainer`, aux 0.01 "
        "(per layer, global counts), z 0.001, chunked frozen-head CE, routing statistics on. "
        "Peak RSS: whole process while training (imports and the loaded model included); "
        "increment: peak minus RSS just before `train()`.",
        "",
    ]
    labels = {"main": "random Mixtral h512 e8", "experts4": "experts 4", "experts16": "experts 16"}
    labels["demo"] = "demo frankenMoE (real text)"
    for case, c in cases.items():
        if case == "telemetry_off":
            continue
        out += [f"### {labels.get(case, case.replace('seq', 'sequence '))}: batch {c['batch']} x seq {c['seq']}", ""]
        out += HEAD + [
            row("tokens/s", c["tokens_per_s"], "tokens_per_s", digits=1),
            row("tokens per CPU-second", c["tokens_per_cpu_s"], digits=1),
            row("peak RSS, MB", c["peak_rss_train_mb"], "peak_rss"),
            row("training RSS increment, MB", c["train_rss_increment_mb"]),
        ]
        g = c.get("cuda_peak_allocated_mb") or {}
        if g.get("router_tune") and g.get("baseline"):
            out.append(row("GPU peak allocated, MB", g, "peak_rss"))
        if "mfu" in c:
            mfu, base = c["mfu"].get("router_tune", 0), c["mfu"].get("baseline", 0)
            out.append(f"| MFU at 4N, % | {100 * mfu:.1f} | {100 * base:.1f} | {mfu / max(base, 1e-12):.2f} | | |")
        t = c["achieved_tflops"]
        out += [f"| achieved TFLOP/s at 4N | {t.get('router_tune', 0):.4f} | {t.get('baseline', 0):.4f} | | | |", ""]
    out += scaling_tables(cases) + checkpoint_table(cases) + telemetry_table(cases) + data_table(res)
    out += export_table(res["export"])
    out += [
        "## Active parameters (N of 4N FLOPs per token)",
        "",
        "N = attention q/k/v/o + router [E, H] + top_k experts' MLPs (3 H I each) per layer + LM head [V, H]; "
        "embedding lookup, norms, unselected experts and attention scores (QK^T, AV) not counted. 4N = forward (2N) "
        "plus input-gradient backward (2N): no weight gradients for the frozen experts, and the router's weight "
        "gradient (2 E H per layer) is negligible.",
        "",
        "| case | attention | router | active experts | LM head | N | 4N FLOPs/token |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, c in cases.items():
        a = c["active_params"]
        parts = [a[k] for k in ("attention", "router", "active_experts", "lm_head", "total_active")]
        out.append(f"| {case} | " + " | ".join(f"{x:,}" for x in parts) + f" | {c['flops_per_token_4N']:,} |")
    return "\n".join(out) + "\n"


def scaling_tables(cases) -> list[str]:
    if not all(k in cases for k in ("experts4", "main", "experts16")):
        return []
    speeds = {n: cases[case]["tokens_per_s"] for n, case in (("4", "experts4"), ("8", "main"), ("16", "experts16"))}
    out = ["### Scaling with experts (top-2, seq 512)", ""]
    out += harness.md_table(
        ["experts", "router_tune tokens/s", "baseline tokens/s", "ratio"],
        ([n, *(fmt(t.get(i), digits=1) for i in IMPLS), f"{ratio(*map(t.get, IMPLS)):.2f}"] for n, t in speeds.items()),
    )
    for impl in IMPLS:
        drop = 1 - speeds["16"][impl]["median"] / speeds["4"][impl]["median"]
        out.append(
            f"\n{impl}: tokens/s from 4 to 16 experts changes by {-100 * drop:+.1f}% "
            f"(target: within 15%): {verdict('expert_scaling', abs(drop))}"
        )
    return out + [""]


def checkpoint_table(cases) -> list[str]:
    if "main" not in cases:
        return []
    c = cases["main"]
    return [
        "## Checkpoints (the final checkpoint of the main runs: save_strategy steps)",
        "",
        *HEAD,
        row("bytes", c["checkpoint_bytes"], "checkpoint_bytes", rdigits=5),
        row("save time, ms", c["checkpoint_save_s"], scale=1000, rdigits=3),
        "",
    ]


def telemetry_table(cases) -> list[str]:
    on = cases.get("main", {}).get("tokens_per_s", {}).get("router_tune")
    off = cases.get("telemetry_off", {}).get("tokens_per_s", {}).get("router_tune")
    if not (on and off):
        return []
    overhead = 1 - on["median"] / off["median"]
    return [
        "## Telemetry overhead (router_tune, main case)",
        "",
        "| routing statistics | tokens/s | overhead | target | |",
        "|---|---|---|---|---|",
        f"| off (routing_log_every 0) | {fmt(off, digits=1)} | | | |",
        f"| on (routing_log_every 10) | {fmt(on, digits=1)} | {100 * overhead:+.1f}% | <= 3% | "
        f"{verdict('telemetry_overhead', overhead)} |",
        "",
    ]


def data_table(res) -> list[str]:
    d, main = res["data_pipeline"], res["cases"].get("main", {}).get("tokens_per_s", {})
    if not d:
        return []
    out = ["## Data pipeline (router_tune.data.pipeline_throughput, bundled samples, block 512)", ""]
    out += ["| | tokens/s | data / training |", "|---|---|---|", f"| data pipeline | {fmt(d['tokens_per_s'])} | |"]
    for impl in (i for i in IMPLS if main.get(i)):
        x = d["tokens_per_s"]["median"] / main[impl]["median"]
        out.append(f"| training, {impl} (main) | {fmt(main[impl], digits=1)} | {x:.0f}x |")
    return out + [""]


def export_table(e) -> list[str]:
    if not e:
        return []
    if "skipped" in e:
        return ["## Export", "", f"> {e['skipped']}", ""]
    base = e["reload_save"]

    def rows(method: str, label: str) -> list[str]:
        m = e[method]
        t, r = m["seconds"] / base["seconds"], m["peak_rss_mb"] / base["peak_rss_mb"]
        return [
            f"| {label}: time, s | {m['seconds']:.2f} {m.get('all_seconds', '')} | "
            f"{base['seconds']:.2f} {base.get('all_seconds', '')} | {t:.2f} | <= 0.33 | {verdict('export_s', t)} |",
            f"| {label}: peak RSS, MB | {m['peak_rss_mb']:,.0f} | {base['peak_rss_mb']:,.0f} | {r:.2f} | <= 0.25 | "
            f"{verdict('export_rss', r)} |",
        ]

    return [
        f"## Export ({e['checkpoint_gb']} GB {e['dtype']} checkpoint, {e['shards']} shards, "
        f"largest {e['largest_shard_mb']} MB; scripts/bench_export.py, medians of {e['repeats']})",
        "",
        "| | router_tune | from_pretrained + save_pretrained | ratio | target | |",
        "|---|---|---|---|---|---|",
        *rows("export", "default export (verified)"),
        *rows("splice", "--no-verify (splice only)"),
        "",
        *[
            f"{label}: peak RSS {e[m]['peak_rss_over_model']:.2f}x the model's bytes, "
            f"{e[m]['added_rss_over_model']:.2f}x above the {e[m]['rss_after_imports_mb']:,.0f} MB "
            "of the interpreter with torch and transformers imported (issue 12: <= 0.25x verified)."
            for m, label in (("export", "Default export"), ("splice", "--no-verify"))
            if "peak_rss_over_model" in e[m]
        ],
        "",
    ]


def add_args(p) -> None:
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work", help="generated models, blocks, run dirs")
    p.add_argument("--cases", default="train,checkpoint,export,data,telemetry", help="comma list of these cases")
    p.add_argument("--only", default=None, help="training cases to run, e.g. demo or main,experts4 (default all)")
    p.add_argument("--quick", action="store_true", help="smoke run: main case and telemetry, 1 repeat, no export")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="steps per run, warm-up included (cpu 4, cuda 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (cpu 1, cuda 5)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (cpu 2, cuda 16)")
    p.add_argument("--seq", type=int, default=512, help="main sequence length; scaling uses half and double")
    p.add_argument("--demo-batch", type=int, default=8)
    p.add_argument("--demo-seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    p.add_argument("--routing-log-every", type=int, default=10)
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--data-blocks", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known GPUs are looked up)")


def run(args) -> dict:
    if args.smoke:  # a tiny model, the quick cases, one repeat
        args.quick, args.seq, args.data_blocks, args.steps = True, 32, 4, 3
    gpu = args.device == "cuda"
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (30 if gpu else (3 if args.quick else 4))
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.batch = args.batch or (16 if gpu else 2)
    args.cases = set(args.cases.split(",")) - ({"export"} if args.quick else set())
    if args.steps - args.warmup < 2:
        raise SystemExit("need at least 2 steps after warm-up")
    args.provenance, started = harness.provenance(), time.time()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log(f"bench: cases {sorted(args.cases)}, {args.repeats} repeats, work dir {args.work_dir}")
    p = plan(args)
    variants = p["variants"] if args.cases & {"train", "checkpoint", "telemetry"} else []
    if "telemetry" not in args.cases:
        variants = [v for v in variants if v["case"] != "telemetry_off"]
    if "train" not in args.cases:
        variants = [v for v in variants if v["case"] in ("main", "telemetry_off")]
    if args.only:
        variants = [v for v in variants if v["case"] in args.only.split(",")]
    # The short fixed-size cases first, then the training rounds, written after every round.
    data_runs = measure_data(p["tokenizer"], args) if "data" in args.cases else []
    export = bench_export.measure(args.work_dir / "export", repeats=args.repeats) if "export" in args.cases else None
    if args.quick:
        export = {"skipped": "export: not run with --quick (run without --quick)"}
    args.out.mkdir(parents=True, exist_ok=True)

    def write(runs, rounds):
        partial = [f"PARTIAL: {rounds} of {args.repeats} repeats done when this was written."]
        partial = partial if rounds < args.repeats else []
        res = build_results(runs, data_runs, export, p["notes"] + partial, args, started)
        (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (args.out / "results.md").write_text(render(res))
        return res

    return write(measure_training(variants, args, after_round=write), args.repeats)


if __name__ == "__main__":
    harness.main("results", __doc__, run, render, add_args)
