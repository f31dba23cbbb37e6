"""router-tune eval: perplexity and routing checked against direct computations, run-directory
loading, reports and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from router_tune.cli import main as cli_main
from router_tune.data import build_eval_blocks, collate_blocks, parse_sources
from router_tune.data.sources import sources_from_files
from router_tune.errors import RouterTuneError
from router_tune.evaluation.evaluate import EvalResult, evaluate_model, load_for_eval
from router_tune.evaluation.report import format_comparison, write_report
from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
from router_tune.model.fingerprints import expert_fingerprints
from router_tune.model.loading import load_moe
from router_tune.model.routers import router_state_dict
from router_tune.routing.telemetry import expert_counts
from tests import factories

WORDS = (
    "router expert token layer gate softmax merge model python data block source tensor weight loss "
    "train held out perplexity entropy balance"
).split()
BLOCK, FRACTION, MAX_BLOCKS = 128, 0.5, 3


def write_data(root: Path) -> list[Path]:
    """A RedPajama-style JSONL and a Wizard-Vicuna JSON file, enough documents for held-out blocks."""
    rng = np.random.default_rng(0)
    sentence = lambda n: " ".join(rng.choice(WORDS, n))
    root.mkdir(parents=True, exist_ok=True)
    text = root / "book_sample.jsonl"
    text.write_text(
        "".join(
            json.dumps({"text": sentence(40), "meta": {"redpajama_set_name": "RedPajamaBook"}}) + "\n"
            for _ in range(24)
        )
    )
    chats = root / "chats.json"
    chats.write_text(
        json.dumps(
            [
                {
                    "id": str(i),
                    "conversations": [{"from": "human", "value": sentence(12)}, {"from": "gpt", "value": sentence(20)}],
                }
                for i in range(24)
            ]
        )
    )
    return [text, chats]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("eval-data"))


def held_out_blocks(tokenizer, data_files: list[Path]) -> dict:
    """The test data's held-out blocks, as every test of this module evaluates them."""
    return build_eval_blocks(
        parse_sources(sources_from_files([str(p) for p in data_files])),
        tokenizer,
        BLOCK,
        eval_fraction=FRACTION,
        max_blocks=MAX_BLOCKS,
    )


@pytest.fixture(scope="module")
def source_and_blocks(mixtral_legacy, data_files):
    model, info = load_moe(mixtral_legacy)
    tokenizer = AutoTokenizer.from_pretrained(mixtral_legacy)
    blocks = held_out_blocks(tokenizer, data_files)
    return model, info, blocks


def make_run(source: Path, root: Path, *, step: int = 5) -> tuple[Path, dict]:
    """A run directory as RouterTrainer._save writes it, with routers = source routers + noise."""
    model, info = load_moe(source)
    gen = torch.Generator().manual_seed(1)
    routers = {n: t + torch.randn(t.shape, generator=gen) for n, t in router_state_dict(model).items()}
    run = root / "run"
    run.mkdir(parents=True)
    save_file(
        routers,
        str(run / "routers.safetensors"),
        metadata={"format": "router_tune.routers", "source_model": str(source)},
    )
    meta = {
        "source_model": str(source),
        "source_dir": str(source),
        "architecture": info.architecture,
        "layout": info.layout,
        "num_experts": info.num_experts,
        "top_k": info.top_k,
        "moe_layers": info.moe_layers,
        "fingerprints": expert_fingerprints(model),
        "fingerprint_format": FINGERPRINT_FORMAT,
        "global_step": step,
        "recipe": {
            "model_name_or_path": str(source),
            "model_dtype": "auto",
            "block_size": BLOCK,
            "eval_fraction": FRACTION,
            "eval_max_blocks": 2,
        },
    }
    (run / "router_tune.json").write_text(json.dumps(meta))
    return run, routers


def direct(model, blocks: dict[str, list[dict]]):
    """Independent reference: one block at a time, full logits, F.cross_entropy in float64."""
    ce, targets = {}, {}
    with torch.no_grad():
        for source, source_blocks in blocks.items():
            ce[source], targets[source] = 0.0, 0
            for block in source_blocks:
                b = collate_blocks([block])
                out = model(
                    input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, output_router_logits=True
                )
                ce[source] += F.cross_entropy(
                    out.logits[0, :-1].double(), b["labels"][0, 1:], ignore_index=-100, reduction="sum"
                ).item()
                targets[source] += int((b["labels"][0, 1:] != -100).sum())
    return ce, targets


def test_perplexity_and_routing_match_direct_computation(source_and_blocks):
    model, info, blocks = source_and_blocks
    assert set(blocks) == {"book_sample", "chats"} and all(len(b) >= 2 for b in blocks.values())
    result = evaluate_model(model, blocks, top_k=info.top_k, batch_size=2, progress=False)
    ce, targets = direct(model, blocks)
    for source in blocks:
        assert result.tokens[source] == targets[source]
        assert result.perplexity[source] == pytest.approx(math.exp(ce[source] / targets[source]), rel=1e-5)
    # token-weighted overall, not the mean of the per-source perplexities
    overall = math.exp(sum(ce.values()) / sum(targets.values()))
    assert result.perplexity["overall"] == pytest.approx(overall, rel=1e-5)
    assert result.tokens["overall"] == sum(targets.values())

    real = {s: sum(sum(b["token_mask"]) for b in bs) for s, bs in blocks.items()}
    routing = result.routing
    assert routing.tokens == sum(real.values())
    assert routing.source_tokens.tolist() == [real[s] for s in routing.sources]
    counts = expert_counts(routing)
    assert (counts.sum(axis=1) == routing.tokens * info.top_k).all()
    with torch.no_grad():  # per-layer counts from the raw router logits of every real token
        expected = np.zeros_like(counts)
        for source_blocks in blocks.values():
            for block in source_blocks:
                b = collate_blocks([block])
                out = model(
                    input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, output_router_logits=True
                )
                real_tokens = b["token_mask"][0].bool()
                for i, logits in enumerate(out.router_logits):
                    top = logits[real_tokens].topk(info.top_k, dim=-1).indices.reshape(-1)
                    expected[i] += np.bincount(top.numpy(), minlength=info.num_experts)
    np.testing.assert_array_equal(counts, expected)

    again = EvalResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.perplexity == result.perplexity and again.tokens == result.tokens
    np.testing.assert_allclose(again.routing.load, routing.load)


def test_run_directory_loads_source_with_trained_routers(mixtral_legacy, tmp_path):
    run, routers = make_run(mixtral_legacy, tmp_path)
    model, tokenizer, info, label = load_for_eval(run)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    by_hand = AutoModelForCausalLM.from_pretrained(mixtral_legacy)
    source_logits = by_hand(ids).logits
    with torch.no_grad():
        for name, value in routers.items():
            by_hand.get_parameter(name).copy_(value)
        expected = by_hand(ids).logits
        got = model(ids).logits
    assert not torch.allclose(got, source_logits, atol=1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    delta, *_ = load_for_eval(mixtral_legacy, routers=run / "routers.safetensors")  # a model + a routers file
    with torch.no_grad():
        torch.testing.assert_close(delta(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert "step 5" in label and tokenizer.get_vocab() == AutoTokenizer.from_pretrained(mixtral_legacy).get_vocab()
    assert info.num_experts == factories.EXPERTS


def test_report_comparison_and_console_table(source_and_blocks, tmp_path):
    model, info, blocks = source_and_blocks
    before = evaluate_model(model, blocks, top_k=info.top_k, progress=False, label="source")
    saved = router_state_dict(model)
    try:
        with torch.no_grad():
            for name in saved:
                model.get_parameter(name).mul_(-3.0)  # a different routing, same experts
        after = evaluate_model(model, blocks, top_k=info.top_k, progress=False, label="tuned")
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                model.get_parameter(name).copy_(value)
    path = write_report(tmp_path / "eval", {"before": before, "after": after}, meta={"global_step": 9})
    report = json.loads(path.read_text())
    assert report["global_step"] == 9 and report["models"] == {"before": "source", "after": "tuned"}
    cmp = report["comparison"]
    for source in ("book_sample", "chats", "overall"):
        row = cmp["perplexity"][source]
        b, a = before.perplexity[source], after.perplexity[source]
        assert (row["before"], row["after"]) == (b, a)
        assert row["delta"] == pytest.approx(a - b) and row["relative_change"] == pytest.approx((a - b) / b)
    assert cmp["routing"]["max_load"]["after"] == pytest.approx(after.routing.max_load.tolist())
    assert cmp["routing"]["dead"]["delta"] == (after.routing.dead - before.routing.dead).tolist()
    for name in report["figures"]:
        assert (path.parent / name).stat().st_size > 1000
    assert {"source_expert_before.png", "source_expert_after.png", "usage_before_vs_after.png"} <= set(
        report["figures"]
    )
    md = (path.parent / "report.md").read_text()
    pct = f"{100 * (after.perplexity['overall'] - before.perplexity['overall']) / before.perplexity['overall']:+.1f}%"
    assert "| before | after | delta | change |" in md and pct in md
    assert "Source x expert share: before" in md and "Source x expert share: after" in md
    table = format_comparison({"before": before, "after": after})
    assert pct in table and "book_sample" in table and "L1" in table


def test_cli_run_dir_compares_with_source(mixtral_legacy, data_files, tmp_path, capsys):
    run, _ = make_run(mixtral_legacy, tmp_path)
    code = cli_main(
        [
            "eval",
            str(run),
            "--data",
            *map(str, data_files),
            "--eval-fraction",
            str(FRACTION),
            "--block-size",
            str(BLOCK),
            "--max-blocks",
            "2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert str(run / "eval" / "report.md") in out and "usage_before_vs_after.png" in out
    assert report["global_step"] == 5 and report["models"]["before"] == str(mixtral_legacy)
    assert report["before"]["blocks"] == {"book_sample": 2, "chats": 2}
    ppl = report["comparison"]["perplexity"]["overall"]
    assert ppl["delta"] == pytest.approx(
        report["after"]["perplexity"]["overall"] - report["before"]["perplexity"]["overall"]
    )
    assert report["after"]["perplexity"] != report["before"]["perplexity"]  # the routers changed the model


def test_cli_never_replaces_a_report_silently(mixtral_legacy, data_files, tmp_path, capsys, monkeypatch):
    """The run's own report stays; a second eval writes eval-2; an --out holding a report is refused before
    any weight loads, unless --force."""
    from router_tune.commands import eval as eval_command

    run, _ = make_run(mixtral_legacy, tmp_path)
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text('{"from": "training"}')
    data = ["--data", *map(str, data_files), "--eval-fraction", str(FRACTION), "--block-size", str(BLOCK)]
    assert cli_main(["eval", str(run), *data, "--max-blocks", "2"]) == 0
    assert (run / "eval" / "report.json").read_text() == '{"from": "training"}'
    assert json.loads((run / "eval-2" / "report.json").read_text())["before"]["blocks"] == {
        "book_sample": 2,
        "chats": 2,
    }
    assert f"this one goes to {run / 'eval-2'}" in capsys.readouterr().out

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the existing report was refused")

    monkeypatch.setattr(eval_command, "load_for_eval", refuse)
    assert cli_main(["eval", str(run), *data, "--out", str(run / "eval")]) == 1
    err = capsys.readouterr().err
    assert "already holds a report" in err and "--force" in err
    monkeypatch.undo()
    assert cli_main(["eval", str(run), *data, "--max-blocks", "2", "--out", str(run / "eval"), "--force"]) == 0
    assert json.loads((run / "eval" / "report.json").read_text())["global_step"] == 5


def test_cli_errors(mixtral_legacy, copy_of, tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    other = copy_of(mixtral_legacy)
    for f in other.glob("tokenizer*"):
        f.unlink()
    factories.make_tokenizer(other, vocab_size=300)
    assert cli_main(["eval", str(mixtral_legacy), "--compare", str(other)]) == 1
    assert "do not share a tokenizer" in capsys.readouterr().err


def test_data_files_rule(data_files, tmp_path):
    entries = sources_from_files([str(p) for p in data_files] + [str(data_files[0])])
    assert [(e["source"], e["name"]) for e in entries] == [
        ("redpajama", "book_sample"),
        ("wizard_vicuna", "chats"),
        ("redpajama", "book_sample_2"),
    ]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in data_files:
        (mixed / f.name).write_text(f.read_text())
    with pytest.raises(RouterTuneError, match="cannot tell its source type"):
        sources_from_files([str(mixed)])


def test_forced_routing_equals_a_model_of_that_expert_alone(mixtral_legacy):
    """Oracle routing to expert 1 gives the logits of a model whose every expert is expert 1
    (with renormalised top-k weights, copies of one expert are that expert)."""
    from transformers import AutoModelForCausalLM

    from router_tune.evaluation.evaluate import forced_routing

    model = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32)
    copies = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32)
    with torch.no_grad():
        for layer in copies.model.layers:
            layer.mlp.experts.gate_up_proj[:] = layer.mlp.experts.gate_up_proj[1].clone()
            layer.mlp.experts.down_proj[:] = layer.mlp.experts.down_proj[1].clone()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad(), forced_routing(model, 1):
        forced = model(input_ids=ids).logits
    with torch.no_grad():
        expected = copies(input_ids=ids).logits
        normal = model(input_ids=ids).logits  # the hooks are gone again
    torch.testing.assert_close(forced, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normal, forced)


def test_forced_routing_to_two_experts_shares_every_token_evenly(mixtral_legacy):
    """Every MoE block's output is the mean of the two experts' own outputs (their SwiGLU written out
    from the weights); a wrong set of experts is refused."""
    from transformers import AutoModelForCausalLM

    from router_tune.evaluation.evaluate import forced_routing

    model = AutoModelForCausalLM.from_pretrained(mixtral_legacy, dtype=torch.float32)
    seen = []
    hooks = [
        layer.mlp.register_forward_hook(lambda m, a, out: seen.append((m, a[0], out))) for layer in model.model.layers
    ]
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad(), forced_routing(model, [2, 1]):
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(model.model.layers)
    for block, x, out in seen:
        out = out[0] if isinstance(out, tuple) else out
        x = x.reshape(-1, x.shape[-1])
        outputs = []
        for e in (1, 2):
            gate, up = (x @ block.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            outputs.append((F.silu(gate) * up) @ block.experts.down_proj[e].T)
        torch.testing.assert_close(out.reshape(x.shape), (outputs[0] + outputs[1]) / 2, rtol=1e-5, atol=1e-6)
    for bad in ([1, 1], [0, 1, 2], [7]):
        with pytest.raises(RouterTuneError, match="forced routing"), forced_routing(model, bad):
            model(input_ids=ids)


def test_bf16_figures_are_the_deployed_model_with_fp32_router_figures_beside(mixtral_bf16, data_files):
    """In bf16, `perplexity` is what the exported checkpoint computes under plain transformers (bf16
    routers, the stock forward); the fp32-router-logit figures, as training sees them, come beside."""
    model, info = load_moe(mixtral_bf16)  # fp32 routers, as training and `router-tune eval` load it
    # Routers whose experts tie in bf16 and do not in fp32: every row is one bf16-exact vector plus a
    # per-expert offset far below bf16's resolution, which rounding to bf16 erases. The deployed model
    # then always picks the first two experts, the fp32 routers pick by the offsets, per token: the
    # largest routing difference there is, whatever the tokens (an earlier version with large random
    # routers left a margin that moved with the test tokenizer, which is trained on this package's source).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ref in info.routers:
            experts, hidden = ref.module.weight.shape
            base = torch.randn(hidden, generator=gen).to(torch.bfloat16).float()
            offsets = torch.randn(experts, hidden, generator=gen) * 1e-4 * base.abs()
            ref.module.weight.copy_(base + offsets)
            assert torch.equal(ref.module.weight.bfloat16().float(), base.expand(experts, hidden))
    blocks = build_eval_blocks(
        parse_sources(sources_from_files([str(p) for p in data_files])),
        AutoTokenizer.from_pretrained(mixtral_bf16),
        BLOCK,
        eval_fraction=FRACTION,
        max_blocks=MAX_BLOCKS,
    )
    result = evaluate_model(model, blocks, batch_size=2, progress=False)
    stock = AutoModelForCausalLM.from_pretrained(mixtral_bf16).eval()  # the export: routers stored in bf16
    stock.load_state_dict({n: t.to(torch.bfloat16) for n, t in router_state_dict(model).items()}, strict=False)
    ce, targets = direct(stock, blocks)
    deployed = math.exp(sum(ce.values()) / sum(targets.values()))
    assert result.perplexity["overall"] == pytest.approx(deployed, rel=1e-6)
    fp32 = result.perplexity_fp32_routers
    # the two differ by more than the tolerance: the check above can tell them apart
    # (by 1.1e-3 with these routers; random ones moved this near-uniform tiny model ~1e-5)
    assert fp32 is not None and abs(fp32["overall"] / result.perplexity["overall"] - 1) > 1e-4  # 1.1e-3 here
    ce32, _ = direct(model, blocks)  # the fp32-router model itself
    assert fp32["overall"] == pytest.approx(math.exp(sum(ce32.values()) / sum(targets.values())), rel=1e-6)
    assert "with fp32 router logits" in format_comparison({"after": result})
    # the training model is left as it was: fp32 master routers, fp32 forward
    assert all(ref.module.weight.dtype == torch.float32 for ref in info.routers)


def test_eval_device(mixtral_legacy, monkeypatch, capsys):
    """--device picks where the weights load (from_pretrained's device_map), checked before loading."""
    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise RouterTuneError("stop after the load call")

    monkeypatch.setattr("router_tune.evaluation.evaluate.load_moe", fake_load)
    assert cli_main(["eval", str(mixtral_legacy), "--device", "cpu"]) == 1
    assert seen["device_map"] == "cpu"
    seen.clear()
    assert cli_main(["eval", str(mixtral_legacy), "--device", "nonsense"]) == 1
    assert "is not a device" in capsys.readouterr().err and not seen
    if not torch.cuda.is_available():
        for device in ("cuda", "auto"):
            assert cli_main(["eval", str(mixtral_legacy), "--device", device]) == 1
            assert "use --device cpu" in capsys.readouterr().err and not seen


def test_a_bf16_checkpoint_on_a_cpu_without_native_bf16_is_evaluated_in_fp32_with_routers_as_exported(
    mixtral_bf16, data_files, tmp_path, monkeypatch
):
    """Emulated bf16 made `router-tune eval` of the real SmolLM2 merge take ~47 s a batch: like training,
    eval computes a bf16 checkpoint in fp32 on such a CPU, its routers rounded to bf16 as export stores
    them. Reference: the checkpoint loaded in fp32 by hand, routers set to their bf16 values, plain forward."""
    from router_tune.model import loading

    monkeypatch.setattr(loading, "native_half_matmul", lambda dtype: False)
    run, routers = make_run(mixtral_bf16, tmp_path)
    model, tokenizer, info, _ = load_for_eval(run)
    assert (info.dtype, info.stored_dtype) == (torch.float32, torch.bfloat16)
    blocks = held_out_blocks(tokenizer, data_files)
    result = evaluate_model(model, blocks, progress=False, stored_dtype=info.stored_dtype)
    reference = AutoModelForCausalLM.from_pretrained(mixtral_bf16, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, value in routers.items():
            reference.get_parameter(name).copy_(value.to(torch.bfloat16).float())
    ce, targets = direct(reference, blocks)
    for source in blocks:
        assert result.perplexity[source] == pytest.approx(math.exp(ce[source] / targets[source]), rel=1e-6)
    assert result.perplexity_fp32_routers is not None  # the unrounded routers, as training computed them
