"""`router-tune inspect`: report contents, findings, bad inputs, and a real mergekit-moe merge."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from router_tune.cli import main
from tests import factories


def inspect_json(capsys, *args) -> dict:
    capsys.readouterr()  # what building a fixture printed in this test (DeepSpeed's first import logs to stdout)
    assert main(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fail(capsys, *args) -> str:
    """Run the CLI on a bad input: exit status 1, one plain message, no traceback."""
    assert main(["inspect", *map(str, args)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "router-tune inspect: error:" in err
    return err


def tensor_elements(model_dir: Path) -> int:
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def digest_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fixture, layout", [("mixtral_legacy", "legacy"), ("mixtral_fused", "fused")])
def test_json_counts_both_layouts(request, capsys, fixture, layout):
    path = request.getfixturevalue(fixture)
    before = digest_dir(path)
    report = inspect_json(capsys, path)
    assert digest_dir(path) == before  # inspect never writes to the checkpoint
    m, p = report["model"], report["parameters"]
    assert (m["architecture"], m["layout"], m["num_experts"], m["top_k"], m["moe_layers"]) == (
        "mixtral",
        layout,
        4,
        2,
        [0, 1],
    )
    assert p["trainable"] == 2 * 4 * 32  # two [E=4, H=32] gates
    assert p["total"] == tensor_elements(path)
    assert report["findings"] == ["no problems found"]
    assert [ly["layer"] for ly in report["layers"]] == [0, 1]
    for ly in report["layers"]:
        # near-uniform gates (std 0.02): H(tok) close to ln 4 nats, the unit train and eval report
        assert len(ly["load"]) == 4 and abs(sum(ly["load"]) - 1) < 1e-3 and 1.3 < ly["entropy"] <= math.log(4)
    mem = report["memory"]
    assert mem["gradients_bytes"] == 4 * 256 and mem["adam_bytes"] == 8 * 256
    assert mem["total_bytes"] == sum(
        mem[k] for k in ("weights_bytes", "gradients_bytes", "adam_bytes", "activations_bytes")
    )


def test_qwen2_counts_include_shared_expert_gate(capsys, qwen2_moe):
    report = inspect_json(capsys, qwen2_moe)
    assert report["parameters"]["trainable"] == 2 * (4 * 32 + 32)


def test_findings(capsys, mixtral_identical, mixtral_saturated, mixtral_copied_gates, qwen3_identical):
    identical = inspect_json(capsys, mixtral_identical)
    assert [ly["identical_experts"] for ly in identical["layers"]] == [[[0, 1, 2, 3]]] * 2
    assert (
        "all 4 experts of every layer are identical: router training cannot change this model's outputs, "
        "only its load balance"
    ) in identical["findings"]

    qwen3 = inspect_json(capsys, qwen3_identical)["findings"][0]
    assert "does not renormalise" in qwen3 and "norm_topk_prob=False" in qwen3
    assert "cannot change this model's outputs" not in qwen3

    saturated = inspect_json(capsys, mixtral_saturated)
    assert all(ly["top1_prob"] > 0.9 for ly in saturated["layers"])
    assert any(
        f.startswith("routers of layers 0, 1 are saturated") and "mergekit `random`" in f for f in saturated["findings"]
    )

    copied = inspect_json(capsys, mixtral_copied_gates)
    assert copied["copied_gates"] == [[0, 1]]
    assert any("gates of all layers are identical (mergekit cheap_embed)" in f for f in copied["findings"])


def test_table_and_sample_text(capsys, tmp_path, mixtral_legacy):
    sample = tmp_path / "sample.txt"
    sample.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["inspect", str(mixtral_legacy), "--sample-text", str(sample), "--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"Sample text   {sample} (64 tokens)" in out
    assert "MixtralForCausalLM (mixtral), legacy layout, float32" in out
    assert "256 trainable with routers only" in out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    rows = [line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2 and all(len(r.split()) >= 10 for r in rows)
    for column in ("top-1 prob", "H(tok)", "load per expert"):  # every value starts under its header
        start = header.index(column)
        assert all(r[start - 1] == " " and r[start] != " " for r in rows), column
    assert "no problems found" in out
    assert "does not exist" in fail(capsys, mixtral_legacy, "--sample-text", tmp_path / "nope.txt")


def test_bad_inputs(capsys, copy_of, tmp_path, mixtral_legacy, dense_llama):
    assert "does not exist" in fail(capsys, tmp_path / "no" / "such" / "model")
    hub = fail(capsys, "nobody-xyz/not-a-model")
    assert "not a local directory and could not be downloaded" in hub

    (tmp_path / "empty").mkdir()
    assert "has no config.json" in fail(capsys, tmp_path / "empty")

    assert (
        "this is a dense LlamaForCausalLM; router_tune needs a MoE checkpoint: Mixtral, Qwen2-MoE, Qwen3-MoE"
        in fail(capsys, dense_llama)
    )

    phimoe = copy_of(mixtral_legacy)  # a MoE architecture transformers knows and router_tune does not
    cfg = json.loads((phimoe / "config.json").read_text())
    cfg.update(model_type="phimoe", architectures=["PhimoeForCausalLM"])
    (phimoe / "config.json").write_text(json.dumps(cfg))
    err = fail(capsys, phimoe)
    assert "PhimoeForCausalLM" in err and "supported: Mixtral, Qwen2-MoE, Qwen3-MoE" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(mixtral_legacy, truncated)
    shard = factories.truncate_weights(truncated)
    err = fail(capsys, truncated)
    assert f"{shard} is truncated or corrupt" in err


def test_unsafe_inputs(capsys, tmp_path, mixtral_legacy, qwen3_moe):
    pickled = tmp_path / "pickled"
    shutil.copytree(mixtral_legacy, pickled)
    factories.to_pickle_only(pickled)
    err = fail(capsys, pickled)
    assert "pytorch_model.bin" in err and "Unpickling can execute arbitrary code" in err and "--allow-pickle" in err
    report = inspect_json(capsys, pickled, "--allow-pickle")
    assert report["model"]["layout"] == "legacy" and report["parameters"]["trainable"] == 256

    remote = tmp_path / "remote"
    shutil.copytree(mixtral_legacy, remote)
    factories.with_remote_code(remote)
    err = fail(capsys, remote)
    assert "auto_map" in err and "--trust-remote-code" in err

    escaping = tmp_path / "escaping"
    shutil.copytree(qwen3_moe, escaping)
    index = escaping / "model.safetensors.index.json"
    outside = tmp_path / "outside.safetensors"
    shutil.copy(escaping / "model.safetensors", outside)
    for shard_name in ("../outside.safetensors", str(outside)):
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard_name}}))
        assert "outside the checkpoint directory" in fail(capsys, escaping)
    (escaping / "model-00001.safetensors").symlink_to(outside)
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001.safetensors"}}))
    assert "is a symlink to" in fail(capsys, escaping)


def test_real_mergekit_frankenmoe(capsys, tmp_path):
    """Two dense Llama fine-tune stand-ins merged by mergekit-moe, as users build frankenMoEs."""
    for seed in (1, 2):
        factories.dense_llama(tmp_path / f"expert{seed}", seed=seed)
    (tmp_path / "moe.yml").write_text(
        f"base_model: {tmp_path / 'expert1'}\ngate_mode: cheap_embed\ndtype: float32\nexperts_per_token: 2\n"
        f"experts:\n  - source_model: {tmp_path / 'expert1'}\n    positive_prompts: ['def return import']\n"
        f"  - source_model: {tmp_path / 'expert2'}\n    positive_prompts: ['once upon a time']\n"
    )
    binary = Path(sys.executable).with_name("mergekit-moe")
    subprocess.run(
        [
            str(binary),
            str(tmp_path / "moe.yml"),
            str(tmp_path / "merged"),
            "--device",
            "cpu",
            "--lazy-unpickle",
            "--random-seed",
            "42",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    report = inspect_json(capsys, tmp_path / "merged")
    m = report["model"]
    assert (m["model_class"], m["layout"], m["num_experts"], m["top_k"]) == ("MixtralForCausalLM", "fused", 2, 2)
    assert report["copied_gates"] == [[0, 1]]
    assert any("mergekit cheap_embed" in f for f in report["findings"])
    assert [ly["identical_experts"] for ly in report["layers"]] == [[], []]  # different seeds, different MLPs
