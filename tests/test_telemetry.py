"""Telemetry end to end: a real Trainer with wandb (offline) and tensorboard, read back from disk."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from matplotlib import pyplot as plt
from matplotlib.image import imread

from router_tune.routing.stats import RoutingStats
from router_tune.routing.telemetry import (
    RoutingTelemetry,
    expert_counts,
    format_routing_table,
    log_tensorboard,
    log_wandb,
    tensorboard_writer,
)
from tests.wandb_records import offline_history

LAYERS, EXPERTS, TOP_K, TOKENS = [0, 2, 5], 4, 2, 12
SOURCES = ["redpajama", "wizard_vicuna"]


def routed(seed: int):
    """A RoutingSummary from real RoutingStats, and the per-layer counts computed here from the logits."""
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(TOKENS, EXPERTS, generator=generator) * 3 for _ in LAYERS]
    stats = RoutingStats(len(LAYERS), EXPERTS, TOP_K, sources=SOURCES, layer_ids=LAYERS)
    stats.update(logits, mask=torch.ones(TOKENS), source_ids=torch.tensor([0] * 8 + [1] * 4))
    counts = np.stack(
        [np.bincount(layer.topk(TOP_K, dim=-1).indices.reshape(-1).numpy(), minlength=EXPERTS) for layer in logits]
    )
    return stats.summary(), counts


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, labels=None):
        return {"loss": ((x.mean() - self.w) ** 2)}


def test_trainer_logs_reach_wandb_and_tensorboard_on_the_same_step(tmp_path, monkeypatch):
    """The trainer's path: scalars merged into Trainer.log, media through RoutingTelemetry.record."""
    import wandb
    from transformers import Trainer, TrainingArguments

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    windows = {1: routed(1), 2: routed(2)}

    class TelemetryTrainer(Trainer):
        def log(self, logs, start_time=None):
            if "loss" in logs:  # training-step logs; the final train_runtime entry has no window
                summary = windows[self.state.global_step][0]
                logs.update(
                    self.telemetry.record(
                        summary, self.state.global_step, tb_writer=tensorboard_writer(self.callback_handler.callbacks)
                    )
                )
            super().log(logs, start_time)

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        logging_steps=1,
        per_device_train_batch_size=2,
        report_to=["wandb", "tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        # eval logs are extra wandb.log calls, so wandb's own `_step` runs ahead
        # of global_step: media logged with `step=global_step` would be dropped.
        eval_strategy="steps",
        eval_steps=1,
    )
    run = wandb.init(project="router-tune-test", dir=str(tmp_path))
    try:
        trainer = TelemetryTrainer(
            model=_Tiny(),
            args=args,
            train_dataset=[{"x": torch.tensor([1.0, 2.0])} for _ in range(8)],
            eval_dataset=[{"x": torch.tensor([1.0, 3.0])} for _ in range(2)],
        )
        trainer.telemetry = RoutingTelemetry(args.output_dir, report_to=args.report_to)
        trainer.train()
    finally:
        run.finish()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = offline_history(run_dir)
    for step, (summary, counts) in windows.items():
        media = [r for r in rows if r.get("train/global_step") == step and "routing/heatmap/_type" in r]
        scalars = [r for r in rows if r.get("train/global_step") == step and "train/loss" in r]
        assert len(media) == 1 and len(scalars) == 1, f"step {step}: media and scalars on train/global_step"
        for i, layer in enumerate(LAYERS):
            assert media[0][f"routing/L{layer}/usage/_type"] == "histogram"
            assert media[0][f"routing/L{layer}/usage/bins"] == list(range(EXPERTS + 1))
            assert media[0][f"routing/L{layer}/usage/values"] == counts[i].tolist()
            assert scalars[0][f"train/routing/L{layer}/max_load"] == pytest.approx(summary.max_load[i])
            assert scalars[0][f"train/routing/L{layer}/dead"] == summary.dead[i]
        assert media[0]["routing/heatmap/_type"] == "image-file"
        assert media[0]["routing/source_expert/_type"] == "image-file"
        assert (run_dir / "files" / media[0]["routing/heatmap/path"]).is_file()
        assert scalars[0]["train/routing/mean/entropy"] == pytest.approx(np.mean(summary.token_entropy))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    tags = events.Reload().Tags()
    for layer in LAYERS:
        assert {f"train/routing/L{layer}/{name}" for name in ("max_load", "entropy", "dead", "cv", "lse")} <= set(
            tags["scalars"]
        )
        assert f"routing/L{layer}/usage" in tags["histograms"]
    assert {"train/routing/mean/max_load", "train/routing/total/dead"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/routing/mean/max_load")] == [1, 2]
    heatmaps = events.Images("routing/heatmap")
    assert [(e.step, e.width, e.height) for e in heatmaps] == [(1, 800, 500), (2, 800, 500)]
    usage = events.Histograms(f"routing/L{LAYERS[0]}/usage")[-1].histogram_value
    assert usage.bucket == windows[2][1][0].tolist()


def test_media_are_skipped_without_a_wandb_run(tmp_path, monkeypatch):
    summary, _ = routed(3)
    telemetry = RoutingTelemetry(tmp_path, report_to="wandb")
    assert telemetry.record(summary, 1) == summary.scalars()  # wandb imported, no active run
    assert log_wandb(summary, 1) is False
    monkeypatch.delitem(sys.modules, "wandb", raising=False)  # wandb never imported / not installed
    assert log_wandb(summary, 2) is False
    assert telemetry.record(summary, 2)["routing/total/dead"] == int(summary.dead.sum())


def test_log_tensorboard_outside_a_trainer_writes_scalars_too(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    summary, counts = routed(4)
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        log_tensorboard(writer, summary, 7, scalars=True)
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0}).Reload()
    assert set(summary.scalars()) <= set(events.Tags()["scalars"])
    assert events.Histograms("routing/L5/usage")[0].histogram_value.bucket == counts[2].tolist()
    assert events.Histograms("routing/L5/usage")[0].histogram_value.num == TOKENS * TOP_K


def test_expert_counts_are_exact():
    summary, counts = routed(5)
    np.testing.assert_array_equal(expert_counts(summary), counts)
    assert (expert_counts(summary).sum(axis=1) == TOKENS * TOP_K).all()


def test_run_plots_decode_with_fixed_sizes(tmp_path):
    start, _ = routed(6)
    end, _ = routed(7)
    history = [
        {
            "step": s,
            "lm_loss": 3.0 / s,
            "aux_loss": 1.0 + 0.1 / s,
            "z_loss": 0.01 * s,
            **(start if s < 3 else end).scalars(),
        }
        for s in (1, 2, 3)
    ]
    history.append({"step": 3, "train_runtime": 1.0, "train_loss": 2.0})  # Trainer's final entry
    telemetry = RoutingTelemetry(tmp_path)
    telemetry.record(start, 10)
    telemetry.record(end, 20)
    paths = telemetry.save_plots(history)
    sizes = {p.name: imread(p).shape[:2] for p in paths}
    assert sizes == {
        "usage_start_end.png": (600, 1400),
        "loss_curves.png": (400, 1400),
        "balance.png": (400, 1000),
        "source_expert.png": (400, 800),
    }
    assert all(p.parent == tmp_path / "plots" for p in paths)
    assert plt.get_fignums() == []  # no figure left open in pyplot's registry


def test_plots_without_a_recorded_window_draw_the_curves_only(tmp_path):
    paths = RoutingTelemetry(tmp_path).save_plots([{"step": 1, "loss": 2.0}])
    assert sorted(p.name for p in paths) == ["balance.png", "loss_curves.png"]
    assert imread(paths[0]).shape[:2] == (400, 1400)


def test_console_table_has_every_layer_and_its_top_expert():
    summary, counts = routed(8)
    table = format_routing_table(summary)
    lines = table.splitlines()
    for i, layer in enumerate(LAYERS):
        (row,) = [line for line in lines if line.split()[0] == f"L{layer}"]
        assert f"e{int(np.argmax(counts[i]))} " in row
        assert f"{summary.max_load[i]:.2f}" in row
    assert "mean" in lines[-2] and f"{TOKENS:,} tokens" in lines[0]
