"""On-disk tensor names of the two MoE layouts, and the plan that converts one into the other.

    legacy  Mixtral  model.layers.N.block_sparse_moe.gate.weight
                     model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight
            Qwen-MoE model.layers.N.mlp.experts.E.gate_proj|up_proj|down_proj.weight
    fused   both     model.layers.N.mlp.gate.weight
                     model.layers.N.mlp.experts.gate_up_proj [E, 2I, H], .down_proj [E, H, I]

transformers 5 loads both (its conversion_mapping stacks the experts and concatenates gate
and up along dim 1), llama.cpp's converter reads only legacy. Because tensors are row-major,
`gate_up_proj[e]` is the bytes of `w1[e]` followed by those of `w3[e]`, and `down_proj[e]`
is `w2[e]`: a conversion is a re-arrangement of byte ranges and is exact by construction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from router_tune.checkpoint import Layout
from router_tune.errors import RouterTuneError
from router_tune.shard_io import OutputTensor, StoredTensor

LAYOUTS = ("legacy", "fused")


@dataclass(frozen=True)
class Naming:
    """How one architecture names its per-expert (legacy) tensors."""
    legacy_block: str  # module name of the MoE block in the legacy layout
    gate: str          # the three projections of one expert: gate (w1), up (w3), down (w2)
    up: str
    down: str


NAMINGS = {
    "mixtral": Naming("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": Naming("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": Naming("mlp", "gate_proj", "up_proj", "down_proj"),
}
_LEGACY = re.compile(r"^(?P<layer>.+)\.(?P<block>block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\."
                     r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")


def naming_for(architecture: str) -> Naming:
    if architecture not in NAMINGS:
        raise RouterTuneError(f"export does not know the on-disk names of {architecture!r} checkpoints; "
                              f"supported: {', '.join(NAMINGS)}.")
    return NAMINGS[architecture]


def param_name(disk_name: str, naming: Naming) -> str:
    """The transformers 5 in-memory name of a non-expert on-disk tensor (legacy Mixtral renames its block)."""
    return disk_name.replace(f".{naming.legacy_block}.", ".mlp.")


def disk_name(param: str, naming: Naming, layout: Layout) -> str:
    return param.replace(".mlp.", f".{naming.legacy_block}.") if layout == "legacy" else param


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor, the source shard it is written to, and its in-memory name when it
    maps 1:1 onto a parameter (None for re-arranged expert tensors)."""
    shard: str
    tensor: OutputTensor
    param: str | None


def plan_layout(tensors: list[StoredTensor], architecture: str, layout: Layout) -> list[PlannedTensor]:
    """Output tensors in `layout`, in source order; each lands in the shard of its first source bytes."""
    naming = naming_for(architecture)
    legacy_groups: dict[str, dict[tuple[int, str], StoredTensor]] = {}
    for t in tensors:
        m = _LEGACY.match(t.name)
        if m and layout == "fused":
            legacy_groups.setdefault(m["layer"], {})[(int(m["e"]), m["proj"])] = t
    plan: list[PlannedTensor] = []
    for t in tensors:
        legacy, fused = _LEGACY.match(t.name), _FUSED.match(t.name)
        if legacy and layout == "fused":
            group = legacy_groups.pop(legacy["layer"], None)
            if group is not None:  # emitted once, where the layer's first expert tensor was
                plan += _fuse(legacy["layer"], group, naming, t.file.name)
        elif fused and layout == "legacy":
            plan += _split(fused["layer"], fused["proj"], t, naming)
        elif legacy or fused:
            plan.append(PlannedTensor(t.file.name, OutputTensor(t.name, t.dtype, t.shape, (t.segment(),)), None))
        else:
            param = param_name(t.name, naming)
            out = OutputTensor(disk_name(param, naming, layout), t.dtype, t.shape, (t.segment(),))
            plan.append(PlannedTensor(t.file.name, out, param))
    return plan


def _fuse(layer: str, group: dict[tuple[int, str], StoredTensor], naming: Naming, shard: str) -> list[PlannedTensor]:
    """gate_up_proj = stack_e(cat(w1[e], w3[e])), down_proj = stack_e(w2[e]), as byte ranges."""
    experts = 1 + max(e for e, _ in group)
    try:
        parts = [(group[(e, naming.gate)], group[(e, naming.up)], group[(e, naming.down)]) for e in range(experts)]
    except KeyError as err:
        raise RouterTuneError(f"{layer} lacks expert tensor {err.args[0]} of its {experts} experts: the checkpoint "
                              "is incomplete; re-download or re-create it.") from None
    gate0, _, down0 = parts[0]
    for gate, up, down in parts:
        if {gate.shape, up.shape} != {gate0.shape} or down.shape != down0.shape or \
                {gate.dtype, up.dtype, down.dtype} != {gate0.dtype}:
            raise RouterTuneError(f"the experts of {layer} differ in shape or dtype ({gate.name}: {gate.shape} "
                                  f"{gate.dtype}, {down.name}: {down.shape} {down.dtype}), so they cannot be fused.")
    inter, hidden = gate0.shape
    gate_up = OutputTensor(f"{layer}.mlp.experts.gate_up_proj", gate0.dtype, (experts, 2 * inter, hidden),
                           tuple(seg for gate, up, _ in parts for seg in (gate.segment(), up.segment())))
    down = OutputTensor(f"{layer}.mlp.experts.down_proj", down0.dtype, (experts, *down0.shape),
                        tuple(d.segment() for _, _, d in parts))
    return [PlannedTensor(shard, gate_up, None), PlannedTensor(shard, down, None)]


def _split(layer: str, proj: str, t: StoredTensor, naming: Naming) -> list[PlannedTensor]:
    """w1[e], w3[e] = the two halves of gate_up_proj[e]; w2[e] = down_proj[e]; each a contiguous range."""
    if len(t.shape) != 3 or (proj == "gate_up_proj" and t.shape[1] % 2):
        raise RouterTuneError(f"{t.name} has shape {t.shape}; a fused expert tensor is [experts, rows, cols] "
                              "(gate_up_proj with an even number of rows).")
    experts, rows, cols = t.shape
    per_expert = rows * cols * t.itemsize
    prefix = f"{layer}.{naming.legacy_block}.experts"
    out = []
    for e in range(experts):
        if proj == "gate_up_proj":
            half = per_expert // 2
            start = e * per_expert
            pieces = [(naming.gate, t.segment(start, half)), (naming.up, t.segment(start + half, half))]
            shape = (rows // 2, cols)
        else:
            pieces, shape = [(naming.down, t.segment(e * per_expert, per_expert))], (rows, cols)
        for name, seg in pieces:
            out.append(PlannedTensor(t.file.name, OutputTensor(f"{prefix}.{e}.{name}.weight", t.dtype, shape, (seg,)),
                                     None))
    return out
