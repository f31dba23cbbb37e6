"""Sharded training: which backend a run asked for, how the model is loaded for it, and the check
that the process really got it.

FSDP2 is transformers' own load-time sharding (`from_pretrained(distributed_config=...)`): each
rank reads only its shard of every decoder layer, and `Trainer` then treats the model as owning
its placement and gradient reduction (no DDP wrap, FSDP2 reduce-scatter of the router gradients).
The same code path runs on a CPU (gloo) and on GPUs (NCCL), which matters because accelerate
turns an FSDP config on a CPU into plain DDP without saying so: the request is read from the
environment `accelerate launch` sets (`ACCELERATE_USE_FSDP`), not from accelerate's state.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from router_tune.errors import RouterTuneError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def requested_backend(args) -> str | None:
    """ "fsdp", "deepspeed" or None, from the accelerate launch config (its environment) or the
    TrainingArguments `fsdp` / `deepspeed` fields."""
    if _env_true("ACCELERATE_USE_DEEPSPEED") or getattr(args, "deepspeed", None):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP") or getattr(args, "fsdp", None):
        return "fsdp"
    return None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_request(args) -> str | None:
    """Stop before any weight is read when the asked-for backend cannot be delivered."""
    backend = requested_backend(args)
    if backend == "deepspeed":
        raise RouterTuneError(
            "this run asks for DeepSpeed (the accelerate config or `deepspeed`), which router_tune does not "
            "run yet: ZeRO-3 needs its MoE blocks as leaf modules and router-only checkpoints of partitioned "
            "parameters. Use recipes/accelerate/fsdp2.yaml (FSDP2) to shard the model instead."
        )
    if backend == "fsdp" and world_size() < 2:
        raise RouterTuneError(
            f"this run asks for FSDP but has {world_size()} process: with one process nothing is sharded and "
            "the run would be a plain one. Launch it with `accelerate launch --config_file "
            "recipes/accelerate/fsdp2.yaml` and num_processes >= 2, or without the FSDP config."
        )
    return backend


def load_kwargs(args, backend: str | None) -> dict:
    """Extra `from_pretrained` arguments: FSDP2 sharding at load time over all processes, with
    bf16 compute when the run is bf16 (the routers then cast their weight to fp32 in the forward)."""
    if backend != "fsdp":
        return {}
    from transformers.distributed import DistributedConfig

    bf16 = bool(getattr(args, "bf16", False)) or os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    return {"distributed_config": DistributedConfig(fsdp_size=world_size(), fsdp_mixed_precision=bf16)}


def check_sharded(model: nn.Module, backend: str | None) -> None:
    """No silent downgrade: a run that asked for FSDP holds DTensor shards of its weights, or stops."""
    if backend != "fsdp":
        return
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        raise RouterTuneError(
            f"this run asks for FSDP over {world_size()} processes, but the loaded model is not sharded (no "
            "DTensor parameters): every rank would hold the whole model. Check that torch.distributed is "
            "initialised (launch with `accelerate launch`) and that transformers supports distributed_config."
        )


def shard_fraction(model: nn.Module) -> float:
    """The share of the model's elements this rank holds (1.0 unsharded; about 1/world under FSDP2)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(total, 1)


def finite_gradients(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is finite on every rank. Sharded (DTensor) gradients are checked on
    the local shard and the result all-reduced: a NaN in one shard must skip the step everywhere.
    Plain gradients are already all-reduced by DDP: no collective."""
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norm = torch.nn.utils.get_total_norm(local) if local else torch.zeros(())
    if sharded and torch.distributed.is_initialized():
        torch.distributed.all_reduce(norm)
    return bool(torch.isfinite(norm).item())


def on_main_process(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` computed on rank 0 alone and broadcast to the other ranks (e.g. the expert
    fingerprints: hashing every expert's bytes once, not once per rank). Plain call without a
    process group. `fn` must not itself run collectives."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn(*args)
    box = [fn(*args) if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class StartupTimer:
    """Wall time of each start-up phase (load, fingerprints, rescale probe), logged and kept in
    router_tune.json: at seed-model scale these are minutes, and which one grows matters."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now

    def report(self) -> dict[str, float]:
        logger.info("start-up: %s", ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return dict(self.seconds)
