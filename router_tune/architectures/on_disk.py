"""On-disk tensor names of the two MoE layouts, for every registered architecture.

    legacy  Mixtral       model.layers.N.block_sparse_moe.gate.weight
                          model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight
            Qwen / OLMoE  model.layers.N.mlp.experts.E.gate_proj|up_proj|down_proj.weight
    fused   all           model.layers.N.mlp.gate.weight
                          model.layers.N.mlp.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I]

transformers 5 loads both (its conversion mapping stacks the experts and concatenates gate
and up along dim 1); llama.cpp's converter reads only legacy; mergekit <= 0.1.4 writes legacy,
0.1.5 fused. The rest of the package uses transformers' in-memory names (`mlp.gate.weight`).
"""

from __future__ import annotations

import re
from pathlib import Path

from router_tune.architectures import REGISTRY, Layout, LegacyNaming
from router_tune.errors import RouterTuneError
from router_tune.io.checkpoint import tensor_names

_BLOCKS = "|".join(sorted({re.escape(a.legacy_naming.block) for a in REGISTRY.values()}))
_PROJS = "|".join(
    sorted({re.escape(getattr(a.legacy_naming, p)) for a in REGISTRY.values() for p in ("gate", "up", "down")})
)
# One expert tensor of the legacy layout: groups layer, block, e(xpert), proj.
LEGACY_EXPERT = re.compile(rf"^(?P<layer>.+)\.(?P<block>{_BLOCKS})\.experts\.(?P<e>\d+)\.(?P<proj>{_PROJS})\.weight$")
# One fused expert tensor: groups layer, proj.
FUSED_EXPERT = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")


def detect_layout(checkpoint_dir: str | Path) -> Layout:
    """`"legacy"` (per-expert tensors) or `"fused"` (`mlp.experts.gate_up_proj`), from tensor names only."""
    names = tensor_names(checkpoint_dir)
    if any(FUSED_EXPERT.match(n) for n in names):
        return "fused"
    if any(LEGACY_EXPERT.match(n) for n in names):
        return "legacy"
    raise RouterTuneError(
        f"{checkpoint_dir} has no MoE expert tensors (neither block_sparse_moe.experts.N.w1 nor "
        "mlp.experts.gate_up_proj): it is not a Mixtral / Qwen-MoE / OLMoE checkpoint."
    )


def param_name(disk_name: str, naming: LegacyNaming) -> str:
    """The transformers 5 in-memory name of a non-expert on-disk tensor (legacy Mixtral renames its block)."""
    return disk_name.replace(f".{naming.block}.", ".mlp.")


def disk_name(param: str, naming: LegacyNaming, layout: Layout) -> str:
    """The on-disk name of a non-expert parameter (e.g. a router) in `layout`."""
    return param.replace(".mlp.", f".{naming.block}.") if layout == "legacy" else param
