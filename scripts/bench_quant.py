"""Quantized router training (quantize: none | nf4 | int8) measured on this machine (docs/quantized.md).

    make bench-quant                                  # both parts (~45 min on 2 CPU cores)
    python -m scripts.bench_quant --part demo         # routing quality on the demo frankenMoE
    python -m scripts.bench_quant --part scale        # memory and speed on the Raiden-shaped scale model

Each mode in fresh processes; what each part measures: the markdown this writes. Each part replaces its own
key of OUT/quant.json.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from scripts import harness
from scripts.harness import DEMO, DEMO_RECIPE, ROOT, PeakRss, release_free_memory, rss

MODES = ("none", "nf4", "int8")
ORACLE = ",".join(f"{source}={expert}" for source, expert in harness.DEMO_ORACLE.items())
ONE_GPU_RECIPE = ROOT / "recipes" / "raiden-16x3b-1gpu.yaml"
OUTPUTS = ("bench/quant.json", "bench/quant.md")  # the bench's own outputs: no change to the code measured


def cli(*args: str, log: Path) -> None:
    """Run `router-tune ARGS` in a fresh process (output to `log`)."""
    with log.open("w") as f:
        cmd = [sys.executable, "-m", "router_tune", *args]
        subprocess.run(cmd, cwd=ROOT, env=harness.child_env(), stdout=f, stderr=f, check=True)


# ---- demo routing quality -----------------------------------------------------------------


def demo(work: Path, steps: int | None, reuse: bool, modes: list[str]) -> dict:
    rows = {}
    for mode in modes:
        run, export, report = work / f"demo-{mode}", work / f"demo-{mode}-export", work / f"demo-{mode}-eval"
        stamp = work / f"demo-{mode}.git.json"  # the commit this mode's run measured
        if not (reuse and stamp.exists() and (report / "report.json").exists()):
            for old in (run, export, report, stamp):  # every figure from this invocation's runs
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            extra = ["--max_steps", str(steps), "--save_steps", str(steps)] if steps else []
            cli(
                "train", str(DEMO_RECIPE), "--quantize", mode, "--output_dir", str(run), "--eval_before_after",
                "false", *extra, log=work / f"demo-{mode}-train.log",
            )  # fmt: skip
            cli("export", str(run), "--out", str(export), "--force", log=work / f"demo-{mode}-export.log")
            cli(
                "eval", str(export), "--compare", str(DEMO), "--data", str(DEMO_RECIPE), "--oracle", ORACLE,
                "--out", str(report), log=work / f"demo-{mode}-eval.log",
            )  # fmt: skip
            stamp.write_text(json.dumps(harness.provenance(OUTPUTS)))
        r = json.loads((report / "report.json").read_text())
        before, after, oracle = (r[k]["perplexity"]["overall"] for k in ("before", "after", "oracle"))
        state = json.loads((run / "router_tune.json").read_text())
        # the Trainer's own train_runtime (training loop only: no loading), from its final log line
        runtime = float(re.findall(r"'train_runtime': '([0-9.]+)'", (work / f"demo-{mode}-train.log").read_text())[-1])
        recipe = state["recipe"]
        tokens = state["global_step"] * recipe["per_device_train_batch_size"] * recipe["block_size"]
        rows[mode] = {
            "steps": state["global_step"],
            "perplexity_before": before,
            "perplexity_after": after,
            "perplexity_oracle": oracle,
            "gap_closed": harness.gap_closed(before, after, oracle),
            "per_source_after": r["after"]["perplexity"],
            "train_runtime_s": runtime,
            "git": json.loads(stamp.read_text()),
            "tokens_per_s": tokens / runtime,
            "quantization": state.get("quantization"),
        }
        print(f"demo {mode}: ppl {before:.2f} -> {after:.2f} (oracle {oracle:.2f}), {tokens / runtime:.0f} tok/s")
    base = rows["none"]
    for mode in modes:
        rows[mode]["gap_closed_vs_none"] = rows[mode]["gap_closed"] / base["gap_closed"]
        rows[mode]["speed_vs_none"] = rows[mode]["tokens_per_s"] / base["tokens_per_s"]
    return {"recipe": str(DEMO_RECIPE.relative_to(ROOT)), "steps_override": steps, "modes": rows}


# ---- scale model: memory and speed --------------------------------------------------------


def measure_scale(mode: str, model_dir: Path, seq: int, steps: int, out_dir: Path) -> dict:
    """One mode in this process: load (+ quantize) through RouterTrainer, then `steps` training steps."""
    import torch

    from router_tune.model.quantize import stored_bytes
    from router_tune.model.routers import router_state_dict
    from router_tune.training.trainer import RouterTrainer

    torch.manual_seed(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]  # 32000; the smoke model's 1000
    blocks = [
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "position_ids": list(range(seq))}
        for ids in torch.randint(3, min(3000, vocab), (steps, seq))
    ]
    config = harness.recipe(
        None, model_name_or_path=str(model_dir), model_dtype="bfloat16", quantize=mode, output_dir=str(out_dir),
        max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=1, gradient_checkpointing=True,
        warmup_steps=0, router_rescale="off", routing_log_every=0, logging_steps=1,
    )  # fmt: skip
    base_rss = rss()
    load_peak = PeakRss().start()
    trainer = RouterTrainer(model=str(model_dir), args=config, train_dataset=blocks)
    load_peak_rss = load_peak.stop()
    release_free_memory()
    model = trainer.model
    routers = sum(t.numel() * 4 for t in router_state_dict(model).values())
    after_load = rss()

    clock = harness.step_clock()
    trainer.add_callback(clock)
    peak = PeakRss().start()
    trainer.train()
    train_peak = peak.stop()
    return {
        "mode": mode,
        "frozen_weight_bytes": stored_bytes(model) - routers,
        "router_bytes": routers,
        "quantization": trainer.quantization.to_dict() if trainer.quantization else None,
        "rss_before_load": base_rss,
        "rss_after_load": after_load,
        "peak_rss_load": load_peak_rss,
        "peak_rss_train": train_peak,
        "train_peak_over_loaded": train_peak - after_load,
        "seq_len": seq,
        "steps": steps,
        "tokens_per_s": clock.tokens_per_s(seq, warmup=2),
    }


def plan_memory(model_dir: Path, mode: str, layers: int | None, seq: int) -> dict:
    """The memory plan (what `train --dry-run` prints) for the scale model or its 26-layer projection, with
    activation checkpointing as the measured runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from router_tune.model.loading import describe_moe
    from router_tune.model.memory import training_memory
    from router_tune.model.routers import freeze_all_but_routers

    config = AutoConfig.from_pretrained(model_dir)
    if layers:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    info = describe_moe(model, source=str(model_dir))
    counts = freeze_all_but_routers(model)
    return training_memory(
        info, counts.total, counts.trainable, config.vocab_size, seq_len=seq, dtype=torch.bfloat16, quantize=mode,
        model=model, activation_checkpointing=True,
    )  # fmt: skip


def scale(work: Path, model_dir: Path, seq: int, steps: int, reuse: bool, modes: list[str]) -> dict:
    if not model_dir.is_dir():
        subprocess.run(harness.module_cmd("make_scale_model", "--out", model_dir), check=True, cwd=ROOT)
    import yaml

    recipe = yaml.safe_load(ONE_GPU_RECIPE.read_text())
    recipe_tokens = recipe["per_device_train_batch_size"] * recipe["block_size"]
    rows = {}
    for mode in modes:
        out, stamp = work / f"scale-{mode}.json", work / f"scale-{mode}.git.json"  # kept for --reuse
        if not (reuse and out.exists() and stamp.exists()):  # in a fresh process: its RSS figures are its own
            flags = harness.flags(child=mode, model=model_dir, seq=seq, steps=steps, work=work)
            out.write_text(json.dumps(harness.run_json(harness.module_cmd("bench_quant", *flags), timeout=None)) + "\n")
            stamp.write_text(json.dumps(harness.provenance(OUTPUTS)))
        rows[mode] = {**json.loads(out.read_text()), "git": json.loads(stamp.read_text())}
        rows[mode]["plan_2_layers"] = plan_memory(model_dir, mode, None, seq)
        print(f"scale {mode}: {json.dumps({k: rows[mode][k] for k in ('frozen_weight_bytes', 'peak_rss_train')})}")
    base = rows["none"]
    for mode in modes:
        rows[mode]["weight_ratio_vs_bf16"] = rows[mode]["frozen_weight_bytes"] / base["frozen_weight_bytes"]
        if rows[mode]["tokens_per_s"] and base["tokens_per_s"]:
            rows[mode]["speed_vs_none"] = rows[mode]["tokens_per_s"] / base["tokens_per_s"]
    return {
        "model": "scripts/make_scale_model.py (Raiden widths, 2 layers, bf16)",  # as the bench files say
        "recipe_for_projection": str(ONE_GPU_RECIPE.relative_to(ROOT)),
        "recipe_tokens_per_micro_batch": recipe_tokens,
        "modes": rows,
        # the plan needs no measurement: every mode, measured here or not
        "projection_26_layers": {mode: plan_memory(model_dir, mode, 26, recipe_tokens) for mode in MODES},
    }


# ---- report -------------------------------------------------------------------------------


def gib(b) -> str:
    return f"{b / 2**30:.2f}"


def commits(modes: dict) -> str:
    done = (
        f"{m} {r['git']['commit'][:12]} ({'clean' if r['git']['clean'] else 'uncommitted changes'})"
        for m, r in modes.items()
    )
    return f"Commits measured: {', '.join(done)}.\n"


def render(data: dict) -> str:
    lines = [
        "# Quantized router training (`quantize: none | nf4 | int8`)\n",
        f"{data.get('machine', '')}. Regenerate: `make bench-quant` (scripts/bench_quant.py). Each part names "
        "the commit it measured and whether the tree was clean.\n",
    ]
    if d := data.get("demo"):
        steps = "/".join(sorted({str(r["steps"]) for r in d["modes"].values()})) + " steps"  # as the runs record
        lines += [
            f"## Demo routing quality ({d['recipe']}, {steps}, CPU; full-precision export evaluated)\n",
            commits(d["modes"]),
            "| mode | held-out ppl before | after | oracle | gap closed | vs none (target >= 0.90) | tokens/s | "
            "speed vs none |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for mode, r in d["modes"].items():
            lines.append(
                f"| {mode} | {r['perplexity_before']:.2f} | {r['perplexity_after']:.2f} | {r['perplexity_oracle']:.2f}"
                f" | {100 * r['gap_closed']:.1f}% | {r['gap_closed_vs_none']:.3f} | {r['tokens_per_s']:.0f} | "
                f"{r['speed_vs_none']:.2f} |"
            )
        lines.append("")
    if s := data.get("scale"):
        m0 = next(iter(s["modes"].values()))
        lines += [
            f"## Memory and speed on the scale model ({s['model']}; {m0['seq_len']} tokens per step, "
            "activation checkpointing, CPU)\n",
            commits(s["modes"]),
            "Frozen weights: bytes the loaded model's tensors hold (storages counted once, bitsandbytes scales "
            "included, routers excluded). RSS in GiB. Plan: router_tune.model.memory for the same settings.\n",
            "| mode | frozen weights GiB | vs bf16 (nf4 target <= 0.30) | RSS after load | peak RSS loading | "
            "peak RSS training | plan peak (2 layers) | tokens/s | speed vs none |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for mode, r in s["modes"].items():
            speed = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-"
            lines.append(
                f"| {mode} | {gib(r['frozen_weight_bytes'])} | {r['weight_ratio_vs_bf16']:.3f} | "
                f"{gib(r['rss_after_load'])} | {gib(r['peak_rss_load'])} | {gib(r['peak_rss_train'])} | "
                f"{gib(r['plan_2_layers']['total_bytes'])} | {speed} | {r.get('speed_vs_none', float('nan')):.2f} |"
            )
        lines += [
            "",
            f"### Projection to the real 36B model (26 layers), {s['recipe_tokens_per_micro_batch']} tokens per "
            f"micro-batch ({s['recipe_for_projection']}), from the memory plan\n",
        ]
        parts = ("weights_bytes", "activations_bytes", "dequant_bytes", "total_bytes")
        lines += harness.md_table(
            ["mode", "weights GiB", "activations GiB", "dequantization buffer GiB", "peak GiB", "fits 24 GB GPU"],
            (
                [mode, *(gib(p[k]) for k in parts), "yes" if p["total_bytes"] <= 24e9 * 0.95 else "no"]
                for mode, p in s["projection_26_layers"].items()
            ),
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def add_args(parser) -> None:
    parser.add_argument("--part", choices=("demo", "scale", "all"), default="all")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-quant")
    parser.add_argument("--demo-steps", type=int, help="override the demo recipe's max_steps")
    parser.add_argument("--scale-modes", nargs="+", choices=MODES, default=list(MODES), help="none is required")
    parser.add_argument("--demo-modes", nargs="+", choices=MODES, default=list(MODES), help="none is required")
    parser.add_argument(
        "--reuse", action="store_true", help="keep modes already measured in --work (each records its commit)"
    )
    parser.add_argument("--model", type=Path, default=ROOT / "build" / "scale-model")
    parser.add_argument("--seq", type=int, default=256, help="tokens per step on the scale model")
    parser.add_argument("--steps", type=int, default=4, help="training steps per mode on the scale model")


def run(args) -> dict:
    if args.smoke:  # the demo for one step, a tiny bf16 Mixtral for the scale part; unquantized and nf4
        args.demo_steps, args.seq, args.steps = 1, 16, 3
        args.demo_modes = args.scale_modes = ["none", "nf4"]
        tiny = dict(hidden=64, intermediate=128, layers=2, vocab=1000, dtype="bfloat16")
        args.model = harness.make_random_mixtral(args.work / "tiny-bf16", **tiny)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.out / "quant.json"
    data = json.loads(path.read_text()) if path.exists() and not args.smoke else {}
    if args.part in ("demo", "all"):
        data["demo"] = demo(args.work, args.demo_steps, args.reuse, args.demo_modes)
    if args.part in ("scale", "all"):
        data["scale"] = scale(args.work, args.model, args.seq, args.steps, args.reuse, args.scale_modes)
    import torch

    data["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    return data


if __name__ == "__main__":  # --child MODE: measure_scale in a fresh process, in the --work that `scale` made
    child = lambda a: measure_scale(a.child, a.model, a.seq, a.steps, a.work / "scale-run")
    harness.main("quant", __doc__, run, render, add_args, child=child)
