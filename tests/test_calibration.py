"""Router temperature calibration (training/calibration.py): the factor chosen, what it is multiplied into."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from router_tune.data import collate_blocks
from router_tune.errors import RouterTuneError
from router_tune.model.routers import find_routers, router_state_dict
from router_tune.training import calibration
from router_tune.training.calibration import GRID, TOLERANCE, calibrate_router_temperature
from router_tune.training.config import load_recipe
from tests.trainers import make_trainer, uneven_blocks


def reference_loss(model, batches, factor: float, trained: list[torch.Tensor]) -> float:
    """Mean next-token CE over all target tokens with every router weight times `factor`, by the plain
    logits of an ordinary forward (not router_tune's chunked head path)."""
    with torch.no_grad():
        for router, w in zip(find_routers(model), trained):
            router.module.weight.copy_(w * factor)
        total, count = 0.0, 0
        for b in batches:
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


@pytest.fixture
def soft_routers(mixtral_legacy):
    """The tiny Mixtral with routers 4x softer than stored (so sharpening pays), fp32, and uneven blocks
    (ignored label prefixes, padded tails) in two batches of different sizes."""
    model = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        for router in find_routers(model):
            router.module.weight.mul_(0.25)
    rows = uneven_blocks(mixtral_legacy, 7).to_list()
    return model, [collate_blocks(rows[:4]), collate_blocks(rows[4:])]


@pytest.mark.parametrize("chunked", [True, False])
def test_the_factor_with_the_lowest_lm_loss_is_multiplied_into_every_router(soft_routers, chunked, monkeypatch):
    # the tiny model's routers move its loss by 1e-6 only: with no tolerance the lowest loss wins
    monkeypatch.setattr(calibration, "TOLERANCE", 0.0)
    model, batches = soft_routers
    trained = [r.module.weight.detach().clone() for r in find_routers(model)]
    result = calibrate_router_temperature(model, batches, chunked=chunked, chunk_tokens=16)
    calibrated = [r.module.weight.detach().clone() for r in find_routers(model)]

    expected = {f: reference_loss(model, batches, f, trained) for f in GRID}
    for f in GRID:
        assert result["losses"][str(f)] == pytest.approx(expected[f], rel=1e-5)
    best = min(GRID, key=expected.get)
    assert best != 1.0  # the routers were softened: the test would not see a calibration that does nothing
    assert result["factor"] == best and result["blocks"] == 7
    for w, c in zip(trained, calibrated):
        torch.testing.assert_close(c, w * best, rtol=0, atol=0)


def test_a_gain_within_the_tolerance_keeps_the_routers_as_trained(soft_routers):
    model, batches = soft_routers
    trained = router_state_dict(model)
    result = calibrate_router_temperature(model, batches)
    losses = list(result["losses"].values())
    assert min(losses) < result["losses"]["1.0"]  # a lower loss exists, by less than the tolerance
    assert result["losses"]["1.0"] <= min(losses) * (1 + TOLERANCE)
    assert result["factor"] == 1.0
    for name, w in router_state_dict(model).items():
        torch.testing.assert_close(w, trained[name], rtol=0, atol=0)


def test_the_run_calibrates_after_the_last_step_and_checkpoints_keep_the_trained_routers(
    mixtral_legacy, tmp_path, monkeypatch
):
    monkeypatch.setattr(calibration, "TOLERANCE", 0.0)
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=3, save_steps=3, router_calibration=True)
    trainer.train()
    trainer.save_model()
    record = json.loads((tmp_path / "run" / "router_tune.json").read_text())["router_calibration"]
    factor = record["factor"]
    assert factor in GRID and record["blocks"] == 16 and set(record["losses"]) == {str(f) for f in GRID}
    as_trained = load_file(tmp_path / "run" / "checkpoint-3" / "routers.safetensors")
    final = load_file(tmp_path / "run" / "routers.safetensors")
    assert set(final) == set(as_trained)
    for name, w in as_trained.items():
        torch.testing.assert_close(final[name], w * factor, rtol=0, atol=0)
    # the chosen factor is the grid's best on the first 16 training blocks, measured independently
    model = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32)
    trained = [as_trained[name] for name in router_state_dict(model)]
    blocks = [trainer.train_dataset[i] for i in range(16)]
    batches = [collate_blocks(blocks[i : i + 8]) for i in (0, 8)]
    expected = {f: reference_loss(model, batches, f, trained) for f in GRID}
    assert factor != 1.0 and factor == min(GRID, key=expected.get)


def test_calibration_off_leaves_the_routers_as_trained(mixtral_legacy, tmp_path):
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=2, save_steps=2, router_calibration=False)
    trainer.train()
    trainer.save_model()
    assert json.loads((tmp_path / "run" / "router_tune.json").read_text())["router_calibration"] is None
    as_trained = load_file(tmp_path / "run" / "checkpoint-2" / "routers.safetensors")
    final = load_file(tmp_path / "run" / "routers.safetensors")
    for name, w in as_trained.items():
        torch.testing.assert_close(final[name], w, rtol=0, atol=0)


def test_calibration_blocks_must_be_positive():
    with pytest.raises(RouterTuneError, match="router_calibration_blocks"):
        load_recipe(None, model_name_or_path="x", router_calibration_blocks=0)
