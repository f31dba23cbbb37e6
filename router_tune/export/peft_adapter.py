"""Trained routers as a PEFT adapter that plain peft loads onto the untouched source model.

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), adapter_dir)

Why `modules_to_save` and not a LoRA on the gate: a LoRA adds `B @ A` to the source weight
in the weight's dtype, so in bf16 `W_src + delta` rounds differently from the trained weight;
a saved module copy is the trained weight itself, bit for bit, in every dtype. peft refuses a
config whose only targets are `modules_to_save` (NoMatchingPeftModuleError: a LoRA config needs a
LoRA target), so the adapter also holds a rank-1 LoRA on one attention projection with both
factors zero: its output is exactly 0.
Mixtral's v5 router is not an nn.Linear; `modules_to_save` copies any module, so that works.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from router_tune.errors import RouterTuneError
from router_tune.export.verify import Reference, check_logits, logits_of
from router_tune.model.loading import hub_kernels
from router_tune.model.routers import find_routers, router_param_names

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def router_module_suffixes(model: nn.Module) -> list[str]:
    """`mlp.gate`, `mlp.shared_expert_gate`: the module names below a decoder layer (peft matches suffixes)."""
    suffixes = set()
    for ref in find_routers(model):
        layer_prefix = ref.module_name.rsplit(f".{ref.layer}.", 1)[0] + f".{ref.layer}."
        suffixes.update(p.rpartition(".")[0][len(layer_prefix) :] for p in ref.param_names)
    return sorted(suffixes)


def _inert_target(model: nn.Module, routers: set[str]) -> str:
    """The full name of the first nn.Linear that is not routing (the zero LoRA's host)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" not in routers and not name.endswith("lm_head"):
            return name
    raise RouterTuneError(
        "this model has no nn.Linear besides its routers, so peft has nothing to attach the "
        "required LoRA to; use --format full or --format routers."
    )


def write_adapter(model: nn.Module, out_dir: Path, base_model: str) -> list[str]:
    """Wrap the trained model (routers already loaded) with peft and save the adapter files.

    The model is modified in place (peft wraps its modules): free it afterwards.
    """
    from peft import LoraConfig, get_peft_model  # imported only by --format peft: slow to import

    routers = set(router_param_names(model))
    config = LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=[_inert_target(model, routers)],
        modules_to_save=router_module_suffixes(model),
    )
    peft_model = get_peft_model(model, config)  # modules_to_save copies the routers as they are now: trained
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.zero_()
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's template card; export writes its own
    return list(ADAPTER_FILES)


def check_adapter(source_dir: Path, adapter_dir: Path, ref: Reference) -> float:
    """Load the adapter the way users will (plain transformers + peft) and compare logits."""
    from peft import PeftModel  # peft is imported only by --format peft: it is slow to import

    base = AutoModelForCausalLM.from_pretrained(source_dir, **hub_kernels(False))
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        return check_logits(logits_of(model), ref, "the PEFT adapter on the source model")
    finally:
        del base
        gc.collect()
