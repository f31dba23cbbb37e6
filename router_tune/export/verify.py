"""Prove an export equals the trained model: reload it, compare logits, tensors and bytes.

The reference is the source checkpoint with the trained routers loaded into it, in the
source dtype: exactly the weights the export stores. It is captured (logits on a fixed
input, a hash of every other tensor) and freed before the export is loaded, so verifying
needs about one copy of the model in RAM at a time, never two.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from router_tune.errors import RouterTuneError
from router_tune.io import checkpoint
from router_tune.io.router_files import TrainedRouters, check_fingerprints
from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
from router_tune.model.fingerprints import checkpoint_fingerprints, tensor_digest
from router_tune.model.loading import load_moe
from router_tune.model.routers import load_router_state_dict, router_param_names

# Max |logit difference| accepted. The export holds the same weights as the reference, so the
# only differences come from kernels summing in another order; they scale with the dtype's
# epsilon (fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3) times logit magnitude and depth.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}
INPUT_SHAPE = (2, 24)


@dataclass
class Reference:
    """What the trained model computes, kept after the model itself is freed."""

    logits: torch.Tensor
    dtype: torch.dtype
    routers: dict[str, torch.Tensor]  # as the model stores them (source dtype)
    hashes: dict[str, str] = field(repr=False)  # every other parameter and buffer


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
    state = model.state_dict()
    return Reference(
        logits=logits_of(model),
        dtype=next(t for n, t in state.items() if n not in names).dtype,
        routers={n: state[n].detach().clone() for n in names},
        hashes={n: tensor_digest([(n, t)]) for n, t in state.items() if n not in names},
    )


def check_model_dir(out_dir: Path, ref: Reference) -> None:
    """Reload with plain transformers: no missing / unexpected keys, same tensors, same logits."""
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    try:
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise RouterTuneError(
                f"the export does not load cleanly in transformers: {problems}. Nothing was written; "
                "please report this with the source model's config.json."
            )
        state = model.state_dict()
        for name, want in ref.routers.items():
            if not torch.equal(state[name], want):
                raise RouterTuneError(f"router {name} in the export differs from the trained one; nothing was written.")
        changed = [n for n, d in ref.hashes.items() if n not in state or tensor_digest([(n, state[n])]) != d]
        if changed or set(state) - set(ref.hashes) - set(ref.routers):
            raise RouterTuneError(
                f"the export changed non-router tensors ({', '.join(changed[:4])}); nothing was "
                "written. Please report this with the source model's config.json."
            )
        check_logits(logits_of(model.eval()), ref, "the exported model")
    finally:
        del model
        gc.collect()


def check_logits(logits: torch.Tensor, ref: Reference, what: str) -> float:
    diff = (logits - ref.logits).abs().max().item()
    if not diff <= TOLERANCE.get(ref.dtype, 5e-2):
        raise RouterTuneError(
            f"{what} computes different logits than the trained model (max |diff| {diff:.3g}, "
            f"tolerance {TOLERANCE.get(ref.dtype)} for {ref.dtype}); nothing was written."
        )
    return diff


def check_bytes(source_dir: Path, out_dir: Path, skip: set[str]) -> int:
    """Same layout: every non-router tensor of the export is byte-identical to the source's,
    with the same names, dtypes, shard metadata and shard of residence. Returns the count checked."""

    def shards(root: Path) -> dict[str, Path]:
        return {f.name: f for f in checkpoint.weight_files(root)}

    src, out = shards(source_dir), shards(out_dir)
    if set(src) != set(out):
        raise RouterTuneError(f"the export has shards {sorted(out)}, the source {sorted(src)}; nothing was written.")
    checked = 0
    for name in src:
        with safe_open(str(src[name]), "pt") as a, safe_open(str(out[name]), "pt") as b:
            if a.metadata() != b.metadata() or set(a.keys()) != set(b.keys()):
                raise RouterTuneError(
                    f"shard {name} of the export has other tensors or metadata than the source; nothing was written."
                )
            for key in a.keys():
                if key in skip:
                    continue
                x, y = a.get_tensor(key), b.get_tensor(key)
                if (
                    x.dtype != y.dtype
                    or x.shape != y.shape
                    or not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
                ):
                    raise RouterTuneError(f"tensor {key} of the export differs from the source; nothing was written.")
                checked += 1
    return checked
