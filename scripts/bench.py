"""router_tune against the plain transformers baseline, side by side, on this machine.

    make bench                                   # = python scripts/bench.py --out bench  (< 20 min, 2 cores)
    python scripts/bench.py --quick              # ~3 min smoke run: main case, 1 repeat, no export
    python scripts/bench.py --device cuda --dtype bfloat16 --cases train   # on a GPU: adds MFU

Every measured run is a fresh process (`scripts/bench_train.py`), so its peak RSS is its own;
router_tune and the baseline run on the same model, blocks, batch, sequence length, steps and
threads, interleaved (the order flips every repeat), >= 3 repeats, and the tables show medians
with [min-max]. Warm-up steps are not timed; tokens/s counts every measured step, logging and
routing statistics included, the final checkpoint excluded (it is timed on its own).

Cases
  train       tokens/s and peak RSS: random Mixtral (hidden 512, 8 experts, 4 layers,
              intermediate 1024, vocab 32000, seq 512); experts 4/8/16 at top-2; seq 256/1024;
              the demo frankenMoE (router_tune/assets/demo-moe) on real text when it exists.
  checkpoint  bytes and save time of the final checkpoint of the main runs.
  export      scripts/bench_export.py: default export and splice vs from_pretrained + save_pretrained (>= 1 GB).
  data        router_tune.data.pipeline_throughput on the bundled samples vs training tokens/s.
  telemetry   router_tune with routing statistics (routing_log_every 10) vs off (0).

Writes OUT/results.json (every raw run, medians, machine) and OUT/results.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from provenance import describe, provenance

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import bench_train  # noqa: E402  (scripts/ helper, same folder)

DEMO = ROOT / "router_tune" / "assets" / "demo-moe"
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


# ---- set-up ---------------------------------------------------------------------------


def plan(args) -> dict:
    """Models, blocks and the training variants (one variant = one child command per repeat)."""
    work = args.work_dir
    batch, seq = args.batch, args.seq
    n_blocks = batch * args.steps
    models = {e: work / f"mixtral-h512-e{e}" for e in ((8,) if args.quick else (4, 8, 16))}
    seqs = (seq,) if args.quick else (seq // 2, seq, seq * 2)
    variants = []

    def add(case, impl, model, data, **kw):
        variants.append({"case": case, "impl": impl, "model": model, "data": data, **kw})

    for e, model in models.items():
        bench_train.make_random_mixtral(model, experts=e)
    blocks = {
        s: bench_train.make_random_blocks(work / f"random-s{s}-n{n_blocks}", vocab=32000, seq=s, n_blocks=n_blocks)
        for s in seqs
    }
    for impl in ("router_tune", "baseline"):
        add("main", impl, models[8], blocks[seq])
    add("telemetry_off", "router_tune", models[8], blocks[seq], routing_log_every=0)
    if not args.quick:
        for e in (4, 16):
            for impl in ("router_tune", "baseline"):
                add(f"experts{e}", impl, models[e], blocks[seq])
        for s in (seq // 2, seq * 2):
            for impl in ("router_tune", "baseline"):
                add(f"seq{s}", impl, models[8], blocks[s])
    notes = []
    if DEMO.is_dir() and (DEMO / "config.json").is_file() and not args.quick:
        demo_blocks = bench_train.make_text_blocks(
            work / f"demo-text-s{args.demo_seq}-n{args.demo_batch * args.steps}",
            DEMO,
            seq=args.demo_seq,
            n_blocks=args.demo_batch * args.steps,
        )
        for impl in ("router_tune", "baseline"):
            add("demo", impl, DEMO, demo_blocks, batch=args.demo_batch)
    elif not args.quick:
        notes.append(f"demo: skipped, {DEMO.relative_to(ROOT)} does not exist (python scripts/make_demo_model.py).")
    return {"variants": variants, "notes": notes, "tokenizer": DEMO if (DEMO / "config.json").is_file() else models[8]}


def child_env(threads: int) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_child(cmd: list[str], threads: int, timeout: int = 1800) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "bench_train.py"), *cmd],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(threads),
        timeout=timeout,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"bench_train {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_cmd(v: dict, args, out_dir: Path) -> list[str]:
    return [
        "--impl",
        v["impl"],
        "--model-dir",
        str(v["model"]),
        "--data",
        str(v["data"]),
        "--out-dir",
        str(out_dir),
        "--batch",
        str(v.get("batch", args.batch)),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--routing-log-every",
        str(v.get("routing_log_every", args.routing_log_every)),
        "--logging-steps",
        str(args.logging_steps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]


# ---- measuring ------------------------------------------------------------------------


def measure_training(variants: list[dict], args, after_round=lambda runs, r: None) -> list[dict]:
    """Every variant `repeats` times, interleaved; the order flips each repeat. `after_round`
    writes the results so far (a run cut short still leaves its completed rounds)."""
    runs = []
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            out = args.work_dir / "runs" / f"{v['case']}-{v['impl']}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            result = run_child(train_cmd(v, args, out), args.threads)
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
        result = run_child(
            [
                "--impl",
                "data_pipeline",
                "--model-dir",
                str(tokenizer),
                "--seq",
                str(args.seq),
                "--blocks",
                str(args.data_blocks),
            ],
            args.threads,
        )
        log(f"  [{r + 1}/{args.repeats}] data pipeline {result['tokens_per_s']:10.0f} tok/s")
        runs.append(result)
    return runs


def measure_export(args) -> dict:
    try:
        import bench_export
    except ImportError:
        return {"skipped": "scripts/bench_export.py is missing: run it by its CLI when it lands."}
    return bench_export.run_benchmark(args.work_dir / "export", repeats=args.repeats)


# ---- summarising ----------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return (
        {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
        if values
        else None
    )


def summarise(runs: list[dict], metric: str) -> dict:
    """{case: {impl: spread}} of one metric."""
    out: dict[str, dict] = {}
    for run in runs:
        out.setdefault(run["case"], {}).setdefault(run["impl"], []).append(run[metric])
    return {case: {impl: spread(v) for impl, v in impls.items()} for case, impls in out.items()}


def verdict(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, bound = TARGETS[name]
    ok = value >= bound if op == ">=" else value <= bound
    return "PASS" if ok else "MISS"


def flops_per_token(model_dir: str) -> tuple[int, dict]:
    from transformers import AutoConfig

    counts = bench_train.active_params(AutoConfig.from_pretrained(model_dir))
    return 4 * counts["total_active"], counts


def build_results(runs, data_runs, export, notes, args, started) -> dict:
    tps, rss = summarise(runs, "tokens_per_s"), summarise(runs, "peak_rss_train_mb")
    tpc = summarise(runs, "tokens_per_cpu_s")
    incr = summarise([dict(r, incr=r["peak_rss_train_mb"] - r["rss_before_train_mb"]) for r in runs], "incr")
    ckpt_b, ckpt_s = summarise(runs, "checkpoint_bytes"), summarise(runs, "checkpoint_save_s")
    gpu_mem = summarise(runs, "cuda_peak_allocated_mb")
    cases = {}
    for case in tps:
        model = next(r["model"] for r in runs if r["case"] == case)
        fpt, counts = flops_per_token(model)
        cases[case] = {
            "tokens_per_s": tps[case],
            "tokens_per_cpu_s": tpc[case],
            "peak_rss_train_mb": rss[case],
            "train_rss_increment_mb": incr[case],
            "checkpoint_bytes": ckpt_b[case],
            "checkpoint_save_s": ckpt_s[case],
            "cuda_peak_allocated_mb": gpu_mem[case],
            "flops_per_token_4N": fpt,
            "active_params": counts,
            "seq": next(r["seq"] for r in runs if r["case"] == case),
            "batch": next(r["batch"] for r in runs if r["case"] == case),
        }
        peak = args.peak_tflops or gpu_peak(runs)
        for impl, s in tps[case].items():
            cases[case].setdefault("achieved_tflops", {})[impl] = s["median"] * fpt / 1e12
            if peak:
                cases[case].setdefault("mfu", {})[impl] = s["median"] * fpt / (peak * 1e12)
    return {
        "machine": machine_info(args),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": started,
        "seconds": time.time() - started,
        "notes": notes,
        "cases": cases,
        "data_pipeline": {"runs": data_runs, "tokens_per_s": spread([r["tokens_per_s"] for r in data_runs])}
        if data_runs
        else None,
        "export": export,
        "runs": runs,
    }


def gpu_peak(runs) -> float | None:
    name = next((r["gpu_name"] for r in runs if r.get("gpu_name")), None)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if name and k in name), None)


def machine_info(args) -> dict:
    import torch
    import transformers

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads_used": args.threads,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
    for pkg in ("accelerate", "datasets", "safetensors"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info.update(args.provenance)  # recorded at the start: the results files written each round dirty the tree
    return info


# ---- markdown -------------------------------------------------------------------------


def fmt(s: dict | None, scale: float = 1.0, digits: int = 0) -> str:
    if not s:
        return "-"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}-{f.format(s['max'] * scale)}]"


def ratio(a: dict | None, b: dict | None) -> float | None:
    return a["median"] / b["median"] if a and b and b["median"] else None


def row(label, rt, bl, r, target_name=None, scale=1.0, digits=0, rdigits=2) -> str:
    target = "" if target_name is None else f"{TARGETS[target_name][0]} {TARGETS[target_name][1]:g}"
    return (
        f"| {label} | {fmt(rt, scale, digits)} | {fmt(bl, scale, digits)} | "
        f"{'-' if r is None else f'{r:.{rdigits}f}'} | {target} | {verdict(target_name, r) if target_name else ''} |"
    )


def markdown(res: dict) -> str:
    m, cases = res["machine"], res["cases"]
    head = "| | router_tune | baseline | ratio | target | |\n|---|---|---|---|---|---|"
    s = res["settings"]
    out = [
        "# router_tune vs the transformers baseline",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads_used']} torch threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}; "
        + (describe(m) if "commit" in m else "commit not recorded")
        + "; "
        f"load average at start {m['load_average'][0]:.1f} (shared machine: ratios are side by side, interleaved).",
        f"Settings: device {s['device']}, dtype {s['dtype']}, {s['repeats']} repeats, {s['steps']} steps per run "
        f"({s['warmup']} warm-up, untimed), batch {s['batch']}, routing_log_every {s['routing_log_every']}. "
        f"Cells: median [min-max]. Regenerate: `make bench` ({res['seconds'] / 60:.0f} min).",
        "",
    ]
    out += [f"> {n}" for n in res["notes"]] + ([""] if res["notes"] else [])

    out += [
        "## Training",
        "",
        "Baseline: `transformers.Trainer`, only `MixtralTopKRouter` trainable, "
        "`output_router_logits=True`, model aux loss 0.01, labels = input_ids. router_tune: `RouterTrainer`, aux 0.01 "
        "(per layer, global counts), z 0.001, chunked frozen-head CE, routing statistics on. "
        "Peak RSS: whole process while training (imports and the loaded model included); "
        "increment: peak minus RSS just before `train()`.",
        "",
    ]
    labels = {
        "main": "random Mixtral h512 e8",
        "experts4": "experts 4",
        "experts16": "experts 16",
        "demo": "demo frankenMoE (real text)",
    }
    for case, c in cases.items():
        if case == "telemetry_off":
            continue
        rt, bl = c["tokens_per_s"].get("router_tune"), c["tokens_per_s"].get("baseline")
        title = labels.get(case, case.replace("seq", "sequence "))
        out += [
            f"### {title}: batch {c['batch']} x seq {c['seq']}",
            "",
            head,
            row("tokens/s", rt, bl, ratio(rt, bl), "tokens_per_s", digits=1),
            row(
                "tokens per CPU-second",
                c["tokens_per_cpu_s"].get("router_tune"),
                c["tokens_per_cpu_s"].get("baseline"),
                ratio(c["tokens_per_cpu_s"].get("router_tune"), c["tokens_per_cpu_s"].get("baseline")),
                digits=1,
            ),
            row(
                "peak RSS, MB",
                c["peak_rss_train_mb"].get("router_tune"),
                c["peak_rss_train_mb"].get("baseline"),
                ratio(c["peak_rss_train_mb"].get("router_tune"), c["peak_rss_train_mb"].get("baseline")),
                "peak_rss",
            ),
            row(
                "training RSS increment, MB",
                c["train_rss_increment_mb"].get("router_tune"),
                c["train_rss_increment_mb"].get("baseline"),
                ratio(c["train_rss_increment_mb"].get("router_tune"), c["train_rss_increment_mb"].get("baseline")),
            ),
        ]
        g = c.get("cuda_peak_allocated_mb") or {}
        if g.get("router_tune") and g.get("baseline"):
            out.append(
                row(
                    "GPU peak allocated, MB",
                    g["router_tune"],
                    g["baseline"],
                    ratio(g["router_tune"], g["baseline"]),
                    "peak_rss",
                )
            )
        if "mfu" in c:
            mfu, base = c["mfu"].get("router_tune", 0), c["mfu"].get("baseline", 0)
            out.append(f"| MFU at 4N, % | {100 * mfu:.1f} | {100 * base:.1f} | {mfu / max(base, 1e-12):.2f} | | |")
        out.append(
            f"| achieved TFLOP/s at 4N | {c['achieved_tflops'].get('router_tune', 0):.4f} | "
            f"{c['achieved_tflops'].get('baseline', 0):.4f} | | | |"
        )
        out.append("")
    out += scaling_tables(cases)
    out += checkpoint_table(cases) + telemetry_table(cases) + data_table(res) + export_table(res["export"])
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
        out.append(
            f"| {case} | {a['attention']:,} | {a['router']:,} | {a['active_experts']:,} | {a['lm_head']:,} | "
            f"{a['total_active']:,} | {c['flops_per_token_4N']:,} |"
        )
    return "\n".join(out) + "\n"


def scaling_tables(cases) -> list[str]:
    out = []
    if all(k in cases for k in ("experts4", "main", "experts16")):
        out += [
            "### Scaling with experts (top-2, seq 512)",
            "",
            "| experts | router_tune tokens/s | baseline tokens/s | ratio |",
            "|---|---|---|---|",
        ]
        for label, case in (("4", "experts4"), ("8", "main"), ("16", "experts16")):
            t = cases[case]["tokens_per_s"]
            out.append(
                f"| {label} | {fmt(t.get('router_tune'), digits=1)} | {fmt(t.get('baseline'), digits=1)} | "
                f"{ratio(t.get('router_tune'), t.get('baseline')):.2f} |"
            )
        for impl in ("router_tune", "baseline"):
            a, b = cases["experts4"]["tokens_per_s"][impl]["median"], cases["experts16"]["tokens_per_s"][impl]["median"]
            drop = 1 - b / a
            out.append(
                f"\n{impl}: tokens/s from 4 to 16 experts changes by {-100 * drop:+.1f}% "
                f"(target: within 15%): {verdict('expert_scaling', abs(drop))}"
            )
        out.append("")
    return out


def checkpoint_table(cases) -> list[str]:
    c = cases.get("main")
    if not c:
        return []
    b, s = c["checkpoint_bytes"], c["checkpoint_save_s"]
    return [
        "## Checkpoints (the final checkpoint of the main runs: save_strategy steps)",
        "",
        "| | router_tune | baseline | ratio | target | |",
        "|---|---|---|---|---|---|",
        row(
            "bytes",
            b.get("router_tune"),
            b.get("baseline"),
            ratio(b.get("router_tune"), b.get("baseline")),
            "checkpoint_bytes",
            rdigits=5,
        ),
        row(
            "save time, ms",
            s.get("router_tune"),
            s.get("baseline"),
            ratio(s.get("router_tune"), s.get("baseline")),
            scale=1000,
            rdigits=3,
        ),
        "",
    ]


def telemetry_table(cases) -> list[str]:
    on, off = (
        cases.get("main", {}).get("tokens_per_s", {}).get("router_tune"),
        cases.get("telemetry_off", {}).get("tokens_per_s", {}).get("router_tune"),
    )
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
    out = [
        "## Data pipeline (router_tune.data.pipeline_throughput, bundled samples, block 512)",
        "",
        "| | tokens/s | data / training |",
        "|---|---|---|",
        f"| data pipeline | {fmt(d['tokens_per_s'])} | |",
    ]
    for impl in ("router_tune", "baseline"):
        if main.get(impl):
            out.append(
                f"| training, {impl} (main) | {fmt(main[impl], digits=1)} | "
                f"{d['tokens_per_s']['median'] / main[impl]['median']:.0f}x |"
            )
    return out + [""]


def export_table(e) -> list[str]:
    if not e:
        return []
    if "skipped" in e:
        return ["## Export", "", f"> {e['skipped']}", ""]
    base = e["reload_save"]

    def row(method: str, label: str) -> list[str]:
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
        *row("export", "default export (verified)"),
        *row("splice", "--no-verify (splice only)"),
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


# ---- main -----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="writes results.json and results.md here")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work", help="generated models, blocks, run dirs")
    p.add_argument(
        "--cases",
        default="train,checkpoint,export,data,telemetry",
        help="comma list of train, checkpoint, export, data, telemetry",
    )
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
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.steps = args.steps or (30 if gpu else (3 if args.quick else 4))
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.batch = args.batch or (16 if gpu else 2)
    args.cases = set(args.cases.split(","))
    if args.quick:
        args.cases.discard("export")
    if args.steps - args.warmup < 2:
        p.error("need at least 2 steps after warm-up")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.provenance = provenance()
    started = time.time()
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
    export = (
        measure_export(args)
        if "export" in args.cases
        else ({"skipped": "export: not run with --quick (run without --quick)"} if args.quick else None)
    )
    args.out.mkdir(parents=True, exist_ok=True)

    def write(runs, rounds):
        notes = p["notes"] + (
            [f"PARTIAL: {rounds} of {args.repeats} repeats done when this was written."]
            if rounds < args.repeats
            else []
        )
        res = build_results(runs, data_runs, export, notes, args, started)
        (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        (args.out / "results.md").write_text(markdown(res))
        return res

    runs = measure_training(variants, args, after_round=write)
    res = write(runs, args.repeats)
    log(f"bench: wrote {args.out / 'results.md'} and results.json in {(time.time() - started) / 60:.1f} min")
    print(markdown(res))


if __name__ == "__main__":
    main()
