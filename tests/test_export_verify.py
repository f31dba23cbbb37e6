"""Each check of a verified full export catches its own fault (export.verify).

Faults are injected into what the splice writes, so the export itself is wrong and must not be
published; each test names the check that catches it. Each was seen failing with its check
disabled (same_bytes -> True, _check_router skipped, check_side_files skipped, check_loads
returning at once, the fingerprint comparison skipped), and passing with it.
"""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from router_tune.errors import RouterTuneError
from router_tune.export import layouts, splice, verify
from router_tune.export.exporter import export_run
from router_tune.io.shards import OutputTensor, Segment, read_header
from tests.run_dirs import file_hashes, make_run, no_leftovers


def _corrupting_write(real, pick):
    """write_shard, then flip the first byte of the first tensor `pick(name)` selects in that shard."""

    def write(path, tensors, metadata):
        written = real(path, tensors, metadata)
        target = next((t for t in read_header(path)[1].values() if pick(t.name)), None)
        if target is not None:
            with open(path, "r+b") as fh:
                fh.seek(target.start)
                byte = fh.read(1)
                fh.seek(target.start)
                fh.write(bytes([byte[0] ^ 0x01]))
        return written

    return write


@pytest.mark.parametrize("name", ["model.norm.weight", "experts.1.w2.weight"])
def test_corrupt_byte_of_a_non_router_tensor_is_caught(name, mixtral_legacy, tmp_path, monkeypatch):
    """check_tensors: one flipped bit of a norm or an expert weight."""
    run, _ = make_run(mixtral_legacy, tmp_path)
    monkeypatch.setattr(splice, "write_shard", _corrupting_write(splice.write_shard, lambda n: n.endswith(name)))
    with pytest.raises(RouterTuneError, match=f"tensor .*{name.replace('.', '[.]')} of the export differs"):
        export_run(run, tmp_path / "out")
    assert no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "mixtral_bf16"])
def test_wrong_router_value_is_caught(fixture, request, tmp_path, monkeypatch):
    """check_tensors: one router element changed in the stored dtype (bf16 too: no rounding hides it)."""
    run, _ = make_run(request.getfixturevalue(fixture), tmp_path)
    real = splice._router_tensor

    def off_by_one(stored, value):
        out = real(stored, value)
        data = bytearray(out.segments[0].data)
        data[-1] ^= 0x01
        return OutputTensor(out.name, out.dtype, out.shape, (Segment.literal(bytes(data)),))

    monkeypatch.setattr(splice, "_router_tensor", off_by_one)
    with pytest.raises(RouterTuneError, match="router .* differs from the trained one"):
        export_run(run, tmp_path / "out")
    assert no_leftovers(tmp_path / "out")


def test_changed_config_is_caught(mixtral_legacy, tmp_path, monkeypatch):
    """check_side_files: a config transformers loads happily but that is another model (top-1)."""
    run, _ = make_run(mixtral_legacy, tmp_path)
    real = splice.copy_side_files

    def copy(source, out, weight_names):
        copied = real(source, out, weight_names)
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 1}))
        return copied

    monkeypatch.setattr(splice, "copy_side_files", copy)
    with pytest.raises(RouterTuneError, match="config.json of the export differs"):
        export_run(run, tmp_path / "out")
    assert no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("fault", ["config", "name"])
def test_export_transformers_cannot_load_is_caught(fault, mixtral_legacy, tmp_path):
    """check_loads: a config transformers refuses for these tensors, or a tensor under a name it does not map."""
    out = tmp_path / "broken"
    shutil.copytree(mixtral_legacy, out)
    verify.check_loads(out)  # the untouched copy loads
    if fault == "config":
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "num_local_experts": config["num_local_experts"] + 1}))
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "model.safetensors")
        tensors["model.layers.0.block_sparse_moe.router.weight"] = tensors.pop(
            "model.layers.0.block_sparse_moe.gate.weight"
        )
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RouterTuneError, match="transformers cannot load the export|does not load cleanly"):
        verify.check_loads(out)


def test_wrong_layout_conversion_is_caught(mixtral_legacy, tmp_path, monkeypatch):
    """check_tensors (fingerprints): a legacy -> fused conversion that put up rows where gate rows go.
    Names, shapes and every byte count are right, so only the experts' fingerprints can tell."""
    run, _ = make_run(mixtral_legacy, tmp_path)
    real = layouts._fuse

    def swapped(layer, group, naming, shard):
        planned = real(layer, group, naming, shard)
        gate_up = planned[0].tensor
        segs = gate_up.segments
        swapped_segs = tuple(s for pair in zip(segs[1::2], segs[0::2]) for s in pair)
        return [
            layouts.PlannedTensor(
                planned[0].shard, OutputTensor(gate_up.name, gate_up.dtype, gate_up.shape, swapped_segs), None
            ),
            planned[1],
        ]

    monkeypatch.setattr(layouts, "_fuse", swapped)
    with pytest.raises(RouterTuneError, match="experts of the export are not the source's experts"):
        export_run(run, tmp_path / "out", layout="fused")
    assert no_leftovers(tmp_path / "out")


def test_verified_export_loads_no_model(mixtral_legacy, tmp_path, monkeypatch):
    """The default export never materialises a model: every from_pretrained it makes is on the meta device."""
    run, _ = make_run(mixtral_legacy, tmp_path)
    real, devices = AutoModelForCausalLM.from_pretrained, []

    def spy(*args, **kwargs):
        devices.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    export_run(run, tmp_path / "out")
    assert devices == ["meta"]


def test_splice_without_kernel_copy_is_identical(mixtral_legacy, tmp_path, monkeypatch):
    """Where os.copy_file_range is refused (other OS, old kernels across file systems), or copies
    part of a range and then fails, the read/write loop finishes the copy: the same bytes."""
    import os

    run, _ = make_run(mixtral_legacy, tmp_path)
    fast = export_run(run, tmp_path / "fast")
    real, calls = os.copy_file_range, []

    def flaky(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) % 2:
            return real(src, dst, min(count, 1000), offset_src, offset_dst)
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", flaky)
    slow = export_run(run, tmp_path / "slow")
    weights = {n: h for n, h in file_hashes(slow).items() if n != "README.md"}  # the card names its directory
    assert calls and weights == {n: h for n, h in file_hashes(fast).items() if n != "README.md"}
