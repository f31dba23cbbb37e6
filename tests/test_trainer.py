"""RouterTrainer: what is trained, the loss it optimises, accumulation, resume, NaN steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoTokenizer

from router_tune.errors import RouterTuneError
from router_tune.model.routers import router_param_names
from router_tune.training.config import load_recipe
from router_tune.training.trainer import RouterTrainer
from tests.trainers import BLOCK, make_trainer, source_tensors, text_blocks, uneven_blocks


def test_only_routers_change(mixtral_legacy, tmp_path):
    before = source_tensors(mixtral_legacy)
    trainer = make_trainer(mixtral_legacy, tmp_path / "run")
    trainer.train()
    after = dict(trainer.model.named_parameters())
    routers = set(router_param_names(trainer.model))
    assert routers == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    for name, tensor in before.items():
        if name in routers:
            assert not torch.equal(after[name].detach().float(), tensor), f"router {name} did not train"
            assert after[name].dtype == torch.float32
        else:
            assert torch.equal(after[name].detach(), tensor), f"frozen {name} changed"


def test_qwen2_shared_expert_gate_trains(qwen2_moe, tmp_path):
    before = source_tensors(qwen2_moe)
    trainer = make_trainer(qwen2_moe, tmp_path / "run", steps=2)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, t in before.items() if not torch.equal(after[n].detach().float(), t)}
    assert changed == {f"model.layers.{i}.mlp.{g}.weight" for i in range(2) for g in ("gate", "shared_expert_gate")}


def _switch_aux(logits_per_layer, top_k):
    """Independent Switch loss per layer (f normalised by top_k), mean over layers."""
    values = []
    for logits in logits_per_layer:
        probs = logits.float().softmax(-1)
        tokens, experts = probs.shape
        f = torch.zeros(experts)
        for row in probs.topk(top_k, dim=-1).indices:
            for e in row:
                f[e] += 1
        f /= tokens * top_k
        values.append(experts * (f * probs.mean(0)).sum())
    return torch.stack(values).mean()


def _loss_and_reference_parts(trainer, batch):
    """The trainer's loss on `batch`, and the model's own CE, router logits and z-loss computed
    apart from it (the stock forward with output_router_logits)."""
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=None)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_router_logits=True)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
    rl = out.router_logits
    z = torch.stack([torch.logsumexp(layer.float(), -1).square().mean() for layer in rl]).mean()
    return loss, ce, rl, z


def test_loss_is_ce_plus_weighted_aux_and_z(mixtral_legacy, tmp_path):
    trainer = make_trainer(
        mixtral_legacy, tmp_path / "run", router_aux_loss_coef=0.1, router_z_loss_coef=0.01, aux_loss_reduce="micro"
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    batch["labels"][0, :5] = -100
    loss, ce, rl, z = _loss_and_reference_parts(trainer, batch)
    assert torch.allclose(loss, ce + 0.1 * _switch_aux(rl, 2) + 0.01 * z, rtol=1e-5, atol=1e-6)


def test_overload_loss_is_added_with_its_coefficient_and_logged(mixtral_legacy, tmp_path):
    """threshold 1.0: any expert over the mean load counts, so the term is non-zero on real routing."""
    kw = dict(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, aux_loss_reduce="micro")
    trainer = make_trainer(
        mixtral_legacy, tmp_path / "run", router_overload_loss_coef=0.5, router_overload_threshold=1.0, **kw
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss, ce, rl, z = _loss_and_reference_parts(trainer, batch)
    overload = []
    for layer in rl:  # independent: loads from a loop over the top-k choices
        probs = layer.float().softmax(-1)
        load = torch.zeros(probs.shape[1])
        for row in probs.topk(2, dim=-1).indices:
            load[row] += 1
        load = load * probs.shape[1] / load.sum()
        overload.append(((load - 1.0).clamp_min(0) * probs.mean(0)).sum())
    overload = torch.stack(overload).mean()
    assert overload > 0.01
    expected = ce + 0.1 * _switch_aux(rl, 2) + 0.01 * z + 0.5 * overload
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)

    trainer.train()
    logged = [h for h in trainer.state.log_history if "lm_loss" in h]
    assert logged and all(h["overload_loss"] >= 0 for h in logged)
    plain = make_trainer(mixtral_legacy, tmp_path / "plain", steps=1, **kw)
    plain.train()
    assert not any("overload_loss" in h for h in plain.state.log_history)


def routers_after(mixtral_legacy, out, *, batch, ga, data, reduce, steps=3):
    trainer = make_trainer(
        mixtral_legacy,
        out,
        steps=steps,
        batch=batch,
        ga=ga,
        data=data,
        aux_loss_reduce=reduce,
        router_aux_loss_coef=0.1,
        router_overload_loss_coef=0.5,
        router_overload_threshold=1.0,
        router_z_loss_coef=0.01,
        train_sampling_strategy="sequential",
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_matches_big_batch(mixtral_legacy, tmp_path):
    """4 micro-batches x 2 blocks == 1 x 8 blocks, with every block holding its own number of
    targets and real tokens: the LM, z and (global_prev) balancing and overload terms are
    normalised by the whole step, so the routers agree to float rounding."""
    data = uneven_blocks(mixtral_legacy, 24)
    big = routers_after(mixtral_legacy, tmp_path / "1x8", batch=8, ga=1, data=data, reduce="global_prev")
    accumulated = routers_after(mixtral_legacy, tmp_path / "4x2", batch=2, ga=4, data=data, reduce="global_prev")
    for n in big:
        torch.testing.assert_close(big[n], accumulated[n], rtol=1e-5, atol=1e-7)
    # The test can tell: running counts (`global`) balance each micro-batch against part of the step.
    running = routers_after(mixtral_legacy, tmp_path / "4x2-running", batch=2, ga=4, data=data, reduce="global")
    assert max((running[n] - big[n]).abs().max().item() for n in big) > 1e-5


def test_checkpoint_holds_routers_only_and_resume_is_exact(mixtral_legacy, tmp_path):
    settings = dict(steps=6, save_steps=3, aux_loss_reduce="global_prev", router_aux_loss_coef=0.1)
    full = make_trainer(mixtral_legacy, tmp_path / "full", **settings)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"routers.safetensors", "optimizer.pt", "router_tune.json", "router_tune_complete"} <= names
    assert not any(n.startswith("model") for n in names), names
    with safe_open(ckpt / "routers.safetensors", "pt") as f:
        assert set(f.keys()) == set(router_param_names(full.model))
    model_bytes = sum(p.stat().st_size for p in Path(mixtral_legacy).glob("*.safetensors"))
    assert (ckpt / "routers.safetensors").stat().st_size < model_bytes / 50

    # The resumed run has only a copy of checkpoint-3, in a directory of its own; it is compared
    # with the uninterrupted run's routers in memory, not with a file it wrote itself.
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-3")
    resumed = make_trainer(mixtral_legacy, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 6
    uninterrupted = {n: p.detach() for n, p in full.model.named_parameters() if p.requires_grad}
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), uninterrupted[n], rtol=0, atol=1e-7)


def test_resume_value_is_checked_before_any_weight_is_read(mixtral_legacy, tmp_path):
    with pytest.raises(RouterTuneError, match="does not exist: pass a checkpoint-N directory"):
        load_recipe(None, model_name_or_path=str(mixtral_legacy), resume_from_checkpoint=str(tmp_path / "nope"))
    partial = tmp_path / "run" / "checkpoint-4"
    partial.mkdir(parents=True)
    (partial / "routers.safetensors").write_bytes(b"half")
    with pytest.raises(RouterTuneError, match="not a complete router_tune checkpoint"):
        load_recipe(None, model_name_or_path=str(mixtral_legacy), resume_from_checkpoint=str(partial))
    for value in ("true", "last", "false"):
        load_recipe(None, model_name_or_path=str(mixtral_legacy), resume_from_checkpoint=value)


def test_nonfinite_loss_skips_the_step(mixtral_legacy, tmp_path, monkeypatch):
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=4)
    original = RouterTrainer.compute_loss
    snapshots = {}

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss * float("nan") if step == 1 else loss

    monkeypatch.setattr(RouterTrainer, "compute_loss", poisoned)
    trainer.train()
    assert trainer.nonfinite_steps == 1
    for n, p in snapshots[1].items():
        assert torch.equal(p, snapshots[2][n]), "the poisoned step changed the routers"
        assert torch.isfinite(p).all()
    assert not all(torch.equal(p, snapshots[3][n]) for n, p in snapshots[2].items())


def test_consecutive_nonfinite_losses_stop_the_run(mixtral_legacy, tmp_path, monkeypatch):
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=10, max_nonfinite_steps=2)
    original = RouterTrainer.compute_loss
    monkeypatch.setattr(RouterTrainer, "compute_loss", lambda self, *a, **k: original(self, *a, **k) * float("inf"))
    with pytest.raises(RouterTuneError, match="2 consecutive steps had a non-finite loss"):
        trainer.train()


def test_secrets_never_reach_run_files(mixtral_legacy, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_in_env")
    monkeypatch.setenv("WANDB_API_KEY", "SECRET_wandb_key")
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=2, save_steps=1, hub_token="hf_SECRET_hub")
    trainer.train()
    trainer.save_model()
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".md", ".yaml"):
            assert "SECRET" not in path.read_text(), path
    info = json.loads((tmp_path / "run" / "router_tune.json").read_text())
    assert "hub_token" not in info["recipe"]
    assert info["recipe"]["learning_rate"] == 0.3


def test_saturated_routers_are_rescaled_keeping_their_ranking(mixtral_saturated, tmp_path):
    from router_tune.training.rescale import measure_routers

    data = text_blocks(mixtral_saturated, 8)
    plain = make_trainer(mixtral_saturated, tmp_path / "off", data=data, router_rescale="off")
    batch = plain.data_collator([data[i] for i in range(4)])
    before = measure_routers(plain.model, batch)
    assert min(m["top1"] for m in before) > 0.9  # the fixture really is saturated

    trainer = make_trainer(mixtral_saturated, tmp_path / "auto", data=data)
    after = measure_routers(trainer.model, batch)
    assert [c["layer"] for c in trainer.router_rescaling] == [0, 1]
    for m in after:
        assert m["top1"] < 0.9 and abs(m["logit_std"] - 1.0) < 0.15
    for ref_plain, ref in zip(plain.moe.routers, trainer.moe.routers):
        ratio = ref.module.weight / ref_plain.module.weight
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.flatten()[0].item()))  # one factor per layer


def test_auto_rescale_brings_confident_routers_down_and_never_up(mixtral_legacy, tmp_path):
    """auto: a layer whose logits spread 2.5 (std over experts, mean over tokens) though not saturated
    (top-1 < 0.9) comes down to 1; a layer spreading 0.3 keeps its weights bit for bit."""
    from router_tune.model.loading import load_moe
    from router_tune.training.rescale import measure_routers, rescale_routers

    model, info = load_moe(mixtral_legacy)
    batch = {"input_ids": torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))}
    for ref, target in zip(info.routers, (2.5, 0.3)):  # scale each gate to the spread asked
        std = measure_routers(model, batch)[info.routers.index(ref)]["logit_std"]
        with torch.no_grad():
            ref.module.weight.mul_(target / std)
    before = measure_routers(model, batch)
    assert before[0]["top1"] < 0.9 and before[0]["logit_std"] > 2.0 and before[1]["logit_std"] < 0.5, before
    kept = info.routers[1].module.weight.detach().clone()

    changes = rescale_routers(model, info, batch, "auto")
    assert [c["layer"] for c in changes] == [info.routers[0].layer]
    assert measure_routers(model, batch)[0]["logit_std"] == pytest.approx(1.0, rel=0.02)
    assert torch.equal(info.routers[1].module.weight, kept)


def test_activation_checkpointing_gives_the_same_routers(mixtral_legacy, tmp_path):
    """Frozen embeddings + recomputed activations must still send gradients to every router."""
    data = text_blocks(mixtral_legacy, 8)
    runs = []
    for checkpointing in (False, True):
        trainer = make_trainer(
            mixtral_legacy, tmp_path / str(checkpointing), steps=2, data=data, activation_checkpointing=checkpointing
        )
        trainer.train()
        runs.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-5, atol=1e-7)


def test_padded_blocks_of_your_own_keep_padding_out_of_routing(mixtral_legacy, tmp_path):
    """A user's own padded blocks (input_ids, labels, attention_mask) train with the default
    collator, and padding reaches neither the loss nor the routing statistics."""
    rows = []
    for row in text_blocks(mixtral_legacy, 8):
        pad = 8 if row["source_id"] else 0
        ids = row["input_ids"][: BLOCK - pad] + [2] * pad
        rows.append(
            {
                "input_ids": ids,
                "labels": ids[: BLOCK - pad] + [-100] * pad,
                "attention_mask": [1] * (BLOCK - pad) + [0] * pad,
            }
        )
    trainer = make_trainer(mixtral_legacy, tmp_path / "run", steps=1, batch=8, data=Dataset.from_list(rows))
    trainer.train()
    real_tokens = sum(sum(r["attention_mask"]) for r in rows)
    summary = trainer.telemetry.last_summary  # the window logged at the last step
    assert summary.tokens == real_tokens


@pytest.mark.parametrize(
    "fixture, expected",
    [
        ("mixtral_identical", "All experts of every layer are identical"),
        ("mixtral_legacy", None),
    ],
)
def test_identical_experts_are_announced_before_training(fixture, expected, request, tmp_path, caplog):
    model_dir = request.getfixturevalue(fixture)
    with caplog.at_level("WARNING", logger="router_tune.training.trainer"):
        make_trainer(model_dir, tmp_path / "run", steps=1, data=text_blocks(model_dir, 4))
    messages = " ".join(r.getMessage() for r in caplog.records if r.name == "router_tune.training.trainer")
    assert (expected in messages) if expected else "identical" not in messages


def test_olmoe_routers_train_and_nothing_else_changes(olmoe, tmp_path):
    """OLMoE, added as one architecture module: routers found, trained, the rest bit-identical."""
    before = source_tensors(olmoe)
    trainer = make_trainer(olmoe, tmp_path / "run")
    assert trainer.moe.architecture == "olmoe" and trainer.moe.normalizes_topk is False
    trainer.train()
    after = dict(trainer.model.named_parameters())
    routers = set(router_param_names(trainer.model))
    assert routers == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    for name, tensor in before.items():
        changed = not torch.equal(after[name].detach().float(), tensor)
        assert changed == (name in routers), name


@pytest.mark.parametrize("mode", ["dense", "default_moe"])
def test_router_gradient_modes_train_routers_only_under_checkpointing(mode, mixtral_legacy, tmp_path):
    """A mode other than sparse changes where the routers go, never a frozen weight; the mixed schedule
    (`router_gradient_steps`) switches to sparse after its steps."""
    data, before = text_blocks(mixtral_legacy, 16), source_tensors(mixtral_legacy)
    runs, active = {}, []
    for name, kw in {"sparse": {}, mode: {"router_gradient": mode, "router_gradient_steps": 2}}.items():
        trainer = make_trainer(mixtral_legacy, tmp_path / name, steps=3, data=data, activation_checkpointing=True, **kw)
        inner = trainer.compute_loss

        def compute_loss(*args, _inner=inner, _trainer=trainer, **kwargs):
            loss = _inner(*args, **kwargs)  # the mode is chosen inside, from the step count
            active.append((_trainer.args.router_gradient, _trainer.router_gradient.active))
            return loss

        trainer.compute_loss = compute_loss
        trainer.train()
        runs[name] = dict(trainer.model.named_parameters())
    assert active == [("sparse", False)] * 3 + [(mode, True), (mode, True), (mode, False)]
    routers = set(router_param_names(trainer.model))
    for name, tensor in before.items():
        if name in routers:
            assert not torch.allclose(runs[mode][name], runs["sparse"][name], rtol=1e-4, atol=1e-6), name
        else:
            assert torch.equal(runs[mode][name].detach(), tensor), f"frozen {name} changed"


def test_rescale_probe_only_where_stored_weights_can_spread(mixtral_legacy, mixtral_saturated, monkeypatch):
    """auto: the weight bound flags mergekit-random gates and clears small (std 0.02) ones, whose
    probe (a forward through the whole model) is then skipped."""
    from router_tune.model.loading import load_moe
    from router_tune.training import rescale

    sane, sane_info = load_moe(mixtral_legacy)
    saturated, saturated_info = load_moe(mixtral_saturated)
    assert rescale.may_spread_beyond(sane, sane_info, 1.0) == [False, False]
    assert rescale.may_spread_beyond(saturated, saturated_info, 1.0) == [True, True]

    def no_probe(*args):
        raise AssertionError("probe ran although no router can saturate")

    monkeypatch.setattr(rescale, "measure_routers", no_probe)
    batch = {"input_ids": torch.arange(8).reshape(1, 8)}
    assert rescale.rescale_routers(sane, sane_info, batch, "auto") == []
    with pytest.raises(AssertionError, match="probe ran"):
        rescale.rescale_routers(saturated, saturated_info, batch, "auto")


def test_recipe_shuffle_buffers_reach_the_training_stream(mixtral_legacy, tmp_path):
    """The recipe's `shuffle_buffer` and `document_shuffle_buffer` are what the trainer's stream uses:
    with both 0, the documents come in file order and one long document's blocks in a row (packing
    order); with a block buffer, the same blocks come interleaved; with a document buffer, the
    documents come in another order."""
    docs = [{"text": f"doc{i} " + " ".join(f"w{i}" for _ in range(200))} for i in range(4)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok = AutoTokenizer.from_pretrained(mixtral_legacy)

    def first_docs(blocks_buffer: int, documents_buffer: int) -> list[str]:
        trainer = make_trainer(
            mixtral_legacy,
            tmp_path / f"run{blocks_buffer}-{documents_buffer}",
            data=None,
            datasets=[{"source": "text", "path": str(path)}],
            block_size=32,
            eval_fraction=0.0,
            shuffle_buffer=blocks_buffer,
            document_shuffle_buffer=documents_buffer,
        )
        blocks = list(trainer.train_dataset.take(80))  # all four documents
        return [max(ch for ch in tok.decode(b["input_ids"]) if ch.isdigit()) for b in blocks]

    def runs(doc_ids: list[str]) -> list[str]:
        """The documents in the order the stream starts them."""
        return [d for i, d in enumerate(doc_ids) if i == 0 or doc_ids[i - 1] != d]

    ordered = first_docs(0, 0)
    assert len(set(ordered[:8])) == 1  # the first document's blocks, one after another
    assert runs(ordered) == ["0", "1", "2", "3"]  # in file order
    assert len(set(first_docs(64, 0)[:8])) > 1
    documents_shuffled = first_docs(0, 100)
    assert sorted(runs(documents_shuffled)) == ["0", "1", "2", "3"] and runs(documents_shuffled) != runs(ordered)
