"""Prove an export is the trained model, with O(chunk) memory and no second model load.

A full export is checked in three parts, each enough to fail on its own fault:
  tensors   one streaming pass over the export's shards (`check_tensors`): every non-router
            tensor is byte-identical to the source's (same name, dtype, shape, shard and shard
            metadata), compared range by range with no tensor in memory; every router equals
            the trained one in the stored dtype; for a layout conversion, the re-arranged
            experts have the trained routers' expert fingerprints.
  loading   transformers loads the export on the meta device (`check_loads`): its own key
            renaming, layout conversion and shape checks map every tensor to a parameter of
            the model that config.json describes, with none missing, unexpected or mismatched.
  files     config.json is the source's except `output_router_logits` (False); every other
            side file is byte-identical (`check_side_files`).
Together they make the export's logits the trained model's by construction: the reference
model (source + trained routers in the stored dtype) would be loaded from these very bytes,
names and config. Comparing logits therefore needs no second model; PEFT adapters, which are
made from the loaded trained model anyway, still compare logits (`Reference`).
"""

from __future__ import annotations

import contextlib
import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from router_tune.architectures import architecture_named
from router_tune.architectures.on_disk import FUSED_EXPERT, LEGACY_EXPERT, disk_name, param_name
from router_tune.errors import RouterTuneError
from router_tune.export.splice import SpliceResult
from router_tune.io import checkpoint
from router_tune.io.router_files import TrainedRouters, check_fingerprints
from router_tune.io.shards import TORCH_DTYPES, StoredTensor, read_header, read_segment, same_bytes
from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
from router_tune.model.fingerprints import checkpoint_fingerprints
from router_tune.model.loading import hub_kernels, load_moe
from router_tune.model.routers import load_router_state_dict, router_param_names

# Max |logit difference| accepted. The export holds the same weights as the reference, so the
# only differences come from kernels summing in another order; they scale with the dtype's
# epsilon (fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3) times logit magnitude and depth.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}
INPUT_SHAPE = (2, 24)


@dataclass
class Reference:
    """What the trained model computes, kept after the model itself is freed (PEFT adapters)."""

    logits: torch.Tensor
    dtype: torch.dtype


def fixed_input(vocab_size: int) -> torch.Tensor:
    """The same token ids on every run and machine (skipping the first ids, often special tokens)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(min(3, vocab_size - 1), vocab_size, INPUT_SHAPE, generator=gen)


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    return model(fixed_input(model.config.vocab_size)).logits.float()


@contextlib.contextmanager
def trained_model(source_dir: Path, routers: dict[str, torch.Tensor]):
    """The source, in its stored dtype, with the trained routers loaded (one model in memory)."""
    model, _ = load_moe(source_dir, fp32_routers=False)
    try:
        model.eval()
        load_router_state_dict(model, routers)
        yield model
    finally:
        del model
        gc.collect()


def build_reference(source_dir: Path, routers: dict[str, torch.Tensor], on_model=None) -> Reference:
    """Capture the trained model's reference, run `on_model(model)` on it if given, and free it
    before returning (so the export can be loaded next without two models in memory)."""
    with trained_model(source_dir, routers) as model:
        ref = capture_reference(model)
        if on_model is not None:
            on_model(model)
        del model  # the with-target would keep the model alive until the caller returns
    gc.collect()
    return ref


def check_source(source_dir: Path, trained: TrainedRouters) -> None:
    """Refuse, before anything is read into memory or written, routers that are not exactly the
    routers of `source_dir` (names and shapes, from its config alone) or were trained on other experts
    (fingerprints from its safetensors bytes). Runs whatever the verify setting."""
    names = router_shapes(source_dir)
    got = {n: tuple(t.shape) for n, t in trained.tensors.items()}
    if got != names:
        unexpected, missing = sorted(set(got) - set(names)), sorted(set(names) - set(got))
        wrong = sorted(n for n in set(got) & set(names) if got[n] != names[n])
        raise RouterTuneError(
            f"{trained.path} does not hold exactly the routers of {source_dir} (not routers there: {unexpected[:4]}; "
            f"missing: {missing[:4]}; other shapes: {wrong[:4]}). Only router tensors are ever spliced in: export "
            "routers trained on this very model."
        )
    if trained.meta.get("fingerprint_format") != FINGERPRINT_FORMAT:
        raise RouterTuneError(
            f"{trained.path} records no expert fingerprints of format {FINGERPRINT_FORMAT} (written by an older "
            "router_tune or by hand), so router_tune cannot check that these routers belong to this source. "
            "Export them again from the training run with this version."
        )
    check_fingerprints(
        trained.meta.get("fingerprints"), checkpoint_fingerprints(source_dir), str(source_dir), str(trained.path)
    )


def router_shapes(source_dir: Path) -> dict[str, tuple[int, ...]]:
    """Router parameter names and shapes of a checkpoint, from its config on the meta device (no weights)."""
    config = AutoConfig.from_pretrained(source_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(model.get_parameter(n).shape) for n in router_param_names(model)}


def capture_reference(model) -> Reference:
    names = set(router_param_names(model))
    dtype = next(p.dtype for n, p in model.named_parameters() if n not in names)
    return Reference(logits=logits_of(model), dtype=dtype)


def check_logits(logits: torch.Tensor, ref: Reference, what: str) -> float:
    diff = (logits - ref.logits).abs().max().item()
    if not diff <= TOLERANCE.get(ref.dtype, 5e-2):
        raise RouterTuneError(
            f"{what} computes different logits than the trained model (max |diff| {diff:.3g}, "
            f"tolerance {TOLERANCE.get(ref.dtype)} for {ref.dtype}); nothing was written."
        )
    return diff


def check_export(source_dir: Path, out_dir: Path, trained: TrainedRouters, result: SpliceResult) -> None:
    """All checks of a full export (see the module docstring). Raises RouterTuneError on the first fault."""
    check_tensors(source_dir, out_dir, trained, result)
    check_side_files(source_dir, out_dir, result.side_files)
    check_loads(out_dir)


def check_tensors(source_dir: Path, out_dir: Path, trained: TrainedRouters, result: SpliceResult) -> int:
    """Compare the export's tensors with the source's and the trained routers, streaming; returns the count checked.

    The export's headers are parsed afresh (io.shards.read_header checks every range against the
    file) and its bytes compared with the source's by name, not through the splice's plan, so a
    writer or plan that put the wrong bytes under a name fails here.
    """
    naming = architecture_named(result.architecture).legacy_naming
    src_meta, src = _tensors(source_dir)
    out_meta, out = _tensors(out_dir)
    index = out_dir / checkpoint.SAFETENSORS_INDEX
    if index.is_file() and json.loads(index.read_text())["weight_map"] != {n: t.file.name for n, t in out.items()}:
        raise RouterTuneError(f"{index.name} of the export does not list its tensors; nothing was written.")
    routers = {disk_name(p, naming, result.layout): p for p in trained.tensors}
    same_layout = result.layout == result.source_layout
    if same_layout and (
        src_meta != out_meta or {n: t.file.name for n, t in src.items()} != {n: t.file.name for n, t in out.items()}
    ):
        raise RouterTuneError(
            f"the export's shards hold other tensors or metadata than the source's ({_difference(src, out)}); "
            "nothing was written."
        )
    # source tensors by in-memory name: the same key for either layout of a non-expert tensor
    src_by_param = {param_name(n, naming): t for n, t in src.items() if not _is_expert(n)}
    out_by_param = {param_name(n, naming): t for n, t in out.items() if not _is_expert(n)}
    if set(src_by_param) != set(out_by_param):
        raise RouterTuneError(
            f"the export's non-expert tensors differ from the source's ({_difference(src_by_param, out_by_param)}); "
            "nothing was written."
        )
    checked = 0
    for name, t in out.items():
        if name in routers:
            _check_router(t, trained.tensors[routers[name]], src_by_param[routers[name]])
        elif _is_expert(name) and not same_layout:
            continue  # re-arranged bytes: proven below by their expert fingerprints
        else:
            want = src[name] if same_layout else src_by_param[param_name(name, naming)]
            if (want.dtype, want.shape) != (t.dtype, t.shape) or not same_bytes(want.segment(), t.segment()):
                raise RouterTuneError(f"tensor {name} of the export differs from the source; nothing was written.")
        checked += 1
    if not same_layout and checkpoint_fingerprints(out_dir) != trained.meta.get("fingerprints"):
        raise RouterTuneError(
            f"the {result.layout} experts of the export are not the source's experts re-arranged (their "
            "fingerprints differ from the trained routers'); nothing was written. Please report this."
        )
    return checked


def _tensors(root: Path) -> tuple[dict[str, dict[str, str]], dict[str, StoredTensor]]:
    metadata, tensors = {}, {}
    for f in checkpoint.weight_files(root):
        metadata[f.name], stored = read_header(f)
        tensors.update(stored)
    return metadata, tensors


def _is_expert(name: str) -> bool:
    return bool(LEGACY_EXPERT.match(name) or FUSED_EXPERT.match(name))


def _difference(a: dict, b: dict) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return f"only in the source: {only_a[:3]}, only in the export: {only_b[:3]}"


def _check_router(stored: StoredTensor, value: torch.Tensor, source: StoredTensor) -> None:
    """The stored router is the trained one cast to the source's dtype, in the source's shape."""
    dtype = TORCH_DTYPES.get(source.dtype)
    want = None if dtype is None else value.detach().cpu().to(dtype).contiguous().reshape(-1).view(torch.uint8)
    if (
        want is None
        or (stored.dtype, stored.shape) != (source.dtype, source.shape)
        or read_segment(stored.segment()) != want.numpy().tobytes()
    ):
        raise RouterTuneError(f"router {stored.name} in the export differs from the trained one; nothing was written.")


def check_side_files(source_dir: Path, out_dir: Path, side_files: list[str]) -> None:
    """config.json: the source's with `output_router_logits` False; every other copied file byte-identical."""
    for name in side_files:
        src, out = source_dir / name, out_dir / name
        if name == "config.json":
            want = {**json.loads(src.read_text()), "output_router_logits": False}
            try:
                same = json.loads(out.read_text()) == want
            except (OSError, json.JSONDecodeError):
                same = False
        else:
            same = out.is_file() and out.read_bytes() == src.read_bytes()
        if not same:
            raise RouterTuneError(f"{name} of the export differs from the source's; nothing was written.")


def check_loads(out_dir: Path) -> None:
    """transformers loads the export on the meta device (names, layout conversion, shapes; no weight data)
    with no missing, unexpected or mismatched keys."""
    try:
        # hub kernels off: `kernelize` refuses the meta device, and what is checked here is the files
        model, info = AutoModelForCausalLM.from_pretrained(
            out_dir, device_map="meta", output_loading_info=True, **hub_kernels(False)
        )
    except Exception as err:  # any failure of the loader means users cannot load the export
        raise RouterTuneError(
            f"transformers cannot load the export ({type(err).__name__}: {err}); nothing was written."
        ) from err
    del model
    problems = {k: sorted(v)[:4] if isinstance(v, set) else v[:4] for k, v in info.items() if v}
    if problems:
        raise RouterTuneError(
            f"the export does not load cleanly in transformers: {problems}. Nothing was written; "
            "please report this with the source model's config.json."
        )
