"""export / apply: every property is checked here independently of router_tune's own verification:
safetensors re-read and compared byte by byte, models reloaded with plain transformers / peft."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from router_tune.cli import main as cli_main
from router_tune.errors import RouterTuneError
from router_tune.export import splice
from router_tune.export.apply import apply_routers
from router_tune.export.exporter import export_run
from router_tune.model.fingerprints import expert_fingerprints
from tests import factories
from tests.run_dirs import file_hashes, make_run, no_leftovers, router_disk

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 300, 19]])


def trained_logits(source: Path, routers: dict) -> torch.Tensor:
    """The trained model, built with plain transformers: source + routers cast to the stored dtype."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, value in routers.items():
            p = model.get_parameter(name)
            p.copy_(value.to(p.dtype))
        return model(IDS).logits.float()


def load_clean(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    return model


def tensors_bytes(root: Path) -> dict[str, tuple[str, tuple, str, str]]:
    """name -> (dtype, shape, sha256 of bytes, shard), read with the safetensors library."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                digest = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
                out[k] = (str(t.dtype), tuple(t.shape), digest, f.name)
    return out


def shard_metadata(root: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out[f.name] = st.metadata()
    return out


@pytest.fixture
def sharded_mixtral(tmp_path):
    """The legacy Mixtral fixture re-saved in several shards with an index (and a chat template)."""
    model = AutoModelForCausalLM.from_pretrained(factories.mixtral(tmp_path / "base"))
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="60KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "base" / f, out / f)
    (out / "chat_template.jinja").write_text("{{ messages }}")
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize(
    "fixture", ["mixtral_legacy", "mixtral_fused", "qwen2_moe", "mixtral_bf16", "mixtral_tied", "olmoe"]
)
def test_full_export_same_layout(fixture, request, tmp_path):
    source = request.getfixturevalue(fixture)
    before = file_hashes(source)
    run, routers = make_run(source, tmp_path)
    out = export_run(run, tmp_path / "out")

    model = load_clean(out)
    tol = 1e-5 if model.dtype == torch.float32 else 1e-2
    assert (model(IDS).logits.float() - trained_logits(source, routers)).abs().max() <= tol
    legacy_mixtral = fixture in ("mixtral_legacy", "mixtral_bf16", "mixtral_tied")
    src, dst = tensors_bytes(source), tensors_bytes(out)
    if fixture == "mixtral_tied":  # the head stays the embedding: no lm_head tensor written
        assert "lm_head.weight" not in dst and model.lm_head.weight is model.model.embed_tokens.weight
    router_names = {router_disk(n, legacy_mixtral) for n in routers}
    assert set(src) == set(dst) and router_names <= set(src)
    for name in set(src) - router_names:  # dtype, shape, bytes and shard of every non-router tensor
        assert src[name] == dst[name], name
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as st:
        for name, value in routers.items():
            stored = st.get_tensor(router_disk(name, legacy_mixtral))
            assert stored.dtype == model.dtype and torch.equal(stored, value.to(model.dtype))
    assert shard_metadata(out) == shard_metadata(source) == {"model.safetensors": {"format": "pt"}}
    config = json.loads((out / "config.json").read_text())
    assert config["output_router_logits"] is False
    assert {k: v for k, v in config.items() if k != "output_router_logits"} == {
        k: v for k, v in json.loads((source / "config.json").read_text()).items() if k != "output_router_logits"
    }
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (source / f).read_bytes()
    card = (out / "README.md").read_text()
    assert "Training steps: 7" in card and "corpus.txt" in card and "max_steps: 7" in card
    assert file_hashes(source) == before and not list(tmp_path.glob(".out.*"))


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize(
    "fixture,legacy_names",
    [
        ("mixtral_fused", ("block_sparse_moe", "w1", "w3", "w2")),
        ("qwen3_moe", ("mlp", "gate_proj", "up_proj", "down_proj")),
        ("olmoe", ("mlp", "gate_proj", "up_proj", "down_proj")),
    ],
)
def test_fused_to_legacy_and_back_is_exact(fixture, legacy_names, request, tmp_path):
    source = request.getfixturevalue(fixture)
    if fixture != "mixtral_fused":  # the Qwen and OLMoE fixtures are stored legacy: make a fused copy first
        fused = tmp_path / "fused-src"
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(fused, save_original_format=False)
        shutil.copy(source / "tokenizer.json", fused)
        source = fused
    run, routers = make_run(source, tmp_path)
    legacy = export_run(run, tmp_path / "legacy", layout="legacy")
    block, gate, up, down = legacy_names
    src, out = tensors_bytes(source), tensors_bytes(legacy)
    assert not any(".experts.gate_up_proj" in k or ".experts.down_proj" in k for k in out)
    with (
        safe_open(str(source / "model.safetensors"), "pt") as s,
        safe_open(str(legacy / "model.safetensors"), "pt") as o,
    ):
        for layer in range(factories.LAYERS):
            pre = f"model.layers.{layer}"
            refused_gate_up = torch.stack(
                [
                    torch.cat(
                        [
                            o.get_tensor(f"{pre}.{block}.experts.{e}.{gate}.weight"),
                            o.get_tensor(f"{pre}.{block}.experts.{e}.{up}.weight"),
                        ]
                    )
                    for e in range(factories.EXPERTS)
                ]
            )
            assert_same_bytes(refused_gate_up, s.get_tensor(f"{pre}.mlp.experts.gate_up_proj"))
            refused_down = torch.stack(
                [o.get_tensor(f"{pre}.{block}.experts.{e}.{down}.weight") for e in range(factories.EXPERTS)]
            )
            assert_same_bytes(refused_down, s.get_tensor(f"{pre}.mlp.experts.down_proj"))
    non_expert = [k for k in src if ".experts." not in k and not k.endswith("mlp.gate.weight")]
    assert all(src[k][:3] == out[router_disk(k, block != "mlp")][:3] for k in non_expert)
    expected = trained_logits(source, routers)
    assert (load_clean(legacy)(IDS).logits - expected).abs().max() <= 1e-5
    # and back: the fused export of the legacy export is the original checkpoint, byte for byte
    run2 = tmp_path / "run2"
    shutil.copytree(run, run2)
    meta = json.loads((run2 / "router_tune.json").read_text())
    (run2 / "router_tune.json").write_text(json.dumps({**meta, "source_dir": str(legacy), "source_model": str(legacy)}))
    back = export_run(run2, tmp_path / "back", layout="fused")
    again = tensors_bytes(back)
    assert set(again) == set(src) and all(again[k][:3] == src[k][:3] for k in src if k not in routers)
    assert (load_clean(back)(IDS).logits - expected).abs().max() <= 1e-5


def test_legacy_to_fused_qwen2(qwen2_moe, tmp_path):
    run, routers = make_run(qwen2_moe, tmp_path)
    out = export_run(run, tmp_path / "fused", layout="fused")
    names = tensors_bytes(out)
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.shared_expert_gate.weight"} <= set(names)
    assert not any(".experts.0." in k for k in names)
    with (
        safe_open(str(qwen2_moe / "model.safetensors"), "pt") as s,
        safe_open(str(out / "model.safetensors"), "pt") as o,
    ):
        gate_up = torch.stack(
            [
                torch.cat(
                    [
                        s.get_tensor(f"model.layers.1.mlp.experts.{e}.gate_proj.weight"),
                        s.get_tensor(f"model.layers.1.mlp.experts.{e}.up_proj.weight"),
                    ]
                )
                for e in range(factories.EXPERTS)
            ]
        )
        assert_same_bytes(o.get_tensor("model.layers.1.mlp.experts.gate_up_proj"), gate_up)
        assert torch.equal(
            o.get_tensor("model.layers.1.mlp.shared_expert_gate.weight"),
            routers["model.layers.1.mlp.shared_expert_gate.weight"],
        )
    assert (load_clean(out)(IDS).logits - trained_logits(qwen2_moe, routers)).abs().max() <= 1e-5


def test_sharded_export_keeps_shards_and_index(sharded_mixtral, tmp_path):
    run, routers = make_run(sharded_mixtral, tmp_path)
    out = export_run(run, tmp_path / "out")
    src_index = json.loads((sharded_mixtral / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    assert out_index["metadata"]["total_size"] == src_index["metadata"]["total_size"]
    src, dst = tensors_bytes(sharded_mixtral), tensors_bytes(out)
    changed = {k for k in src if src[k] != dst[k]}
    assert changed == {router_disk(n, True) for n in routers}
    assert shard_metadata(out) == shard_metadata(sharded_mixtral)
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (load_clean(out)(IDS).logits - trained_logits(sharded_mixtral, routers)).abs().max() <= 1e-5


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(error, sharded_mixtral, tmp_path, monkeypatch):
    run, _ = make_run(sharded_mixtral, tmp_path)
    before = file_hashes(sharded_mixtral)
    real, calls = splice.write_shard, []

    def failing(path, tensors, metadata):
        if calls:
            raise error
        calls.append(path)
        return real(path, tensors, metadata)

    monkeypatch.setattr(splice, "write_shard", failing)
    out = tmp_path / "out"
    with pytest.raises(type(error)):
        export_run(run, out, verify=False)
    assert calls and calls[0].parent.name.startswith(".out.tmp-")  # it did write a first shard
    assert no_leftovers(out) and file_hashes(sharded_mixtral) == before


def test_force_semantics(mixtral_legacy, tmp_path, monkeypatch):
    run, routers = make_run(mixtral_legacy, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RouterTuneError, match="already exists"):
        export_run(run, out)
    assert (out / "keep.txt").read_text() == "old"
    monkeypatch.setattr(splice, "write_shard", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export_run(run, out, force=True)
    assert (out / "keep.txt").read_text() == "old" and len(list(tmp_path.glob(".out.*"))) == 0
    monkeypatch.undo()
    export_run(run, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert len(list(tmp_path.glob(".out.*"))) == 0


def test_output_overlapping_source_refused(copy_of, mixtral_legacy, tmp_path):
    source = copy_of(mixtral_legacy)
    run, _ = make_run(source, tmp_path)
    before = file_hashes(source)
    for out in (source / "exported", source, source.parent):
        with pytest.raises(RouterTuneError, match="overlaps the source"):
            export_run(run, out, force=True)
    assert file_hashes(source) == before


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/evil.safetensors", "link.safetensors"])
def test_index_escaping_the_source_refused(bad, sharded_mixtral, tmp_path):
    run, _ = make_run(sharded_mixtral, tmp_path)
    outside = tmp_path / "evil.safetensors"
    shutil.copy(next(sharded_mixtral.glob("*.safetensors")), outside)
    if bad == "link.safetensors":
        (sharded_mixtral / bad).symlink_to(outside)
    index_path = sharded_mixtral / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = bad
    index_path.write_text(json.dumps(index))
    with pytest.raises(RouterTuneError, match="outside the checkpoint"):
        export_run(run, tmp_path / "out", verify=False)
    assert no_leftovers(tmp_path / "out")


def test_routers_delta_and_apply_roundtrip(mixtral_legacy, tmp_path):
    run, routers = make_run(mixtral_legacy, tmp_path)
    delta = export_run(run, tmp_path / "delta", fmt="routers")
    assert sorted(p.name for p in delta.iterdir()) == ["README.md", "router_tune.json", "routers.safetensors"]
    with safe_open(str(delta / "routers.safetensors"), "pt") as st:
        meta = st.metadata()
        assert set(st.keys()) == set(routers)
        for k in routers:
            assert st.get_tensor(k).dtype == torch.float32 and torch.equal(st.get_tensor(k), routers[k])
    fingerprints = json.loads(meta["fingerprints"])
    assert meta["format"] == "router_tune.routers" and meta["architecture"] == "mixtral"
    assert fingerprints == expert_fingerprints(AutoModelForCausalLM.from_pretrained(mixtral_legacy))
    full = export_run(run, tmp_path / "full")
    for routers_arg in (delta, delta / "routers.safetensors"):  # the directory, or the file alone
        applied = apply_routers(mixtral_legacy, routers_arg, tmp_path / "applied", force=True)
        for f in ("model.safetensors", "config.json", "tokenizer.json"):
            assert (applied / f).read_bytes() == (full / f).read_bytes()


def test_apply_refuses_routers_of_another_model(mixtral_legacy, tmp_path):
    run, _ = make_run(mixtral_legacy, tmp_path)
    delta = export_run(run, tmp_path / "delta", fmt="routers")
    other = factories.mixtral(tmp_path / "other", seed=1)  # same shapes, other experts
    for verify in (True, False):
        with pytest.raises(RouterTuneError, match="trained for a different model"):
            apply_routers(other, delta, tmp_path / "applied", verify=verify)
        assert no_leftovers(tmp_path / "applied")


def test_export_refuses_a_changed_source(copy_of, mixtral_legacy, tmp_path):
    source = copy_of(mixtral_legacy)
    run, _ = make_run(source, tmp_path)
    factories.mixtral(source, seed=3)  # the source was re-created since training
    for verify in (True, False):
        with pytest.raises(RouterTuneError, match="trained for a different model"):
            export_run(run, tmp_path / "out", verify=verify)
        assert no_leftovers(tmp_path / "out")


def test_only_router_tensors_are_ever_spliced_in(mixtral_legacy, tmp_path):
    """A delta that also names a non-router parameter, in that parameter's own shape, is refused with
    or without --no-verify (before, the splice wrote any tensor of the source whose shape matched)."""
    run, _ = make_run(mixtral_legacy, tmp_path)
    impostor = "model.norm.weight"
    tensors = load_file(run / "routers.safetensors")
    tensors[impostor] = torch.zeros(32)
    save_file(tensors, str(run / "routers.safetensors"), metadata={"format": "router_tune.routers"})
    for verify in (True, False):
        with pytest.raises(RouterTuneError, match=f"not routers there: \\['{impostor}'\\]"):
            export_run(run, tmp_path / "out", verify=verify)
        assert no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "qwen2_moe", "mixtral_bf16", "mixtral_tied"])
def test_peft_adapter_reproduces_trained_logits(fixture, request, tmp_path):
    from peft import PeftModel

    source = request.getfixturevalue(fixture)
    run, routers = make_run(source, tmp_path)
    adapter = export_run(run, tmp_path / "adapter", fmt="peft")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as st:
        keys = list(st.keys())
        lora = [st.get_tensor(k) for k in keys if ".lora_" in k]
    assert len(keys) == len(routers) + 2 and all(not t.any() for t in lora)  # routers + one inert LoRA pair
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), str(adapter))
    expected = trained_logits(source, routers)
    assert torch.equal(model(IDS).logits.float(), expected)
    assert torch.equal(model.merge_and_unload()(IDS).logits.float(), expected)


def test_model_card_names_the_source_and_shows_the_recipe_that_matters(mixtral_legacy, tmp_path, monkeypatch):
    """Trained from relative paths into `exp`: the card is titled after the source model, names source and
    data by absolute path, shows router_tune's keys and the changed TrainingArguments only (not ~170
    fields), and says how many held-out blocks the evaluation table stands on."""
    from router_tune.training.config import load_recipe
    from router_tune.training.recipe_keys import own_fields

    monkeypatch.chdir(tmp_path)
    (tmp_path / "src-model").symlink_to(mixtral_legacy)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "code.jsonl").write_text('{"text": "def f(): pass"}\n')
    config = load_recipe(
        None,
        model_name_or_path="src-model",
        datasets=[{"source": "redpajama", "name": "code", "path": "data/code.jsonl", "weight": 1.0}],
        output_dir="exp",
        max_steps=7,
        block_size=64,
        use_cpu=True,
    )
    recipe = config.public_dict()
    assert len(recipe) > 140  # what the run file keeps
    report = {
        "global_step": 7,
        "before": {"perplexity": {"code": 30.0, "overall": 30.0}, "blocks": {"code": 3}, "tokens": {"code": 189}},
        "after": {"perplexity": {"code": 24.0, "overall": 24.0}, "blocks": {"code": 3}, "tokens": {"code": 189}},
    }
    run, _ = make_run(Path("src-model"), tmp_path, report=report, recipe=recipe)
    card = (export_run(run, "exp") / "README.md").read_text()
    assert card.split("---\n", 2)[2].lstrip().startswith("# src-model with trained routers\n")
    assert "# exp" not in card and "# run" not in card
    assert f"`{tmp_path / 'src-model'}` with its routers" in card
    assert f"- redpajama (code): `{tmp_path / 'data' / 'code.jsonl'}`" in card
    assert "Measured on 3 held-out blocks of 64 tokens, never trained on: code 3 blocks (189 target tokens)." in card
    shown = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    ours = {f.name for f in own_fields()}
    assert {"router_aux_loss_coef", "block_size", "routing_log_every", "datasets"} <= set(shown)
    # the TrainingArguments this run changed (use_cpu turns pinning off)
    assert set(shown) - ours == {"max_steps", "use_cpu", "dataloader_pin_memory"}
    assert "output_dir" not in shown and "hub_strategy" not in shown  # not the ~100 other TrainingArguments
    assert shown["model_name_or_path"] == str(tmp_path / "src-model")
    assert shown["datasets"][0]["path"] == str(tmp_path / "data" / "code.jsonl")
    assert 'from_pretrained("exp")' in card  # the usage snippets load the export itself


def test_checkpoint_dir_cli_and_model_card(mixtral_legacy, tmp_path, capsys):
    report = {
        "global_step": 7,
        "before": {"perplexity": {"overall": 20.0, "code": 30.0}, "balance": 0.5, "tokens": {"overall": 999}},
        "after": {"perplexity": {"overall": 15.0, "code": 24.0}, "balance": 0.9, "tokens": {"overall": 999}},
    }
    run, routers = make_run(mixtral_legacy, tmp_path, report=report)
    assert cli_main(["export", str(run / "checkpoint-3"), "--out", str(tmp_path / "ckpt"), "--no-verify"]) == 0
    assert "not verified (--no-verify)" in capsys.readouterr().out
    expected = trained_logits(mixtral_legacy, {n: t * 0.5 for n, t in routers.items()})
    assert (load_clean(tmp_path / "ckpt")(IDS).logits - expected).abs().max() <= 1e-5
    assert "perplexity/overall" not in (tmp_path / "ckpt" / "README.md").read_text()  # report is for step 7
    assert cli_main(["export", str(run), "--out", str(tmp_path / "final"), "--layout", "legacy"]) == 0
    out = capsys.readouterr()
    assert "verified: every non-router tensor is byte-identical to the source's" in out.out
    assert "Loading weights" not in out.err  # the meta-device load check is not a second loading of the weights
    card = (tmp_path / "final" / "README.md").read_text()
    assert "| perplexity/overall | 20 | 15 | -25.0% (better) |" in card and "| balance | 0.5 | 0.9 | +80.0% |" in card
    assert "re-arranged from the legacy layout" not in card  # legacy source, legacy export
    assert "convert_hf_to_gguf.py" in card and "tokens/overall" not in card
    assert "every non-router tensor is byte-identical to the source's" in card  # what the verification proved
    (run / "routers.safetensors").unlink()
    assert cli_main(["export", str(run), "--out", str(tmp_path / "x")]) == 1
    assert "checkpoint-3" in capsys.readouterr().err
