"""The run and report figures as a person reads them: short runs visible, step 0 on balance.png, colour
bars in the cells' unit. Checked on the matplotlib objects the plot functions build, not on pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from router_tune.routing import plots
from router_tune.routing.stats import RoutingStats
from router_tune.routing.telemetry import RoutingTelemetry

LAYERS, EXPERTS, TOP_K, TOKENS = [0, 1], 4, 2, 16


def summary(seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(TOKENS, EXPERTS, generator=generator) * 2 for _ in LAYERS]
    stats = RoutingStats(len(LAYERS), EXPERTS, TOP_K, sources=["code", "chat"], layer_ids=LAYERS)
    stats.update(logits, mask=torch.ones(TOKENS), source_ids=torch.tensor([0] * 10 + [1] * 6))
    return stats.summary()


def curve_axes(fig, key):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == key]
    return ax


def data_lines(ax):
    """The plotted series, not the reference line (axhline: an unlabelled "_child" line)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


@pytest.mark.parametrize("steps", [[3], [2, 4]])
def test_a_short_run_draws_a_marker_and_the_value_of_every_point(steps):
    history = [{"step": s, "lm_loss": 4.0 - s / 10, "aux_loss": 1.1, "z_loss": 0.5} for s in steps]
    fig = plots.loss_curves_figure(history)
    for key in plots.LOSS_KEYS:
        ax = curve_axes(fig, key)
        (line,) = data_lines(ax)
        assert list(line.get_xdata()) == steps
        assert line.get_marker() == "o" and line.get_markersize() >= 5  # was ".", a dot nobody sees alone
        written = [t.get_text() for t in ax.texts]
        assert written == [f"{e[key]:.4g}" for e in history]
        if len(steps) == 1:
            assert list(ax.get_xticks()) == steps  # not 2.84 ... 3.16 around a lone step


def test_a_long_run_draws_a_plain_line():
    history = [{"step": s, "lm_loss": 1.0 / s} for s in range(1, 101)]
    ax = curve_axes(plots.loss_curves_figure(history), "lm_loss")
    (line,) = data_lines(ax)
    assert line.get_marker() == "None" and len(ax.texts) == 0


def test_balance_starts_at_step_0_with_the_untrained_routers(tmp_path, monkeypatch):
    before, window = summary(0), summary(1)
    built = []
    original = plots.balance_figure
    monkeypatch.setattr(plots, "balance_figure", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    telemetry = RoutingTelemetry(tmp_path)
    telemetry.first_step, telemetry.first_summary = 0, before  # what RouterTrainer.train records
    telemetry.record(window, 2)
    telemetry.save_plots([{"step": 2, **window.scalars()}])
    (fig,) = built
    for key in plots.BALANCE_KEYS:
        ax = curve_axes(fig, key)
        points = {tuple(line.get_xdata()): list(line.get_ydata()) for line in data_lines(ax)}
        assert points[(0,)] == [pytest.approx(before.scalars()[key])]
        assert points[(2,)] == [pytest.approx(window.scalars()[key])]


def test_balance_has_no_step_0_without_the_untrained_routers(tmp_path, monkeypatch):
    built = []
    original = plots.balance_figure
    monkeypatch.setattr(plots, "balance_figure", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    telemetry = RoutingTelemetry(tmp_path)
    first, last = summary(1), summary(2)
    telemetry.record(first, 2)
    telemetry.record(last, 4)
    telemetry.save_plots([{"step": 2, **first.scalars()}, {"step": 4, **last.scalars()}])
    ax = curve_axes(built[0], "routing/mean/max_load")
    assert [list(line.get_xdata()) for line in data_lines(ax)] == [[2, 4]]


def heatmaps():
    start, end = summary(3), summary(4)
    return {
        "usage": plots.usage_heatmap_figure(end),
        "source_expert": plots.source_expert_figure(end),
        "usage_start_end": plots.usage_start_end_figure(start, end),
    }


@pytest.mark.parametrize("name", ["usage", "source_expert", "usage_start_end"])
def test_colour_bars_read_in_percent_like_the_cell_labels(name):
    fig = heatmaps()[name]
    images = [image for ax in fig.axes for image in ax.images]
    for image in images:
        shares = np.asarray(image.get_array())
        cells = [float(t.get_text()) for t in image.axes.texts]
        np.testing.assert_allclose(cells, np.round(100 * shares).ravel())  # the cells: percent, no sign
    bars = [image.colorbar for image in images if image.colorbar is not None]  # start/end share one bar
    assert len(bars) == 1
    (bar,) = bars
    assert bar.ax.yaxis.get_major_formatter().format_ticks([0.0, 0.25, 0.5]) == ["0%", "25%", "50%"]
    assert "%" in bar.ax.get_ylabel()
