"""Matplotlib figures of router behaviour: PNGs in `OUTPUT_DIR/plots/` and images for wandb/tensorboard.

Every figure is built with `matplotlib.figure.Figure` and an Agg canvas, never through pyplot:
pyplot keeps a global registry of open figures (a leak in a long training run, and a GUI
backend on desktops), while a bare `Figure` is freed like any other object. Sizes are fixed
(inches x `DPI`, no `bbox_inches="tight"`) so a PNG always has the same pixel size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

DPI = 100
HEATMAP_SIZE = (8.0, 5.0)  # wandb / tensorboard images: 800 x 500 px
USAGE_START_END_SIZE = (14.0, 6.0)  # 1400 x 600 px
SOURCE_EXPERT_SIZE = (8.0, 4.0)  # 800 x 400 px
LOSS_CURVES_SIZE = (14.0, 4.0)  # 1400 x 400 px
BALANCE_SIZE = (10.0, 4.0)  # 1000 x 400 px
# Beyond these a number per cell is unreadable at the sizes above; colour alone remains.
MAX_ANNOTATED_EXPERTS = 16
MAX_ANNOTATED_ROWS = 32
LOSS_KEYS = ("lm_loss", "aux_loss", "z_loss")
BALANCE_KEYS = ("routing/mean/max_load", "routing/mean/entropy")
# Curves of fewer points get a round marker per point (a short run logs one or two), and up to
# ANNOTATED_POINTS of them their value: a lone point is a dot nobody reads.
MARKED_POINTS = 50
ANNOTATED_POINTS = 2


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _to_rgb(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _heatmap(ax, matrix: np.ndarray, rows: Sequence[str], vmax: float, title: str):
    """Share matrix as an image: experts on x, `rows` on y, percentages written in small maps."""
    matrix = np.asarray(matrix, dtype=float)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    n_rows, n_experts = matrix.shape
    ax.set_title(title)
    ax.set_xlabel("expert")
    if n_experts <= 32:
        ax.set_xticks(range(n_experts))
    # Row labels are layer ids (not always 0..L-1) or source names: thin them, never drop them.
    every = -(-n_rows // 48)
    ax.set_yticks(range(0, n_rows, every), labels=list(rows)[::every])
    if n_experts <= MAX_ANNOTATED_EXPERTS and n_rows <= MAX_ANNOTATED_ROWS:
        fontsize = 8 if matrix.size <= 128 else 6
        for (r, e), value in np.ndenumerate(matrix):
            # Dark text on the bright (yellow) end of viridis, light text elsewhere.
            colour = "black" if value > 0.6 * vmax else "white"
            ax.text(e, r, f"{100 * value:.0f}", ha="center", va="center", color=colour, fontsize=fontsize)
    return image


def _percent_colorbar(fig: Figure, image, ax, label: str):
    """A colour bar in percent (shares are fractions), like the percentages written in the cells."""
    return fig.colorbar(image, ax=ax, label=label, format=PercentFormatter(xmax=1.0, decimals=0))


def _layer_labels(summary) -> list[str]:
    return [f"L{layer}" for layer in summary.layers]


def _vmax(*matrices: np.ndarray) -> float:
    # A shared, non-degenerate upper bound so panels are comparable and an all-zero map still draws.
    return max(float(np.max(m)) if np.size(m) else 0.0 for m in matrices) or 1.0


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def usage_heatmap_figure(summary, title: str = "expert usage (% of top-k selections)") -> Figure:
    """Layers x experts share of selections (HEATMAP_SIZE at DPI)."""
    fig = _figure(HEATMAP_SIZE)
    ax = fig.add_subplot()
    image = _heatmap(ax, summary.load, _layer_labels(summary), _vmax(summary.load), title)
    _percent_colorbar(fig, image, ax, "% of top-k selections")
    return fig


def render_usage_heatmap(summary, title: str = "expert usage (% of top-k selections)") -> np.ndarray:
    """`usage_heatmap_figure` as an RGB array for wandb/tensorboard."""
    return _to_rgb(usage_heatmap_figure(summary, title))


def source_expert_figure(summary) -> Figure:
    """Sources x experts share matrix (SOURCE_EXPERT_SIZE at DPI)."""
    fig = _figure(SOURCE_EXPERT_SIZE)
    ax = fig.add_subplot()
    title = "source x expert (% of each source's selections, all layers)"
    if len(summary.sources) == 0:
        ax.set_title(title)
        _no_data(ax, "no per-source data")
        return fig
    tokens = np.asarray(summary.source_tokens)
    # Token counts in the labels tell a source with no tokens in the window (an all-zero row).
    rows = [f"{name} ({int(tokens[i]):,} tok)" if i < tokens.size else name for i, name in enumerate(summary.sources)]
    image = _heatmap(ax, summary.source_load, rows, _vmax(summary.source_load), title)
    _percent_colorbar(fig, image, ax, "% of the source's selections")
    return fig


def render_source_expert(summary) -> np.ndarray:
    """`source_expert_figure` as an RGB array for wandb/tensorboard."""
    return _to_rgb(source_expert_figure(summary))


def plot_source_expert(summary, path: str | Path) -> Path:
    """Write the sources x experts share heatmap (800 x 400 px) to `path`; returns the path."""
    return _save(source_expert_figure(summary), path)


def usage_start_end_figure(start, end, *, start_label: str = "start", end_label: str = "end") -> Figure:
    """Usage heatmaps of two summaries side by side on one colour scale (USAGE_START_END_SIZE at DPI)."""
    fig = _figure(USAGE_START_END_SIZE)
    left, right = fig.subplots(1, 2, sharey=True)
    vmax = _vmax(start.load, end.load)
    _heatmap(left, start.load, _layer_labels(start), vmax, f"{start_label}: max/mean {np.mean(start.max_load):.2f}")
    image = _heatmap(right, end.load, _layer_labels(end), vmax, f"{end_label}: max/mean {np.mean(end.max_load):.2f}")
    left.set_ylabel("MoE layer")
    balanced = 100 / start.num_experts
    _percent_colorbar(fig, image, [left, right], f"% of top-k selections (balanced = 100/E = {balanced:.0f})")
    fig.suptitle("expert usage per layer, % of top-k selections")
    return fig


def plot_usage_start_end(start, end, path: str | Path, *, start_label: str = "start", end_label: str = "end") -> Path:
    """Write `usage_start_end_figure` (1400 x 600 px) to `path`; returns the path."""
    return _save(usage_start_end_figure(start, end, start_label=start_label, end_label=end_label), path)


def _series(log_history: Iterable[Mapping], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry:
            steps.append(entry["step"])
            values.append(float(entry[key]))
    return steps, values


def _curves(
    log_history: Sequence[Mapping],
    keys: Sequence[str],
    size,
    title: str,
    reference: Mapping[str, float],
    before: Mapping[str, float] | None = None,
) -> Figure:
    fig = _figure(size)
    axes = fig.subplots(1, len(keys), sharex=True)
    for ax, key in zip(np.atleast_1d(axes), keys):
        steps, values = _series(log_history, key)
        ax.set_title(key)
        ax.set_xlabel("step")
        start = before.get(key) if before is not None and 0 not in steps else None
        if not steps and start is None:
            _no_data(ax, f"{key} not logged")
            continue
        if steps:
            few = len(steps) < MARKED_POINTS
            ax.plot(steps, values, marker="o" if few else None, markersize=5, label="training")
            if len(steps) <= ANNOTATED_POINTS:
                for step, value in zip(steps, values):
                    ax.annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(0, 7), ha="center")
        if start is not None:
            # the untrained routers (held-out blocks, before the first step): where training started from
            style = {"linestyle": "none", "marker": "s", "markersize": 6, "color": "tab:orange"}
            ax.plot([0], [start], label="step 0, untrained", **style)
            ax.annotate(f"{start:.4g}", (0, start), textcoords="offset points", xytext=(0, 7), ha="center")
            ax.legend(loc="best", fontsize=8)
        if start is not None or len(steps) <= ANNOTATED_POINTS:
            ax.margins(x=0.1, y=0.2)  # room for the values written above the points
        if len(set(steps) | ({0} if start is not None else set())) == 1:
            ax.set_xticks(steps)  # one step: the locator would invent fractional steps around it
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key in reference:
            ax.axhline(reference[key], color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def loss_curves_figure(log_history: Sequence[Mapping]) -> Figure:
    """lm_loss, aux_loss and z_loss against `step` from a Trainer log_history (LOSS_CURVES_SIZE at DPI)."""
    # No reference line for aux_loss: its balanced value is 1 (scope "layer") or top_k ("pooled").
    return _curves(log_history, LOSS_KEYS, LOSS_CURVES_SIZE, "training losses", {})


def plot_loss_curves(log_history: Sequence[Mapping], path: str | Path) -> Path:
    """Write `loss_curves_figure` (1400 x 400 px) to `path`; returns the path."""
    return _save(loss_curves_figure(log_history), path)


def balance_figure(log_history: Sequence[Mapping], before: Mapping[str, float] | None = None) -> Figure:
    """Mean max-load and mean routing entropy against `step` (BALANCE_SIZE at DPI).

    `before`: routing scalars of the untrained routers (`RoutingSummary.scalars()`), drawn at step 0
    when the log has no step 0 of its own.
    """
    # max_load is max share / mean share: 1.0 means every expert gets the same share.
    return _curves(
        log_history,
        BALANCE_KEYS,
        BALANCE_SIZE,
        "routing balance (mean over MoE layers)",
        {"routing/mean/max_load": 1.0},
        before,
    )


def plot_balance(log_history: Sequence[Mapping], path: str | Path, before: Mapping[str, float] | None = None) -> Path:
    """Write `balance_figure` (1000 x 400 px) to `path`; returns the path."""
    return _save(balance_figure(log_history, before), path)


def save_run_plots(
    output_dir: str | Path,
    start,
    end,
    log_history: Sequence[Mapping],
    *,
    start_label: str = "start",
    end_label: str = "end",
    before: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write the run plots into `output_dir/plots/` and return their paths.

    Always `loss_curves.png` and `balance.png` (with `before`, the untrained routers' scalars, at
    step 0); `usage_start_end.png` when summaries are given (`start`/`end` None: no routing window
    was recorded); `source_expert.png` when `end` has per-source data.
    """
    plots = Path(output_dir) / "plots"
    paths = [
        plot_loss_curves(log_history, plots / "loss_curves.png"),
        plot_balance(log_history, plots / "balance.png", before),
    ]
    if end is not None:
        paths.append(
            plot_usage_start_end(
                start, end, plots / "usage_start_end.png", start_label=start_label, end_label=end_label
            )
        )
        if len(end.sources):
            paths.append(plot_source_expert(end, plots / "source_expert.png"))
    return paths
