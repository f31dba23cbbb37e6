"""ZeRO-3 with frozen experts: keep autograd from holding every gathered MoE block until backward.

transformers 5's fused experts compute `F.linear(x, self.gate_up_proj[e])`. For the input's gradient,
which the routers below need, autograd saves the weight, and that weight is a *view* of the gathered
parameter. ZeRO-3 releases a parameter after its module's forward by pointing `param.data` at an empty
tensor, but a saved view keeps the gathered storage alive: every MoE block's whole experts stay in
memory from its forward to its backward, so at the peak each rank holds all of the model's experts and
ZeRO-3 shards nothing that matters. Measured on CPU (gloo, 2 ranks): one leaf block cost 3x its bytes
through forward + backward instead of 2x, and two layers of the Raiden-shaped scale model grew to
>= 10.4 GB per rank, the memory guard's stop. FSDP2 frees its unsharded storage in place
(`resize_(0)`), so the same views hold nothing there, and a plain model has nothing to release.

`saved_views_by_reference` installs `torch.autograd.graph.saved_tensors_hooks` that store such a view
as (parameter, offset, size, stride) when autograd saves it, and rebuild it from the parameter in
backward, where ZeRO-3 has gathered the leaf block again: DeepSpeed's pre-backward hook on the
block's outputs runs before the block's own backward unpacks anything. DeepSpeed's release works for
weights that are parameters themselves (`nn.Linear.weight`: the saved tensor is the parameter, whose
data it swaps), not for views of them, and torch has nothing for it, hence the hand-written hooks.
Forward values and gradients are unchanged (the same bytes in the same layout); the tests compare
them bit for bit and measure the memory.

Inside a layer under non-reentrant activation checkpointing these hooks are not called (checkpointing's
own hooks are the innermost), and that is harmless: the checkpointed forward saves no views, only the
layer's input, and DeepSpeed keeps the parameters a backward-time recompute gathers attributed to the
running backward module (`update_recompute_parameters`), so they are gathered once until its backward
ends. tests/test_zero3.py measures both (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from router_tune.errors import RouterTuneError


@dataclass(frozen=True)
class _ParamView:
    """Where a saved view lies in its ZeRO-3 parameter: enough to rebuild it once the parameter is gathered."""

    param: torch.nn.Parameter
    offset: int  # elements from the start of the parameter's data
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _pack(t: torch.Tensor):
    base = t._base  # a view's root tensor (None for tensors that are not views)
    if base is not None and hasattr(base, "ds_id"):  # a view of a ZeRO-3 partitioned parameter
        return _ParamView(base, t.storage_offset() - base.storage_offset(), tuple(t.shape), tuple(t.stride()))
    return t


def _unpack(saved):
    if not isinstance(saved, _ParamView):
        return saved
    data = saved.param.data
    if data.numel() != saved.param.ds_numel:
        raise RouterTuneError(
            f"a ZeRO-3 parameter of shape {tuple(saved.param.ds_shape)} is not gathered in the backward pass that "
            "needs it: its module must be a ZeRO-3 leaf (prepare_zero3) so that DeepSpeed gathers it for backward."
        )
    return data.as_strided(saved.size, saved.stride, data.storage_offset() + saved.offset)


def saved_views_by_reference() -> contextlib.AbstractContextManager:
    """Context for a ZeRO-3 forward: views of partitioned parameters are saved for backward by reference."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
