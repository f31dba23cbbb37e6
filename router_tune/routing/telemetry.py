"""Routing telemetry: scalars for `Trainer.log`, media for wandb and tensorboard, plots, console table.

How `RouterTrainer` uses it (main process only, every `routing_log_every` steps):

    telemetry = RoutingTelemetry(args.output_dir, report_to=args.report_to)
    ...
    logs.update(telemetry.record(summary, self.state.global_step,
                                 tb_writer=tensorboard_writer(self.callback_handler.callbacks)))
    super().log(logs, start_time)
    ...
    telemetry.save_plots(self.state.log_history)          # at the end of training
    print(format_routing_table(telemetry.last_summary))

The scalars go through `Trainer.log` because that is the one path that reaches every `report_to`
integration (callbacks run after WandbCallback, so keys added in `on_log` never reach wandb);
there they appear as `train/routing/...` (transformers' `rewrite_logs` adds `train/`). Media
cannot travel that way (TensorBoardCallback and MLflowCallback drop non-numbers), so they
are written to the wandb run and the tensorboard writer directly.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from router_tune.routing.plots import render_source_expert, render_usage_heatmap, save_run_plots
from router_tune.routing.stats import RoutingSummary

# The x axis WandbCallback declares (`define_metric("*", step_metric="train/global_step")`): it
# logs without `step=`, so wandb's own `_step` counts calls, not optimizer steps. Media carry
# this key instead of `step=` to land on the same x as the Trainer's scalars; passing
# `step=global_step` would fight wandb's counter and be dropped as non-monotonic.
WANDB_STEP_KEY = "train/global_step"


def expert_counts(summary: RoutingSummary) -> np.ndarray:
    """[L, E] top-k selections per expert in the window (exact integers: share x tokens x top_k)."""
    return np.rint(np.asarray(summary.load) * summary.tokens * summary.top_k).astype(np.int64)


def _active_wandb_run():
    # Never import wandb here: if nothing imported it (WandbCallback or the user), no run can be
    # active, and importing it costs a second and may print. `wandb.run` is None when not initialised.
    wandb = sys.modules.get("wandb")
    return (wandb, wandb.run) if wandb is not None and getattr(wandb, "run", None) is not None else (None, None)


def log_wandb(summary: RoutingSummary, step: int, *, prefix: str = "routing") -> bool:
    """Log per-layer usage histograms and the heatmap images to the active wandb run.

    Keys: `{prefix}/L{l}/usage` (one bar per expert: bins are the expert indices 0..E),
    `{prefix}/heatmap` (layers x experts) and, when the summary has sources,
    `{prefix}/source_expert`. Returns False (and logs nothing) when no wandb run is active.
    """
    wandb, run = _active_wandb_run()
    if run is None:
        return False
    bins = np.arange(summary.num_experts + 1)
    media = {
        f"{prefix}/L{layer}/usage": wandb.Histogram(np_histogram=(counts, bins))
        for layer, counts in zip(summary.layers, expert_counts(summary))
    }
    media[f"{prefix}/heatmap"] = wandb.Image(render_usage_heatmap(summary), caption=f"step {step}")
    if len(summary.sources):
        media[f"{prefix}/source_expert"] = wandb.Image(render_source_expert(summary), caption=f"step {step}")
    run.log({**media, WANDB_STEP_KEY: step})
    return True


def log_tensorboard(
    writer, summary: RoutingSummary, step: int, *, prefix: str = "routing", scalars: bool = False
) -> None:
    """Write usage histograms and heatmap images (and the scalars if `scalars`) to a SummaryWriter.

    In the trainer leave `scalars=False`: they already reach tensorboard through `Trainer.log`
    (as `train/{prefix}/...`); pass True when logging outside a Trainer.
    """
    if scalars:
        for key, value in summary.scalars(prefix).items():
            writer.add_scalar(key, value, step)
    centres = np.arange(summary.num_experts) + 0.5
    for layer, counts in zip(summary.layers, expert_counts(summary)):
        used = np.flatnonzero(counts)
        # Bucket e spans (e, e + 1]: the same per-expert bars as the wandb histogram.
        writer.add_histogram_raw(
            f"{prefix}/L{layer}/usage",
            min=float(used.min()) if used.size else 0.0,
            max=float(used.max() + 1) if used.size else 0.0,
            num=int(counts.sum()),
            sum=float(counts @ centres),
            sum_squares=float(counts @ centres**2),
            bucket_limits=(np.arange(summary.num_experts) + 1.0).tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )
    writer.add_image(f"{prefix}/heatmap", render_usage_heatmap(summary), step, dataformats="HWC")
    if len(summary.sources):
        writer.add_image(f"{prefix}/source_expert", render_source_expert(summary), step, dataformats="HWC")
    writer.flush()


def tensorboard_writer(callbacks: Iterable[object]):
    """The SummaryWriter of transformers' TensorBoardCallback among `callbacks`, or None.

    Found by its `tb_writer` attribute, so transformers need not be imported here; the writer
    exists from `on_train_begin` until `on_train_end` closes it.
    """
    for callback in callbacks:
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            return writer
    return None


def _report_targets(report_to: str | Sequence[str] | None) -> set[str]:
    if report_to is None or report_to == "none":
        return set()
    return {report_to} if isinstance(report_to, str) else set(report_to)


class RoutingTelemetry:
    """Sends each routing window to the loggers and keeps the first and last for the run plots.

    Args:
        output_dir: the run directory; plots go to `output_dir/plots/`.
        report_to: `TrainingArguments.report_to` ("wandb", "tensorboard", "all", a list, "none").
            wandb media are logged only when it names wandb (or "all") and a run is active, so a
            notebook's unrelated wandb run never receives them.
        prefix: first component of every key.
    """

    def __init__(self, output_dir: str | Path, report_to: str | Sequence[str] | None = None, prefix: str = "routing"):
        self.output_dir = Path(output_dir)
        targets = _report_targets(report_to)
        self.to_wandb = bool(targets & {"wandb", "all"})
        self.prefix = prefix
        self.first_step: int | None = None
        self.first_summary: RoutingSummary | None = None
        self.last_step: int | None = None
        self.last_summary: RoutingSummary | None = None

    def record(self, summary: RoutingSummary, step: int, *, tb_writer=None) -> dict[str, float]:
        """Log one window's media (wandb, tensorboard) at `step` and return its scalars.

        Merge the returned dict into the logs passed to `Trainer.log` for the same step.
        Skips wandb when no run is active and tensorboard when `tb_writer` is None.
        """
        if self.first_summary is None:
            self.first_step, self.first_summary = step, summary
        self.last_step, self.last_summary = step, summary
        if self.to_wandb:
            log_wandb(summary, step, prefix=self.prefix)
        if tb_writer is not None:
            log_tensorboard(tb_writer, summary, step, prefix=self.prefix)
        return summary.scalars(self.prefix)

    def save_plots(self, log_history: Sequence[Mapping]) -> list[Path]:
        """Write the run plots (see `plots.save_run_plots`) from the recorded windows and the
        Trainer's `state.log_history`; without a recorded window only the curves are drawn. A first
        summary at step 0 (the trainer's evaluation of the untrained routers) starts balance.png."""
        before = self.first_summary.scalars(self.prefix) if self.first_step == 0 else None
        if self.last_summary is None:
            return save_run_plots(self.output_dir, None, None, log_history, before=before)
        return save_run_plots(
            self.output_dir,
            self.first_summary,
            self.last_summary,
            log_history,
            start_label=f"step {self.first_step}",
            end_label=f"step {self.last_step}",
            before=before,
        )


def format_routing_table(summary: RoutingSummary, top: int = 3) -> str:
    """A compact per-layer table for the console: max/mean load (and, with twin groups, within and across
    them), entropies, cv, dead, top experts."""
    num_experts = summary.num_experts
    grouped = summary.group_balance()
    twin_head = f" {'within':>6} {'across':>6}" if grouped else ""
    lines = [
        f"routing over {summary.tokens:,} tokens: {num_experts} experts, top-{summary.top_k}",
        f"{'layer':>6} {'max/mean':>8}{twin_head} {'H(tok)':>7} {'H(mean)':>7} {'cv':>6} {'dead':>5}  "
        "top experts (share)",
    ]

    def twin_cells(index=None) -> str:
        if not grouped:
            return ""
        within, across = grouped["within_max_load"], grouped["across_max_load"]
        pick = (lambda v: v[index]) if index is not None else np.mean
        return f" {pick(within):6.2f} {pick(across):6.2f}"

    for i, layer in enumerate(summary.layers):
        order = np.argsort(-np.asarray(summary.load[i]), kind="stable")[:top]
        tops = "  ".join(f"e{e} {100 * summary.load[i][e]:.0f}%" for e in order)
        lines.append(
            f"{'L' + str(layer):>6} {summary.max_load[i]:8.2f}{twin_cells(i)} {summary.token_entropy[i]:7.3f} "
            f"{summary.mean_entropy[i]:7.3f} {summary.cv[i]:6.2f} {int(summary.dead[i]):5d}  {tops}"
        )
    lines.append(
        f"{'mean':>6} {np.mean(summary.max_load):8.2f}{twin_cells()} {np.mean(summary.token_entropy):7.3f} "
        f"{np.mean(summary.mean_entropy):7.3f} {np.mean(summary.cv):6.2f} {int(np.sum(summary.dead)):5d}"
    )
    if grouped:
        twins = [
            f"L{layer} " + " ".join("{" + ",".join(map(str, g)) + "}" for g in groups if len(g) > 1)
            for layer, groups in zip(summary.layers, summary.expert_groups)
            if any(len(g) > 1 for g in groups)
        ]
        lines.append(
            f"twin experts: {'; '.join(twins) or 'none'}; within: worst twin group's max/mean, across: max/mean "
            "with each group's tokens split evenly; MaxVio = max/mean - 1"
        )
    lines.append(
        f"balanced: max/mean 1.00, cv 0, H(mean) = ln {num_experts} = {np.log(num_experts):.3f} nats; "
        f"H(tok) near 0 = saturated router"
    )
    return "\n".join(lines)


__all__ = [
    "RoutingTelemetry",
    "expert_counts",
    "format_routing_table",
    "log_tensorboard",
    "log_wandb",
    "tensorboard_writer",
]
