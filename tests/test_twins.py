"""Twin experts (routing/twins.py) and the balance figures within and across them, in inspect, eval and
the training telemetry, on merges whose twins are known: a bit-identical pair and a near-identical pair
beside distinct experts, copies of one expert, and the demo's four fine-tunes of one base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from router_tune.commands.inspect import render_text
from router_tune.data import build_eval_blocks, parse_sources
from router_tune.evaluation.evaluate import evaluate_model
from router_tune.evaluation.report import format_comparison, write_report
from router_tune.model.loading import load_moe
from router_tune.routing.inspection import inspect_model
from router_tune.routing.stats import group_balance
from router_tune.routing.telemetry import format_routing_table
from tests.trainers import make_trainer, uneven_blocks

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "router_tune" / "assets" / "demo-moe"
SAMPLES = ROOT / "router_tune" / "assets" / "samples"
KNOWN_TWINS = [[0, 3], [1, 4], [2], [5]]


def test_group_balance_within_and_across_groups():
    load = np.array([[0.3, 0.1, 0.2, 0.1, 0.2, 0.1], [0.0] * 6])
    groups = [KNOWN_TWINS, KNOWN_TWINS]
    out = group_balance(load, groups)
    # {0, 3}: 0.3 vs mean 0.2 -> 1.5; {1, 4}: 0.2 vs 0.15 -> 1.33: the worst group is 1.5
    assert out["within_max_load"].tolist() == pytest.approx([1.5, 1.0])
    # per member: {0,3} 0.2, {1,4} 0.15, {2} 0.2, {5} 0.1 -> max 0.2 over the mean 1/6 = 1.2
    assert out["across_max_load"].tolist() == pytest.approx([1.2, 0.0])
    with pytest.raises(ValueError, match="not a partition"):
        group_balance(load, [[[0, 3], [1, 4], [2]], KNOWN_TWINS])


def test_twins_are_far_closer_than_the_layers_typical_pair():
    """Cosines as measured on the lab merges: the second merge's last layer (twins 0.88-0.98, other pairs at most
    0.57) groups its twins; the demo's first layer (four domains, pairs up to 0.92) groups none, though a fixed
    cosine that caught those twins would join its closest pair."""
    from router_tune.routing.twins import cosine_threshold, twin_groups

    g = np.random.default_rng(0)
    deep = np.full((8, 8), 0.0)
    deep[np.triu_indices(8, 1)] = g.uniform(0.1, 0.57, 28)
    deep = deep + deep.T + np.eye(8)
    for a, b, cos in ((0, 1, 0.92), (2, 3, 0.883), (4, 5, 0.981), (6, 7, 0.965)):
        deep[a, b] = deep[b, a] = cos
    assert twin_groups(deep) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert cosine_threshold(deep) < 0.883
    demo = np.array([[1, 0.916, 0.85, 0.80], [0.916, 1, 0.86, 0.83], [0.85, 0.86, 1, 0.88], [0.80, 0.83, 0.88, 1]])
    assert twin_groups(demo) == [[0], [1], [2], [3]] and cosine_threshold(demo) > 0.916
    assert twin_groups(np.ones((3, 3))) == [[0, 1, 2]]  # copies: distance 0
    assert twin_groups(np.array([[1.0, 0.999], [0.999, 1.0]])) == [[0], [1]]  # one pair has no typical pair


def test_inspect_groups_known_twins_and_reports_balance_within_and_across(mixtral_twins):
    report = inspect_model(mixtral_twins)
    twins = report["twins"]
    assert (twins["method"], twins["threshold"], twins["tokens"]) == ("output cosine", 0.4, report["sample"]["tokens"])
    for layer in report["layers"]:
        assert layer["twin_groups"] == KNOWN_TWINS  # identical AND near-identical pairs, distinct experts alone
        assert layer["identical_experts"] == [[0, 3]]  # the fingerprints see only the bit-identical pair
        sim = np.asarray(layer["expert_similarity"])
        assert sim[0, 3] == 1.0 and sim[1, 4] >= 0.99 and sim[0, 2] < 0.9
        load = np.asarray(layer["load"])
        assert layer["max_load"] == pytest.approx(load.max() * 6, abs=1e-3)
        assert layer["maxvio"] == pytest.approx(layer["max_load"] - 1, abs=1e-3)
        expected = group_balance(load[None], [KNOWN_TWINS])
        assert layer["within_max_load"] == pytest.approx(expected["within_max_load"][0], abs=1e-3)
        assert layer["across_max_load"] == pytest.approx(expected["across_max_load"][0], abs=1e-3)
    assert any(f.startswith("experts 1, 4 are twins in layers 0, 1 ") for f in report["findings"])
    text = render_text(report)
    assert "max/mean all/within/across" in text and "0,3; 1,4" in text and "0.4 x the layer's median" in text


def test_copies_form_one_group_and_fine_tunes_of_one_base_none(mixtral_identical):
    identical = inspect_model(mixtral_identical)
    assert all(layer["twin_groups"] == [[0, 1, 2, 3]] for layer in identical["layers"])
    # the demo's experts: four fine-tunes of one base model on different domains (cosine 0.39-0.92)
    demo = inspect_model(DEMO, max_tokens=256)
    assert all(layer["twin_groups"] == [[0], [1], [2], [3]] for layer in demo["layers"])
    assert max(max(r) for r in np.asarray(demo["layers"][0]["expert_similarity"]) - np.eye(4)) > 0.9  # a fixed
    # cosine of 0.9 would join two of them: the layer's own spread keeps them apart


def test_eval_report_shows_balance_within_and_across_twins(mixtral_twins, tmp_path):
    model, _ = load_moe(mixtral_twins, device_map="cpu", compute_device="cpu")
    from transformers import AutoTokenizer

    specs = parse_sources([{"source": "redpajama", "path": str(SAMPLES / "redpajama")}])
    blocks = build_eval_blocks(specs, AutoTokenizer.from_pretrained(mixtral_twins), 64, max_blocks=4)
    result = evaluate_model(model, blocks, progress=False)
    assert result.twins.groups == [KNOWN_TWINS] * 2 and result.routing.expert_groups == [KNOWN_TWINS] * 2
    path = write_report(tmp_path / "eval", {"model": result})
    data = json.loads(path.read_text())["model"]
    expected = group_balance(result.routing.load, [KNOWN_TWINS] * 2)
    assert data["layer_balance"]["within_max_load"] == pytest.approx(expected["within_max_load"].tolist())
    assert data["layer_balance"]["across_max_load"] == pytest.approx(expected["across_max_load"].tolist())
    assert data["balance"]["maxvio"] == pytest.approx(float(np.mean(result.routing.max_load)) - 1)
    assert data["twins"]["groups"] == [KNOWN_TWINS] * 2
    text = format_comparison({"model": result})
    assert "within twins model" in text and "L0 {0,3} {1,4}" in text
    assert "within twins" in (tmp_path / "eval" / "report.md").read_text()


def test_training_logs_balance_within_and_across_twins(mixtral_twins, tmp_path):
    trainer = make_trainer(mixtral_twins, tmp_path / "run", steps=2, batch=2)
    assert trainer.twins.groups == [KNOWN_TWINS] * 2
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "routing/L0/within_max_load" in h)
    summary = trainer.telemetry.last_summary
    expected = group_balance(summary.load, [KNOWN_TWINS] * 2)
    assert logged["routing/L1/within_max_load"] == pytest.approx(expected["within_max_load"][1])
    assert logged["routing/L1/across_max_load"] == pytest.approx(expected["across_max_load"][1])
    assert logged["routing/L0/maxvio"] == pytest.approx(summary.max_load[0] - 1)
    assert "within" in format_routing_table(summary)
    assert trainer.run_info()["twins"]["groups"] == [KNOWN_TWINS] * 2


def test_loss_free_twin_scope_moves_only_the_twins_bias(mixtral_twins, tmp_path):
    """loss_free_scope twins: the measured groups reach the bias update, so the twinless experts 2 and 5 keep a
    zero bias while the twins' move (with the layer's mean, every expert's would)."""
    kw = dict(steps=3, batch=2, balancing="loss_free", loss_free_rate=0.05, routing_log_every=0)
    twins = make_trainer(mixtral_twins, tmp_path / "twins", loss_free_scope="twins", **kw)
    twins.train()
    bias = twins.loss_free.bias
    assert (bias[:, [2, 5]] == 0).all() and (bias[:, [0, 1, 3, 4]] != 0).any()
    everyone = make_trainer(mixtral_twins, tmp_path / "experts", **kw)
    everyone.train()
    assert (everyone.loss_free.bias[:, [2, 5]] != 0).any()


def _twin_loss_reference(router_logits, top_k, groups) -> float:
    """Independent twin balancing loss: loads counted token by token, the formula written out per group."""
    terms = []
    for layer, logits in enumerate(router_logits):
        logits = logits.detach().float()
        probs = logits.softmax(-1)
        counts = torch.zeros(probs.shape[1])
        for row in probs.topk(top_k, dim=-1).indices:
            counts[row] += 1
        f = counts / counts.sum()
        for group in groups[layer]:
            if len(group) > 1:
                share = f[group].sum()
                mass = (probs[:, group].sum(-1, keepdim=True) * logits[:, group].softmax(-1)).mean(0)
                terms.append(((len(group) * f[group] / share - 1) * mass).sum())
    return float(torch.stack(terms).mean())


def test_twin_loss_is_added_with_its_coefficient_and_logged(mixtral_twins, tmp_path):
    """router_twin_loss_coef: the trainer's loss grows by coef x the twin balancing loss of the measured groups."""
    kw = dict(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, aux_loss_reduce="micro", steps=2, batch=2)
    twins = make_trainer(mixtral_twins, tmp_path / "twins", router_twin_loss_coef=10.0, **kw)
    plain = make_trainer(mixtral_twins, tmp_path / "plain", **kw)
    for trainer in (twins, plain):  # decisive routers, so the twins' loads differ clearly
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data.mul_(4.0)
    batch = twins.data_collator([twins.train_dataset[i] for i in range(3)])
    losses = [t.compute_loss(t.model.train(), dict(batch)) for t in (twins, plain)]
    out = plain.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_router_logits=True)
    reference = _twin_loss_reference(out.router_logits, 2, [KNOWN_TWINS] * 2)
    assert reference > 0.001
    assert (losses[0] - losses[1]).item() == pytest.approx(10.0 * reference, rel=1e-4)

    twins.train()
    plain.train()
    assert [h["twin_loss"] >= 0 for h in twins.state.log_history if "lm_loss" in h] == [True, True]
    assert not any("twin_loss" in h for h in plain.state.log_history)


def test_twin_loss_accumulated_matches_big_batch(mixtral_twins, tmp_path):
    """4 micro-batches x 2 blocks == 1 x 8 blocks (uneven targets and real tokens per block) with the twin loss
    on global counts: it is linear in the probabilities, normalised by the whole step's tokens."""
    data = uneven_blocks(mixtral_twins, 24)

    def routers(out, batch, ga, coef=1.0):
        trainer = make_trainer(
            mixtral_twins,
            out,
            steps=3,
            batch=batch,
            ga=ga,
            data=data,
            aux_loss_reduce="global_prev",
            router_twin_loss_coef=coef,
            train_sampling_strategy="sequential",
        )
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    big, accumulated = routers(tmp_path / "1x8", 8, 1), routers(tmp_path / "4x2", 2, 4)
    for n in big:
        torch.testing.assert_close(big[n], accumulated[n], rtol=1e-5, atol=1e-7)
    without = routers(tmp_path / "off", 8, 1, coef=0.0)  # the twin loss moved the routers
    assert max((without[n] - big[n]).abs().max().item() for n in big) > 1e-4


def test_twin_loss_without_twins_says_so(mixtral_legacy, tmp_path, caplog):
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=1, router_twin_loss_coef=0.5)
    assert not trainer.twins.has_twins()
    assert "no layer has twin experts" in caplog.text
