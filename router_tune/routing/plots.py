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
from matplotlib.ticker import MaxNLocator

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


def _layer_labels(summary) -> list[str]:
    return [f"L{layer}" for layer in summary.layers]


def _vmax(*matrices: np.ndarray) -> float:
    # A shared, non-degenerate upper bound so panels are comparable and an all-zero map still draws.
    return max(float(np.max(m)) if np.size(m) else 0.0 for m in matrices) or 1.0


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def render_usage_heatmap(summary, title: str = "expert usage (% of top-k selections)") -> np.ndarray:
    """Layers x experts share of selections as an RGB array (HEATMAP_SIZE at DPI) for wandb/tensorboard."""
    fig = _figure(HEATMAP_SIZE)
    ax = fig.add_subplot()
    image = _heatmap(ax, summary.load, _layer_labels(summary), _vmax(summary.load), title)
    fig.colorbar(image, ax=ax, label="share of selections")
    return _to_rgb(fig)


def _source_expert_figure(summary, size: tuple[float, float]) -> Figure:
    fig = _figure(size)
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
    fig.colorbar(image, ax=ax, label="share of selections")
    return fig


def render_source_expert(summary) -> np.ndarray:
    """Sources x experts share matrix as an RGB array (SOURCE_EXPERT_SIZE at DPI)."""
    return _to_rgb(_source_expert_figure(summary, SOURCE_EXPERT_SIZE))


def plot_source_expert(summary, path: str | Path) -> Path:
    """Write the sources x experts share heatmap (800 x 400 px) to `path`; returns the path."""
    return _save(_source_expert_figure(summary, SOURCE_EXPERT_SIZE), path)


def plot_usage_start_end(start, end, path: str | Path, *, start_label: str = "start", end_label: str = "end") -> Path:
    """Write usage heatmaps of two summaries side by side on one colour scale (1400 x 600 px)."""
    fig = _figure(USAGE_START_END_SIZE)
    left, right = fig.subplots(1, 2, sharey=True)
    vmax = _vmax(start.load, end.load)
    _heatmap(left, start.load, _layer_labels(start), vmax, f"{start_label}: max/mean {np.mean(start.max_load):.2f}")
    image = _heatmap(right, end.load, _layer_labels(end), vmax, f"{end_label}: max/mean {np.mean(end.max_load):.2f}")
    left.set_ylabel("MoE layer")
    fig.colorbar(image, ax=[left, right], label="share of top-k selections (balanced = 1/E)")
    fig.suptitle("expert usage per layer, % of top-k selections")
    return _save(fig, path)


def _series(log_history: Iterable[Mapping], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry:
            steps.append(entry["step"])
            values.append(float(entry[key]))
    return steps, values


def _curves(
    log_history: Sequence[Mapping], keys: Sequence[str], size, title: str, reference: Mapping[str, float]
) -> Figure:
    fig = _figure(size)
    axes = fig.subplots(1, len(keys), sharex=True)
    for ax, key in zip(np.atleast_1d(axes), keys):
        steps, values = _series(log_history, key)
        ax.set_title(key)
        ax.set_xlabel("step")
        if not steps:
            _no_data(ax, f"{key} not logged")
            continue
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key in reference:
            ax.axhline(reference[key], color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_loss_curves(log_history: Sequence[Mapping], path: str | Path) -> Path:
    """Write lm_loss, aux_loss and z_loss against `step` from a Trainer log_history (1400 x 400 px)."""
    # No reference line for aux_loss: its balanced value is 1 (scope "layer") or top_k ("pooled").
    fig = _curves(log_history, LOSS_KEYS, LOSS_CURVES_SIZE, "training losses", {})
    return _save(fig, path)


def plot_balance(log_history: Sequence[Mapping], path: str | Path) -> Path:
    """Write mean max-load and mean routing entropy against `step` (1000 x 400 px)."""
    # max_load is max share / mean share: 1.0 means every expert gets the same share.
    fig = _curves(
        log_history,
        BALANCE_KEYS,
        BALANCE_SIZE,
        "routing balance (mean over MoE layers)",
        {"routing/mean/max_load": 1.0},
    )
    return _save(fig, path)


def save_run_plots(
    output_dir: str | Path,
    start,
    end,
    log_history: Sequence[Mapping],
    *,
    start_label: str = "start",
    end_label: str = "end",
) -> list[Path]:
    """Write the run plots into `output_dir/plots/` and return their paths.

    Always `loss_curves.png` and `balance.png`; `usage_start_end.png` when summaries are given
    (`start`/`end` None: no routing window was recorded); `source_expert.png` when `end` has
    per-source data.
    """
    plots = Path(output_dir) / "plots"
    paths = [plot_loss_curves(log_history, plots / "loss_curves.png"), plot_balance(log_history, plots / "balance.png")]
    if end is not None:
        paths.append(
            plot_usage_start_end(
                start, end, plots / "usage_start_end.png", start_label=start_label, end_label=end_label
            )
        )
        if len(end.sources):
            paths.append(plot_source_expert(end, plots / "source_expert.png"))
    return paths
