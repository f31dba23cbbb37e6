"""`router-tune export --collapse-identical`: a merge of copies becomes the dense model it equals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from router_tune.cli import main as cli_main
from router_tune.errors import RouterTuneError
from router_tune.export.collapse import collapse_identical


def _logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(ids).logits, sum(p.numel() for p in model.parameters())


def _ids():
    return torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(7))


def _renormalised(copy_of, qwen3_identical):
    """The Qwen3 copies merge with norm_topk_prob switched on: then it does equal the dense model."""
    path = copy_of(qwen3_identical)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "norm_topk_prob": True}))
    return path


@pytest.mark.parametrize(
    "fixture, dense_class",
    [
        ("mixtral_identical", "LlamaForCausalLM"),
        ("mixtral_identical_tied", "LlamaForCausalLM"),
        ("qwen3_renormalised", "Qwen3ForCausalLM"),
    ],
)
def test_collapse_writes_the_equal_dense_model(fixture, dense_class, request, copy_of, tmp_path, capsys):
    source = (
        _renormalised(copy_of, request.getfixturevalue("qwen3_identical"))
        if fixture == "qwen3_renormalised"
        else request.getfixturevalue(fixture)
    )
    # routers that differ a lot from the source's: with renormalised copies they change nothing
    assert cli_main(["export", str(source), "--collapse-identical", "--out", str(tmp_path / "dense")]) == 0
    assert dense_class in capsys.readouterr().out
    moe_name, moe_logits, moe_params = _logits(source, _ids())
    name, logits, params = _logits(tmp_path / "dense", _ids())
    assert name == dense_class and moe_name != dense_class
    torch.testing.assert_close(logits, moe_logits, rtol=1e-5, atol=1e-5)
    config = AutoModelForCausalLM.from_pretrained(source).config
    e, h = getattr(config, "num_local_experts", None) or config.num_experts, config.hidden_size
    width = getattr(config, "moe_intermediate_size", config.intermediate_size)
    # per layer: 3 of the 4 experts' projections and the router are gone
    assert moe_params - params == config.num_hidden_layers * ((e - 1) * 3 * h * width + e * h)
    assert (tmp_path / "dense" / "tokenizer.json").is_file()


def test_collapse_of_a_run_uses_its_source(mixtral_identical, tmp_path):
    """A training run collapses to its source's dense model (its routers cannot matter)."""
    from tests.trainers import make_trainer

    trainer = make_trainer(mixtral_identical, tmp_path / "run", steps=1)
    trainer.train()
    trainer.save_model()
    out, summary = collapse_identical(tmp_path / "run", tmp_path / "dense")
    assert "LlamaForCausalLM" in summary
    torch.testing.assert_close(_logits(out, _ids())[1], _logits(mixtral_identical, _ids())[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fixture, message",
    [
        ("mixtral_legacy", r"experts differ in MoE layer\(s\) \[0, 1\]"),
        ("qwen3_identical", "does not renormalise its top-k weights"),
        ("qwen2_moe", "shared expert"),
        ("olmoe", "OLMoE MoE cannot be collapsed"),
    ],
)
def test_collapse_refusals(fixture, message, request, tmp_path):
    with pytest.raises(RouterTuneError, match=message):
        collapse_identical(request.getfixturevalue(fixture), tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def test_collapse_refuses_other_export_options(mixtral_identical, tmp_path, capsys):
    args = ["export", str(mixtral_identical), "--collapse-identical", "--out", str(tmp_path / "d"), "--layout", "fused"]
    assert cli_main(args) == 1
    assert "takes no --format, --layout or --source" in capsys.readouterr().err
