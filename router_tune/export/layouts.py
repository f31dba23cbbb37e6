"""The plan that writes a checkpoint's tensors in either MoE layout (names: architectures.on_disk).

Because tensors are row-major, `gate_up_proj[e]` is the bytes of `w1[e]` followed by those of
`w3[e]`, and `down_proj[e]` is `w2[e]`: a conversion is a re-arrangement of byte ranges and is
exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from router_tune.architectures import Layout, LegacyNaming, architecture_named
from router_tune.architectures.on_disk import FUSED_EXPERT, LEGACY_EXPERT, disk_name, param_name
from router_tune.errors import RouterTuneError
from router_tune.io.shards import OutputTensor, StoredTensor


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor, the source shard it is written to, and its in-memory name when it
    maps 1:1 onto a parameter (None for re-arranged expert tensors)."""

    shard: str
    tensor: OutputTensor
    param: str | None


def plan_layout(tensors: list[StoredTensor], architecture: str, layout: Layout) -> list[PlannedTensor]:
    """Output tensors in `layout`, in source order; each lands in the shard of its first source bytes."""
    naming = architecture_named(architecture).legacy_naming
    legacy_groups: dict[str, dict[tuple[int, str], StoredTensor]] = {}
    for t in tensors:
        m = LEGACY_EXPERT.match(t.name)
        if m and layout == "fused":
            legacy_groups.setdefault(m["layer"], {})[(int(m["e"]), m["proj"])] = t
    plan: list[PlannedTensor] = []
    for t in tensors:
        legacy, fused = LEGACY_EXPERT.match(t.name), FUSED_EXPERT.match(t.name)
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


def _fuse(
    layer: str, group: dict[tuple[int, str], StoredTensor], naming: LegacyNaming, shard: str
) -> list[PlannedTensor]:
    """gate_up_proj = stack_e(cat(w1[e], w3[e])), down_proj = stack_e(w2[e]), as byte ranges."""
    experts = 1 + max(e for e, _ in group)
    try:
        parts = [(group[(e, naming.gate)], group[(e, naming.up)], group[(e, naming.down)]) for e in range(experts)]
    except KeyError as err:
        raise RouterTuneError(
            f"{layer} lacks expert tensor {err.args[0]} of its {experts} experts: the checkpoint "
            "is incomplete; re-download or re-create it."
        ) from None
    gate0, _, down0 = parts[0]
    for gate, up, down in parts:
        if (
            {gate.shape, up.shape} != {gate0.shape}
            or down.shape != down0.shape
            or {gate.dtype, up.dtype, down.dtype} != {gate0.dtype}
        ):
            raise RouterTuneError(
                f"the experts of {layer} differ in shape or dtype ({gate.name}: {gate.shape} "
                f"{gate.dtype}, {down.name}: {down.shape} {down.dtype}), so they cannot be fused."
            )
    inter, hidden = gate0.shape
    gate_up = OutputTensor(
        f"{layer}.mlp.experts.gate_up_proj",
        gate0.dtype,
        (experts, 2 * inter, hidden),
        tuple(seg for gate, up, _ in parts for seg in (gate.segment(), up.segment())),
    )
    down = OutputTensor(
        f"{layer}.mlp.experts.down_proj", down0.dtype, (experts, *down0.shape), tuple(d.segment() for _, _, d in parts)
    )
    return [PlannedTensor(shard, gate_up, None), PlannedTensor(shard, down, None)]


def _split(layer: str, proj: str, t: StoredTensor, naming: LegacyNaming) -> list[PlannedTensor]:
    """w1[e], w3[e] = the two halves of gate_up_proj[e]; w2[e] = down_proj[e]; each a contiguous range."""
    if len(t.shape) != 3 or (proj == "gate_up_proj" and t.shape[1] % 2):
        raise RouterTuneError(
            f"{t.name} has shape {t.shape}; a fused expert tensor is [experts, rows, cols] "
            "(gate_up_proj with an even number of rows)."
        )
    experts, rows, cols = t.shape
    per_expert = t.nbytes_of(rows * cols)
    prefix = f"{layer}.{naming.block}.experts"
    out = []
    for e in range(experts):
        if proj == "gate_up_proj":
            half = t.nbytes_of(rows // 2 * cols)
            start = e * per_expert
            pieces = [(naming.gate, t.segment(start, half)), (naming.up, t.segment(start + half, half))]
            shape = (rows // 2, cols)
        else:
            pieces, shape = [(naming.down, t.segment(e * per_expert, per_expert))], (rows, cols)
        for name, seg in pieces:
            out.append(
                PlannedTensor(t.file.name, OutputTensor(f"{prefix}.{e}.{name}.weight", t.dtype, shape, (seg,)), None)
            )
    return out
