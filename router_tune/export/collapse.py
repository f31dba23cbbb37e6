"""Collapse a MoE whose experts are all the same model into the dense model it equals.

When every expert of a layer is one MLP and the top-k weights sum to 1, the layer's output is
sum_k w_k * mlp(h) = mlp(h): the routers cannot matter, and the model is exactly the dense model
the experts were copied from (e.g. `LlamaForCausalLM` for a Mixtral merge of Llama copies), 1/E
of the expert weights. Without renormalisation (Qwen3-MoE / OLMoE's default norm_topk_prob
False) the router still scales the MLP output, so the collapse is refused, as it is when any
layer's experts differ. The written model is reloaded and its logits compared with the MoE's.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from router_tune.architectures import architecture_for
from router_tune.errors import RouterTuneError
from router_tune.export.splice import staged_output
from router_tune.export.verify import fixed_input
from router_tune.io.checkpoint import resolve_checkpoint
from router_tune.io.router_files import read_trained_routers
from router_tune.model.fingerprints import expert_fingerprints
from router_tune.model.loading import hub_kernels, load_moe
from router_tune.model.routers import find_routers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# Largest |dense - MoE| logit difference accepted, relative to the largest |logit|: the MoE adds
# w_1 * y + w_2 * y with w_1 + w_2 = 1 up to rounding, the dense model computes y.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def collapse_identical(model_or_run: str | Path, out_dir: str | Path, *, force: bool = False) -> tuple[Path, str]:
    """Write the dense model equal to `model_or_run` (a MoE checkpoint, hub id or training run).

    Returns (out_dir, a one-line summary with the dense class and the measured logit difference).

    Raises:
        RouterTuneError: no dense equivalent for the architecture, top-k weights not renormalised,
            experts that differ in some layer, or logits that do not match (nothing is written).
    """
    source = _source_of(model_or_run)
    config = AutoConfig.from_pretrained(source)
    architecture = architecture_for(config)
    dense_class, dense_config = architecture.dense_equivalent(config)  # refuses before any weight is loaded
    if not architecture.normalizes_topk(config):
        raise RouterTuneError(
            f"this {architecture.display_name} does not renormalise its top-k weights (norm_topk_prob false): "
            "the router scales each token's MLP output by the sum of its top-k probabilities, so even with "
            "identical experts the MoE is not the dense model. It cannot be collapsed."
        )
    moe, _ = load_moe(source, fp32_routers=False)
    moe.eval()
    _check_identical(expert_fingerprints(moe))
    dense = dense_class(dense_config).to(next(moe.parameters()).dtype)
    dense.load_state_dict(dense_state_dict(moe), strict=True)
    dense.eval()
    with staged_output(out_dir, force=force, protect=[source]) as tmp:
        dense.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        del dense
        gc.collect()
        diff = _check_logits(moe, tmp, dense_class)
    summary = (
        f"{dense_class.__name__} equal to this {type(moe).__name__} (max |logit difference| {diff:.2g} on a fixed "
        f"input), {config.num_hidden_layers} layers, 1 MLP instead of {architecture.num_experts(config)} experts"
    )
    return Path(out_dir), summary


def _source_of(model_or_run: str | Path) -> Path:
    """A MoE checkpoint as is; a run (or checkpoint / delta) by the source it was trained on: with
    identical renormalised experts its trained routers change nothing, so they are not needed."""
    path = Path(model_or_run).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        return read_trained_routers(path).source_dir()
    return resolve_checkpoint(str(model_or_run))


def _check_identical(fingerprints: list[list[str]]) -> None:
    differing = [i for i, layer in enumerate(fingerprints) if len(set(layer)) > 1]
    if differing:
        groups = len(set(fingerprints[differing[0]]))
        raise RouterTuneError(
            f"the experts differ in MoE layer(s) {differing} ({groups} distinct experts in layer {differing[0]}): "
            "routing matters there, so no dense model is equivalent. Only merges of copies of one model collapse."
        )


def dense_state_dict(moe: nn.Module) -> dict[str, torch.Tensor]:
    """The MoE's tensors under the dense model's names: every non-MoE tensor as is, each MoE block
    replaced by expert 0's projections (gate_up_proj[0] = cat(gate_proj, up_proj), down_proj[0])."""
    blocks = {ref.module_name.rpartition(".")[0] for ref in find_routers(moe)}
    state = {}
    for name, tensor in moe.state_dict().items():
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if block is None:
            state[name] = tensor
        elif name == f"{block}.experts.gate_up_proj":
            state[f"{block}.gate_proj.weight"], state[f"{block}.up_proj.weight"] = tensor[0].chunk(2, dim=0)
        elif name == f"{block}.experts.down_proj":
            state[f"{block}.down_proj.weight"] = tensor[0]
    return state


@torch.no_grad()
def _check_logits(moe: nn.Module, out: Path, dense_class: type) -> float:
    ids = fixed_input(moe.config.vocab_size)
    expected = moe(ids).logits.float()
    dense = dense_class.from_pretrained(out, **hub_kernels(False))
    actual = dense.eval()(ids).logits.float()
    diff = (actual - expected).abs().max().item()
    allowed = TOLERANCE.get(next(moe.parameters()).dtype, 1e-5)
    if diff > allowed * max(1.0, expected.abs().max().item()):
        raise RouterTuneError(
            f"the collapsed {dense_class.__name__} does not reproduce the MoE's logits (max |difference| {diff:.3g}); "
            "nothing was written. Please report this with the model's config.json."
        )
    return diff
