"""python -m scripts.bench_real --out bench  [--steps 60 240] [--stages evals train sharpen calibrate speed] [--render]

The real frankenMoE of scripts/make_real_moe.py (`hidden` and `random` merges) on the same held-out blocks of
recipes/demo-real.yaml: base, each expert alone, each merge, oracle routing and the routers trained with the
shipped defaults at each budget of --steps (the largest budget's also with their logits sharpened at eval; each
budget's also calibrated as `router_calibration: true` does), and
router_tune against the plain transformers Trainer (what each figure is: the markdown this writes;
docs/real-weights.md). Each finished stage is kept in WORK/state.json, so an
interrupted run continues where it stopped. No --smoke run: every part needs the real build (~30 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from scripts import harness
from scripts.bench import make_text_blocks
from scripts.harness import ROOT, describe, gap_closed, provenance

REAL = ROOT / "build" / "real"
RECIPE = ROOT / "recipes" / "demo-real.yaml"
DOMAINS = ("code", "python_docs", "book", "chat")
MERGES = ("hidden", "random")
EVAL_BLOCKS = 16  # per domain, as `make demo-real` evaluates (EVAL_BLOCKS there)
SHARPEN = (1.5, 2.5)  # router logits scaled by these at eval, the trained routers of the largest budget


def log(msg: str) -> None:
    harness.log(f"[{time.strftime('%H:%M:%S')}] {msg}")


class State:
    """Finished stages, kept on disk after each one, each with the commit and tree state it was measured at
    (`measured_at`): a resumed benchmark may finish on a later commit than it began. That is the state when
    this invocation began, whose code this process imported: a stage takes up to an hour, and a commit made
    meanwhile is not the code it ran."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.started = provenance(ignore=("bench",))

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str):
        return self.data[key]

    def put(self, key: str, value) -> None:
        self.data[key] = {**value, "measured_at": self.started}
        self.path.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")


def eval_blocks(tokenizer) -> dict:
    from router_tune.data import build_eval_blocks, parse_sources

    recipe = yaml.safe_load(RECIPE.read_text())
    for entry in recipe["datasets"]:
        entry["path"] = str(ROOT / entry["path"])
    return build_eval_blocks(
        parse_sources(recipe["datasets"]), tokenizer, recipe["block_size"], eval_fraction=0.05, max_blocks=EVAL_BLOCKS
    )


def summary(result) -> dict:
    return {
        "perplexity": {k: round(v, 3) for k, v in result.perplexity.items()},
        "blocks": result.blocks,
        "worst_layer_max_over_mean": round(float(result.routing.max_load.max()), 3),
        "dead_experts": int(sum(len(d) if hasattr(d, "__len__") else int(d) for d in result.routing.dead)),
    }


def base_perplexity(blocks: dict) -> dict:
    """The dense base on the same blocks: the held-out loss that `evaluate_model` computes, without routers."""
    from transformers import AutoModelForCausalLM

    from router_tune.evaluation.evaluate import held_out_loss

    model = AutoModelForCausalLM.from_pretrained(REAL / "base", dtype=torch.float32).eval()
    batches = [(s, blocks[s][i : i + 8]) for s in blocks for i in range(0, len(blocks[s]), 8)]
    loss, _ = held_out_loss(model, batches, list(blocks), torch.device("cpu"))
    return {k: round(math.exp(v), 3) for k, v in loss.items()}


def merge_evals(state: State, merge: str) -> None:
    """The merge as written, oracle routing, and (once) each expert alone."""
    from router_tune.evaluation.evaluate import evaluate_model, evaluate_oracle, load_for_eval

    todo = [key for key in (f"merge-{merge}", f"oracle-{merge}") if key not in state]
    if merge == "hidden":
        todo += [key for key in ("experts_alone", "base") if key not in state]
    if not todo:
        return
    model, tokenizer, info, _ = load_for_eval(str(REAL / f"moe-{merge}"))
    blocks = eval_blocks(tokenizer)
    log(f"merge {merge}: {sum(map(len, blocks.values()))} held-out blocks")
    if f"merge-{merge}" in todo:
        stored = info.stored_dtype if info.dtype_note else None  # routers rounded as stored (bf16)
        state.put(f"merge-{merge}", summary(evaluate_model(model, blocks, label=merge, stored_dtype=stored)))
    if f"oracle-{merge}" in todo:
        oracle = evaluate_oracle(model, blocks, {d: i for i, d in enumerate(DOMAINS)})
        state.put(f"oracle-{merge}", {k: round(v, 3) for k, v in oracle["perplexity"].items()})
    if "experts_alone" in todo:  # the experts are the same in both merges
        alone = {}
        for i, d in enumerate(DOMAINS):
            result = evaluate_oracle(model, blocks, dict.fromkeys(DOMAINS, i))
            alone[d] = {k: round(v, 3) for k, v in result["perplexity"].items()}
            log(f"expert {d} alone: {alone[d]}")
        state.put("experts_alone", alone)
    del model
    if "base" in todo:
        state.put("base", base_perplexity(blocks))


def train_and_eval(state: State, merge: str, steps: int, work: Path, reuse: Path | None = None) -> None:
    """`router-tune train` with the recipe's defaults at `steps`, then its routers evaluated; `reuse`: a
    finished run of exactly this command (e.g. `make demo-real`'s runs/demo-real) evaluated instead."""
    from router_tune.evaluation.evaluate import evaluate_model, load_for_eval

    key = f"trained-{merge}-{steps}"
    if key in state:
        return
    run = work / f"{merge}-{steps}"
    cmd = [sys.executable, "-m", "router_tune", "train", str(RECIPE)]
    cmd += ["--model_name_or_path", str(REAL / f"moe-{merge}")]
    cmd += ["--max_steps", str(steps), "--output_dir", str(run), "--eval_before_after", "false", "--overwrite"]
    if reuse is not None:
        info = json.loads((reuse / "router_tune.json").read_text())
        recipe = info["recipe"]
        same = info["global_step"] == steps and Path(recipe["model_name_or_path"]).resolve() == REAL / f"moe-{merge}"
        if not same or recipe.get("max_steps") != steps:
            sys.exit(f"{reuse} is not a finished {steps}-step run of the {merge} merge")
        run, seconds = reuse, info.get("train_seconds")
        log(f"reusing {reuse} for {key}")
    else:
        log("$ " + " ".join(cmd))
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, env=harness.child_env(), check=True)
        seconds = time.time() - start
    model, tokenizer, info, _ = load_for_eval(str(run))
    stored = info.stored_dtype if info.dtype_note else None
    result = summary(evaluate_model(model, eval_blocks(tokenizer), label=key, stored_dtype=stored))
    run_name = str(run.resolve().relative_to(ROOT))
    state.put(key, {**result, "train_seconds": round(seconds) if seconds else None, "run": run_name})


def sharpened_evals(state: State, merge: str, steps: int) -> None:
    """The routers trained `steps` steps with their logits scaled by t at eval: the same ranking of experts (the
    same top-k), sharper mixing weights. Tells whether the gap left is the routers' confidence, not their choice."""
    from router_tune.evaluation.evaluate import evaluate_model, load_for_eval
    from router_tune.model.routers import find_routers

    keys = {t: f"sharpened-{merge}-{steps}-x{t}" for t in SHARPEN}
    if all(k in state for k in keys.values()) or f"trained-{merge}-{steps}" not in state:
        return
    model, tokenizer, info, _ = load_for_eval(str(ROOT / state[f"trained-{merge}-{steps}"]["run"]))
    stored = info.stored_dtype if info.dtype_note else None
    routers = [r.module for r in find_routers(model)]
    trained = [r.weight.detach().clone() for r in routers]
    blocks = eval_blocks(tokenizer)
    for t, key in keys.items():
        if key not in state:
            with torch.no_grad():
                for router, weight in zip(routers, trained):
                    router.weight.copy_(weight * t)
            state.put(key, summary(evaluate_model(model, blocks, label=key, stored_dtype=stored)))


def calibrated_evals(state: State, merge: str, steps: int) -> None:
    """The routers trained `steps` steps, calibrated as `router_calibration: true` does after the last step
    (training/calibration.py: one factor for every router, on the run's first training blocks), evaluated."""
    from router_tune import data
    from router_tune.evaluation.evaluate import evaluate_model, load_for_eval
    from router_tune.training.calibration import calibrate_router_temperature
    from router_tune.training.config import load_recipe
    from router_tune.training.preparation import model_source, training_data

    key, trained = f"calibrated-{merge}-{steps}", f"trained-{merge}-{steps}"
    if key in state or trained not in state:
        return
    model, tokenizer, info, _ = load_for_eval(str(ROOT / state[trained]["run"]))
    args = load_recipe(RECIPE, model_name_or_path=str(REAL / f"moe-{merge}"))
    dataset = training_data(args, model_source(args, model), tokenizer).dataset
    blocks = data.first_blocks(dataset, args.router_calibration_blocks)
    batches = data.collate_in_batches(blocks, args.per_device_eval_batch_size)
    model.requires_grad_(False)
    calibration = calibrate_router_temperature(model, batches, chunk_tokens=args.ce_chunk_tokens)
    stored = info.stored_dtype if info.dtype_note else None
    result = summary(evaluate_model(model, eval_blocks(tokenizer), label=key, stored_dtype=stored))
    state.put(key, {**result, "calibration": calibration})


def speed(state: State, work: Path, steps: int = 6) -> None:
    """router_tune vs the plain transformers Trainer, fresh processes, same blocks, fp32."""
    if "speed" in state:
        return
    data = make_text_blocks(work / "speed-blocks", REAL / "moe-hidden", seq=256, n_blocks=4 * (steps + 2))
    runs = {}
    for impl in ("baseline", "router_tune"):
        cmd = harness.module_cmd("bench_train", "--impl", impl, "--model-dir", REAL / "moe-hidden", "--data", data)
        cmd += harness.flags(out_dir=work / f"speed-{impl}", batch=4, steps=steps, warmup=2, dtype="float32")
        log("$ " + " ".join(cmd[1:]))
        runs[impl] = harness.run_json(cmd, threads=2)
    state.put("speed", runs)


def added(run: dict) -> float:
    """Memory training adds: peak RSS during the measured steps over the RSS when training began."""
    return run["peak_rss_train_mb"] - run["rss_before_train_mb"]


def render(data: dict) -> str:
    """bench/real.md from bench/real.json alone."""
    state, prov = data["stages"], data["provenance"]
    steps = data["steps"]
    rows = [("base (dense, not a MoE)", state["base"])] if "base" in state else []
    for i, d in enumerate(DOMAINS):
        if "experts_alone" in state:
            rows.append((f"expert {i} ({d}) alone", state["experts_alone"][d]))
    gaps = {}
    for merge in MERGES:
        if f"merge-{merge}" not in state:
            continue
        rows.append((f"merge, `{merge}` gates (mergekit)", state[f"merge-{merge}"]["perplexity"]))
        for n in steps:
            key = f"trained-{merge}-{n}"
            if key in state:
                rows.append((f"`{merge}` merge, routers trained {n} steps", state[key]["perplexity"]))
                gaps[(merge, n)] = data["gap_closed"][f"{merge}-{n}"]
        rows.append((f"oracle routing (`{merge}` merge)", state[f"oracle-{merge}"]))
    measured = sorted({describe(v["measured_at"]) for v in state.values() if "measured_at" in v})
    lines = [
        "# The real frankenMoE: SmolLM2-135M-Instruct x 4 experts",
        "",
        f"`make bench-real` (rendered at {describe(prov)}; stages measured at {'; '.join(measured) or 'unrecorded'}). "
        "Held-out perplexity on the same blocks of recipes/demo-real.yaml "
        f"(at most {EVAL_BLOCKS} blocks of 256 tokens per domain; `overall` pools every domain's tokens). Routers "
        "trained with the shipped defaults (the recipe sets model, data, batch 4 x 256 tokens, steps).",
        "",
        "| model | " + " | ".join(DOMAINS) + " | overall |",
        "|---|" + "---:|" * (len(DOMAINS) + 1),
    ]
    for name, ppl in rows:
        lines.append(f"| {name} | " + " | ".join(f"{ppl[k]:.2f}" for k in (*DOMAINS, "overall")) + " |")
    if gaps:
        lines += [
            "",
            "| merge | steps | gap to oracle closed | worst layer max/mean load | train time |",
            "|---|---:|---:|---:|---:|",
        ]
        for (merge, n), g in gaps.items():
            t = state[f"trained-{merge}-{n}"]
            lines.append(
                f"| `{merge}` | {n} | {100 * g:.0f}% | {t['worst_layer_max_over_mean']:.2f} | "
                + (f"{t['train_seconds'] / 60:.1f} min |" if t["train_seconds"] else "(reused run) |")
            )
    sharpened = [(m, t, state[f"sharpened-{m}-{steps[-1]}-x{t}"]) for m in MERGES for t in SHARPEN
                 if f"sharpened-{m}-{steps[-1]}-x{t}" in state]  # fmt: skip
    if sharpened:
        lines += [
            "",
            f"What the {steps[-1]}-step routers leave: their logits scaled by t at eval (the same top-2 experts, "
            "sharper weights between them):",
            "",
            "| merge | logits x t | overall | gap to oracle closed | worst layer max/mean load |",
            "|---|---:|---:|---:|---:|",
        ]
        for m, t, v in sharpened:
            ppl, key = v["perplexity"]["overall"], f"{m}-{steps[-1]}-x{t}"
            lines.append(f"| `{m}` | {t} | {ppl:.3f} | {100 * data['gap_closed'][key]:.0f}% | "
                         f"{v['worst_layer_max_over_mean']:.2f} |")  # fmt: skip
    calibrated = [(m, n, state[f"calibrated-{m}-{n}"]) for m in MERGES for n in steps if f"calibrated-{m}-{n}" in state]
    if calibrated:
        lines += [
            "",
            "The same routers calibrated as `router_calibration: true` does after the last step (one factor t for "
            "every router, the grid's best LM loss on the run's first 16 training blocks; the same top-2 experts):",
            "",
            "| merge | steps | t chosen | overall | gap to oracle closed | worst layer max/mean load |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m, n, v in calibrated:
            lines.append(
                f"| `{m}` | {n} | {v['calibration']['factor']:g} | {v['perplexity']['overall']:.3f} | "
                f"{100 * data['gap_closed'][f'{m}-{n}-calibrated']:.0f}% | {v['worst_layer_max_over_mean']:.2f} |"
            )
    if "speed" in state:
        b, r = state["speed"]["baseline"], state["speed"]["router_tune"]
        lines += [
            "",
            "router_tune vs the plain transformers Trainer on the `hidden` merge (fp32, CPU, 4 x 256 tokens a step, "
            "fresh process each, measured one after the other in one invocation):",
            "",
            "| trainer | tokens/s | memory added by training (MB) | peak RSS in training (MB) |",
            "|---|---:|---:|---:|",
            f"| transformers.Trainer | {b['tokens_per_s']:.1f} | {added(b):.0f} | {b['peak_rss_train_mb']:.0f} |",
            f"| router_tune | {r['tokens_per_s']:.1f} | {added(r):.0f} | {r['peak_rss_train_mb']:.0f} |",
            f"| ratio | {r['tokens_per_s'] / b['tokens_per_s']:.2f}x | {added(r) / added(b):.2f}x "
            f"| {r['peak_rss_train_mb'] / b['peak_rss_train_mb']:.2f}x |",
        ]
    return "\n".join(lines) + "\n"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-real", help="runs and state.json")
    parser.add_argument("--steps", type=int, nargs="+", default=[60, 240], help="router-training budgets")
    parser.add_argument("--merges", nargs="+", default=list(MERGES), choices=MERGES)
    parser.add_argument(
        "--reuse", nargs="*", default=[], metavar="MERGE-STEPS=RUN", help="e.g. hidden-60=runs/demo-real"
    )
    stages = ["evals", "train", "sharpen", "calibrate", "speed"]
    parser.add_argument("--stages", nargs="+", default=stages, choices=stages)


def data_of(state: State, steps: list[int]) -> dict:
    stages = dict(state.data)
    # each gap figure and the stage whose overall perplexity it is
    measured = {f"{m}-{n}": f"trained-{m}-{n}" for m in MERGES for n in steps}
    measured |= {f"{m}-{steps[-1]}-x{t}": f"sharpened-{m}-{steps[-1]}-x{t}" for m in MERGES for t in SHARPEN}
    measured |= {f"{m}-{n}-calibrated": f"calibrated-{m}-{n}" for m in MERGES for n in steps}
    gaps = {}
    for key, stage in measured.items():
        merge = key.split("-", 1)[0]
        if stage in stages and f"oracle-{merge}" in stages:
            untrained = stages[f"merge-{merge}"]["perplexity"]["overall"]
            ppl, oracle = stages[stage]["perplexity"]["overall"], stages[f"oracle-{merge}"]["overall"]
            gaps[key] = round(gap_closed(untrained, ppl, oracle), 4)
    return {"provenance": provenance(), "eval_blocks_per_domain": EVAL_BLOCKS, "steps": steps, "gap_closed": gaps,
            "stages": stages}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    if args.smoke:
        sys.exit("bench_real has no --smoke run: every part needs the real build (python -m scripts.make_real_moe)")
    torch.set_num_threads(2)
    if not (REAL / "moe-random" / "config.json").is_file():
        sys.exit("build/real is not built: python -m scripts.make_real_moe (or make demo-real)")
    args.work.mkdir(parents=True, exist_ok=True)
    state = State(args.work / "state.json")
    reuse = {key: ROOT / path for key, path in (item.split("=", 1) for item in args.reuse)}
    if "evals" in args.stages:
        for merge in args.merges:
            merge_evals(state, merge)
    if "train" in args.stages:
        for n in args.steps:
            for merge in args.merges:
                train_and_eval(state, merge, n, args.work, reuse.get(f"{merge}-{n}"))
    if "sharpen" in args.stages:
        for merge in args.merges:
            sharpened_evals(state, merge, args.steps[-1])
    if "calibrate" in args.stages:
        for n in reversed(args.steps):
            for merge in args.merges:
                calibrated_evals(state, merge, n)
    if "speed" in args.stages:
        speed(state, args.work)
    return data_of(state, args.steps)


if __name__ == "__main__":
    harness.main("real", __doc__, run, render, add_args)
