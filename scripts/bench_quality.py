"""make bench-quality   (python -m scripts.bench_quality [--steps 150] [--models ...] [--modes ...])

How fast router training closes the gap to oracle routing, per model x gate kind x router gradient
mode, with the shipped defaults (the recipe gives only the model and the data): the embedded demo with
its `hidden` gates and with mergekit `random` gates, and scripts.make_second_moe's merge (built on
demand). Every --eval-every steps: held-out perplexity, the share of the gap closed, max-load / mean and
dead experts; then each mode's forward and backward seconds per step. Writes OUT/quality.json, .md, .png.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from router_tune import data
from router_tune.evaluation.evaluate import evaluate_model, evaluate_oracle
from router_tune.training.config import load_recipe
from router_tune.training.trainer import RouterTrainer
from scripts import harness, make_second_moe, saturated_demo
from scripts.harness import DEMO_ORACLE, DEMO_RECIPE, ROOT, describe

SECOND = ROOT / "build" / "second-moe"
EVAL_BLOCKS = 16  # per source: 4 x 16 x 256 tokens, a few seconds per evaluation on 2 cores
MARKS = (0.75, 0.90)


def models(names: list[str], work: Path = ROOT / "build" / "quality") -> dict[str, tuple[Path, dict, dict | None]]:
    """{name: (model dir, oracle expert per source, each expert's near-twin or None)}, building what is missing."""
    out = {}
    for name in names:
        if name == "demo-hidden":
            out[name] = (harness.DEMO, DEMO_ORACLE, None)
        elif name == "demo-random":
            path = work / "demo-random"
            if not path.exists():
                saturated_demo.random_gate_variant(path)
            out[name] = (path, DEMO_ORACLE, None)
        else:  # second-hidden / second-random
            if not (SECOND / "figures.json").exists():
                subprocess.run(harness.module_cmd("make_second_moe"), check=True, cwd=ROOT)
            figures = json.loads((SECOND / "figures.json").read_text())
            out[name] = (SECOND / name.split("-")[1], figures["oracle_experts"], make_second_moe.twins())
    return out


class Probe(TrainerCallback):
    """Evaluates every `every` steps and keeps the training clock without the evaluation time."""

    def __init__(self, trainer: RouterTrainer, blocks, every: int):
        self.trainer, self.blocks, self.every = trainer, blocks, every
        self.points, self.eval_seconds, self.start = [], 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.points.append(self.measure(state.global_step))

    def measure(self, step: int) -> dict:
        begin = time.perf_counter()
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        result = evaluate_model(model, self.blocks, top_k=self.trainer.moe.top_k, batch_size=8, progress=False)
        self.eval_seconds += time.perf_counter() - begin
        args = self.trainer.args
        return {
            "step": step,
            "tokens": step * args.per_device_train_batch_size * args.block_size,
            "seconds": round(time.perf_counter() - self.start - self.eval_seconds, 1) if step else 0.0,
            "perplexity": round(result.perplexity["overall"], 3),
            "max_load_per_layer": [round(float(x), 3) for x in result.routing.max_load],
            "dead_experts": int(result.routing.dead.sum()),
        }


def run_one(model_dir: Path, oracle_map: dict, twins: dict | None, mode: str, cli, **overrides) -> dict:
    """One training run of --steps, evaluated every --eval-every steps; `twins` ({expert: its near-twin}) adds
    the balanced oracle (each domain shared evenly by its expert and that expert's twin)."""
    recipe, steps = load_recipe(DEMO_RECIPE), cli.steps
    settings = dict(
        model_name_or_path=str(model_dir), datasets=recipe.datasets, block_size=recipe.block_size,
        per_device_train_batch_size=recipe.per_device_train_batch_size, max_steps=steps, router_gradient=mode,
        output_dir=str(cli.work_dir / "runs"), routing_log_every=0, logging_steps=max(steps // 10, 1), seed=42,
    )  # fmt: skip
    args = harness.recipe(None, **{**settings, **overrides})  # an override may replace any of these
    trainer = RouterTrainer(args=args)
    specs = data.parse_sources(args.datasets)
    blocks = data.build_eval_blocks(specs, trainer.processing_class, args.block_size, max_blocks=EVAL_BLOCKS)
    probe = Probe(trainer, blocks, cli.eval_every)
    trainer.add_callback(probe)
    model = trainer.accelerator.unwrap_model(trainer.model)
    top_k = trainer.moe.top_k
    oracle_ppl = lambda routing: evaluate_oracle(model, blocks, routing, top_k=top_k)["perplexity"]["overall"]
    oracle = oracle_ppl(oracle_map)
    # each domain shared evenly by its two experts: max-load / mean 1.0 by construction
    balanced = oracle_ppl({source: [e, twins[e]] for source, e in oracle_map.items()}) if twins else None
    probe.points.append(probe.measure(0))
    trainer.train()
    return {**summarise(probe.points, oracle, args), "balanced_oracle_perplexity": balanced}


def summarise(points: list[dict], oracle: float, args) -> dict:
    untrained = points[0]["perplexity"]
    for p in points:
        p["gap_closed"] = round(harness.gap_closed(untrained, p["perplexity"], oracle), 3)
    reach = {}
    for mark in MARKS:
        hit = next((p for p in points if p["gap_closed"] >= mark), None)
        reach[f"{int(mark * 100)}%"] = {"tokens": hit["tokens"], "seconds": hit["seconds"]} if hit else None
    best = min(points, key=lambda p: p["perplexity"])
    best = {"step": best["step"], "perplexity": best["perplexity"], "vs_oracle": round(best["perplexity"] - oracle, 3)}
    return {
        "learning_rate": args.learning_rate,
        "oracle_perplexity": round(oracle, 3),
        "untrained_perplexity": untrained,
        "best": best,
        "reach": reach,
        "points": points,
    }


def mode_cost(model_dir: Path, modes: list[str], micro_batches: int = 6) -> dict:
    """Seconds per forward and per backward of one training micro-batch, each mode on the same batches,
    the modes interleaved batch by batch so that a busy machine slows them alike."""
    trainers = {
        mode: RouterTrainer(
            args=load_recipe(DEMO_RECIPE, model_name_or_path=str(model_dir), router_gradient=mode, report_to="none")
        )
        for mode in modes
    }
    batches = list(zip(range(micro_batches + 1), trainers[modes[0]].get_train_dataloader()))
    totals = {mode: [0.0, 0.0] for mode in modes}
    for i, batch in batches:
        for mode, trainer in trainers.items():
            t0 = time.perf_counter()
            loss = trainer.compute_loss(trainer.model.train(), batch)
            t1 = time.perf_counter()
            loss.backward()
            if i:  # the first batch warms up
                totals[mode][0] += t1 - t0
                totals[mode][1] += time.perf_counter() - t1
    return {
        m: {"forward_s": round(f / micro_batches, 3), "backward_s": round(b / micro_batches, 3)}
        for m, (f, b) in totals.items()
    }


# The sparse path as issue 14 found it: the demo recipe's hand-picked raw Adam rate, streamed data in file
# order (no shuffle buffers); everything else is today's default.
FILED_PATH = {"router_lr_scale": "none", "learning_rate": 2e-2, "shuffle_buffer": 0, "document_shuffle_buffer": 0}
FILED_PATH_LABEL = "sparse-as-filed"


def render(result: dict) -> str:
    steps = result["report_steps"]
    head = [
        "model", "mode", "lr", "untrained", "oracle", *(f"ppl@{s}" for s in steps), *(f"gap@{s}" for s in steps),
        "75%: tokens / s", "90%: tokens / s", "best (step)", "max-load/mean per layer", "dead",
    ]  # fmt: skip
    lines = [
        "# Router training quality (`make bench-quality`)",
        "",
        f"{describe(result['git']).capitalize()},"
        f" {result['threads']} threads, {result['steps']} steps, evaluated every {result['eval_every']} steps on "
        f"{EVAL_BLOCKS} held-out blocks per source. Command: `{result['command']}`.",
        "",
        *harness.md_table(head, []),  # the rule row from the header's cells: a hand count once fell one short
    ]
    for name, run in result["runs"].items():
        model, mode = name.split("/")[:2]
        at = {p["step"]: p for p in run["points"]}
        ppl = [f"{at[s]['perplexity']:.2f}" if s in at else "-" for s in result["report_steps"]]
        gap = [f"{100 * at[s]['gap_closed']:.0f}%" if s in at else "-" for s in result["report_steps"]]
        reach = [f"{r['tokens']:,} / {r['seconds']:.0f}" if r else "not reached" for r in run["reach"].values()]
        last = run["points"][-1]
        lines.append(
            f"| {model} | {mode} | {run['learning_rate']:g} | {run['untrained_perplexity']:.2f} | "
            f"{run['oracle_perplexity']:.2f} | "
            + " | ".join(ppl + gap + reach)
            + f" | {run['best']['perplexity']:.2f} ({run['best']['step']}) | "
            f"{', '.join(f'{x:.2f}' for x in last['max_load_per_layer'])} | {last['dead_experts']} |"
        )
    balanced = {n.split("/")[0]: r for n, r in result["runs"].items() if r.get("balanced_oracle_perplexity")}
    for model, run in balanced.items():
        lines.append(
            f"\n{model}: oracle routing {run['oracle_perplexity']:.2f} sends each domain to its better expert alone "
            f"(max-load / mean 2.0: 4 of 8 experts idle); the balanced oracle, each domain shared evenly by its "
            f"two near-twin experts (max-load / mean 1.0), {run['balanced_oracle_perplexity']:.2f}."
        )
    for name, run in result["runs"].items():  # the wall-clock target: each run against the filed path
        model = name.split("/")[0]
        filed = result["runs"].get(f"{model}/{FILED_PATH_LABEL}")
        if filed is None or run is filed:
            continue
        for mark in ("75%", "90%"):
            ours, ref = run["reach"].get(mark), filed["reach"].get(mark)
            if ours and ref:
                lines.append(
                    f"\n{name}: {mark} of the gap in {ours['seconds']:.0f} s of training against "
                    f"{ref['seconds']:.0f} s for the filed path: {ours['seconds'] / ref['seconds']:.2f}x."
                )
    if cost := result.get("cost"):
        lines += ["", "Seconds per micro-batch on the demo (8 x 256 tokens), forward and backward measured apart:", ""]
        rows = ([m, c["forward_s"], c["backward_s"]] for m, c in cost.items())
        lines += harness.md_table(["mode", "forward", "backward"], rows)
    return "\n".join(lines) + "\n"


def write_plot(result: dict, path: Path) -> None:
    """Gap to oracle routing closed against training tokens, one panel per model, a line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_model: dict[str, list[tuple[str, dict]]] = {}
    for name, run in result["runs"].items():
        model, label = name.split("/", 1)
        by_model.setdefault(model, []).append((label, run))
    fig = Figure(figsize=(4.2 * len(by_model), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (model, runs) in enumerate(by_model.items()):
        ax = fig.add_subplot(1, len(by_model), i + 1)
        for label, run in runs:
            points = run["points"]
            tokens, gaps = [p["tokens"] / 1e6 for p in points], [100 * p["gap_closed"] for p in points]
            ax.plot(tokens, gaps, marker="o", ms=3, label=label)
        for mark in MARKS:
            ax.axhline(100 * mark, color="grey", lw=0.6, ls=":")
        ax.set(title=model, xlabel="training tokens (M)", ylabel="gap to oracle closed (%)", ylim=(0, 105))
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def add_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--models", nargs="+", default=["demo-hidden", "demo-random", "second-hidden", "second-random"])
    parser.add_argument("--modes", nargs="+", default=["sparse", "dense", "default_moe"])
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[None])
    parser.add_argument(
        "--filed-path", action="store_true",
        help="also run, per model, the sparse path as issue 14 found it (raw Adam rate 2e-2, files read in order; "
        "today's other defaults), the reference of its wall-clock target",
    )  # fmt: skip
    parser.add_argument(
        "--overload", nargs="*", type=float, default=[], metavar="COEF",
        help="also run, per model, sparse mode with router_overload_loss_coef COEF (the balance / quality trade-off)",
    )  # fmt: skip
    parser.add_argument(
        "--switch", nargs="*", type=float, default=[], metavar="COEF",
        help="also run, per model, sparse mode with the Switch balancing loss at router_aux_loss_coef COEF",
    )  # fmt: skip
    parser.add_argument("--no-cost", dest="cost", action="store_false")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "quality", help="runs, random-gate demo")


def run(args) -> dict:
    if args.smoke:
        args.steps, args.eval_every, args.models, args.modes, args.cost = 2, 1, ["demo-hidden"], ["sparse"], False
    torch.set_num_threads(2)
    result = {
        "git": harness.provenance(),
        "command": "python -m scripts.bench_quality " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "eval_every": args.eval_every,
        "report_steps": [s for s in (50, 150, 500) if s <= args.steps],
        "runs": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    merges = models(args.models, args.work_dir)
    # (key, model, router gradient mode, settings replaced): every mode per model, then each variant
    # (sparse mode with some settings replaced) per model.
    plan = [
        (f"{name}/{mode}" + (f"/lr={lr:g}" if lr else ""), name, mode, {"learning_rate": lr} if lr else {})
        for name in merges
        for mode in args.modes
        for lr in args.learning_rates
    ]
    variants = [(FILED_PATH_LABEL, FILED_PATH)] if args.filed_path else []
    variants += [(f"sparse+overload={c:g}", {"router_overload_loss_coef": c}) for c in args.overload]
    variants += [(f"sparse+switch={c:g}", {"router_aux_loss_coef": c}) for c in args.switch]
    plan += [(f"{name}/{label}", name, "sparse", overrides) for label, overrides in variants for name in merges]
    for key, name, mode, overrides in plan:
        result["runs"][key] = run_one(*merges[name], mode, args, **overrides)
        print(key, json.dumps({k: v for k, v in result["runs"][key].items() if k != "points"}), flush=True)
        (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.cost:
        result["cost"] = mode_cost(harness.DEMO, args.modes)
    write_plot(result, args.out / "quality.png")
    return result


if __name__ == "__main__":
    harness.main("quality", __doc__, run, render, add_args)
