"""MoE architectures: one module per architecture behind one interface (`base.MoeArchitecture`).

Owns every fact about a model family: router / MoE-block / decoder-layer classes, sparse
layers, expert counts, top-k semantics, on-disk tensor names (`on_disk.py`) and the wrap
classes of sharded training. Imports: errors, io.

Adding an architecture is one module here and one line in `REGISTRY`.
"""

from __future__ import annotations

from router_tune.architectures.base import LAYOUTS, Layout, LegacyNaming, MoeArchitecture
from router_tune.architectures.mixtral import Mixtral
from router_tune.architectures.olmoe import Olmoe
from router_tune.architectures.qwen2_moe import Qwen2Moe
from router_tune.architectures.qwen3_moe import Qwen3Moe
from router_tune.errors import RouterTuneError

REGISTRY: dict[str, MoeArchitecture] = {a.model_type: a for a in (Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe())}
SUPPORTED = ", ".join(a.display_name for a in REGISTRY.values())


def architecture_for(config) -> MoeArchitecture:
    """The architecture of a transformers config, or a RouterTuneError saying why it is not supported."""
    if config.model_type in REGISTRY:
        architecture = REGISTRY[config.model_type]
        check_top_k(config, architecture)
        return architecture
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    if any(("expert" in k or k.startswith("moe_")) and v for k, v in config.to_dict().items()):
        raise RouterTuneError(
            f"{arch} (model_type {config.model_type!r}) is a MoE architecture router_tune does not "
            f"support yet; supported: {SUPPORTED}. Convert the model, or open an issue."
        )
    raise RouterTuneError(
        f"this is a dense {arch}; router_tune needs a MoE checkpoint: {SUPPORTED}. "
        "Build one from dense fine-tunes with mergekit-moe first."
    )


def check_top_k(config, architecture: MoeArchitecture) -> None:
    """Refuse a config whose experts per token is not between 1 and the number of experts (a
    hand-edited or broken merge config would otherwise fail deep inside torch.topk)."""
    top_k, experts = getattr(config, "num_experts_per_tok", None), architecture.num_experts(config)
    if not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise RouterTuneError(
            f"config.json sets num_experts_per_tok = {top_k!r} but the model has {experts} experts per layer: it "
            f"must be between 1 and {experts}. Fix num_experts_per_tok in config.json (mergekit-moe writes "
            "experts_per_token from its YAML)."
        )


def architecture_named(model_type: str) -> MoeArchitecture:
    """The architecture registered under `model_type` (as recorded in a run or read from config.json)."""
    if model_type not in REGISTRY:
        raise RouterTuneError(f"router_tune does not know {model_type!r} checkpoints; supported: {SUPPORTED}.")
    return REGISTRY[model_type]


__all__ = [
    "LAYOUTS",
    "REGISTRY",
    "SUPPORTED",
    "Layout",
    "LegacyNaming",
    "MoeArchitecture",
    "architecture_for",
    "architecture_named",
]
