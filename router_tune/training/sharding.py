"""Sharded training: which backend a run asked for, how the model is loaded for it, and the check
that the process really got it.

FSDP2 is transformers' own load-time sharding (`from_pretrained(distributed_config=...)`): each
rank reads only its shard of every decoder layer, and `Trainer` then treats the model as owning
its placement and gradient reduction (no DDP wrap, FSDP2 reduce-scatter of the router gradients).
The same code path runs on a CPU (gloo) and on GPUs (NCCL), which matters because accelerate
turns an FSDP config on a CPU into plain DDP without saying so: the request is read from the
environment `accelerate launch` sets (`ACCELERATE_USE_FSDP`), not from accelerate's state.

DeepSpeed ZeRO-3 is accelerate's own (`Trainer` -> `accelerator.prepare` -> `deepspeed.initialize`),
with the MoE blocks as ZeRO-3 leaf modules (`prepare_zero3`). On a CPU (`DS_ACCELERATOR=cpu`,
gloo) accelerate needs one push: its `PartialState` finds no GPU backend, initialises DeepSpeed's
process group with backend None and then counts one process on every rank
(`configure_process_group`); `check_wrapped` stops a run that did not get ZeRO-3 over every process.

Hybrid sharding (HSDP: replicate across nodes, shard within a node) is accelerate's own
`parallelism_config` (`dp_replicate_size` x `dp_shard_size`), which `accelerate launch` passes on as
PARALLELISM_CONFIG_* variables; router_tune hands the sizes to transformers' load-time sharding
(`DistributedConfig(dp_replicate_size=..., fsdp_size=...)`: a 2-D ("dp_replicate", "fsdp") mesh,
consecutive ranks in one shard group, so a node's GPUs shard and only the gradient all-reduce between
replicas crosses nodes). `fsdp_mesh_sizes` reads and checks them.
"""

from __future__ import annotations

import datetime
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
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}.get(backend or "")
    config = {"fsdp": "fsdp2.yaml", "deepspeed": "deepspeed-zero3.yaml"}.get(backend or "")
    if backend and world_size() < 2:
        raise RouterTuneError(
            f"this run asks for {name} but has {world_size()} process: with one process nothing is sharded and "
            f"the run would be a plain one. Launch it with `accelerate launch --config_file "
            f"recipes/accelerate/{config}` and num_processes >= 2, or without the {name} config."
        )
    if backend is None and world_size() > 1:
        check_data_parallel(args)
    if backend and getattr(args, "loss_free_fold", False) and args.balancing != "switch":
        raise RouterTuneError(
            f"`loss_free_fold: true` folds the selection bias into whole router weights at the last step, which "
            f"{name} holds sharded. Fold in a one-process or DDP run, or use the fade (loss_free_fold: false)."
        )
    if backend == "fsdp":
        fsdp_mesh_sizes()  # a bad replicate / shard size stops here, before any weight is read
    if backend == "deepspeed" and (args.use_cpu or _env_true("ACCELERATE_USE_CPU")):
        raise RouterTuneError(
            "this run asks for DeepSpeed on CPU with `use_cpu` (or ACCELERATE_USE_CPU=1, `use_cpu: true` in "
            "the accelerate config): accelerate then ignores DeepSpeed and wraps the model in plain DDP. Drop "
            "use_cpu (see recipes/accelerate/cpu-deepspeed-zero3.yaml)."
        )
    return backend


def check_data_parallel(args) -> None:
    """No silent downgrade for DDP: a launch of N processes that accelerate did not make one distributed run
    (e.g. `multi_gpu` on a machine without a GPU and without ACCELERATE_USE_CPU) would train N separate runs
    into one output_dir, each on the whole data."""
    from transformers.training_args import ParallelMode

    if args.parallel_mode == ParallelMode.DISTRIBUTED:
        return
    raise RouterTuneError(
        f"this run was launched as {world_size()} processes (WORLD_SIZE), but accelerate set up no distributed "
        f"training ({args.parallel_mode.value}): each process would train alone into the same output_dir. On a "
        "machine without a GPU, launch with ACCELERATE_USE_CPU=1 (or `use_cpu: true` in the recipe); with GPUs, "
        "check that torch sees one per process."
    )


def configure_process_group(args) -> None:
    """Make accelerate run DeepSpeed over gloo on a machine without a GPU, and leave an FSDP2 run's hybrid
    sharding sizes to transformers (called by the config's `__post_init__`, before TrainingArguments set
    up their devices; a no-op anywhere else).

    accelerate drops a DeepSpeed request when `cpu=True` (`use_cpu`, `ACCELERATE_USE_CPU`):
    `elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not cpu` in
    `AcceleratorState.__init__` (accelerate/state.py), and the run becomes plain DDP (MULTI_CPU); that
    is refused in `check_request`. With `cpu=False`, `PartialState._prepare_backend` finds no GPU and
    returns backend None; DeepSpeed's process group still starts, but `PartialState` then takes
    `backend is None` to mean one process (num_processes 1, process_index 0 on every rank: each rank
    would train on the whole batch). A `PartialState(backend="gloo")` made first, and
    `use_configured_state`, give accelerate the real world; `check_wrapped` verifies it.
    """
    if requested_backend(args) == "fsdp":
        # Hybrid sharding's sizes are for transformers' load-time mesh (`load_kwargs`), which then owns
        # placement and gradient reduction (Trainer's `is_distributed_loading_by_transformers`), as with a
        # plain `DistributedConfig(dp_replicate_size=...)`. Left on, accelerate would build a second mesh
        # of its own and, on a CPU (MULTI_CPU), refuse to start ("ParallelismConfig is only compatible
        # DistributedType.FSDP ..."). The PARALLELISM_CONFIG_* sizes stay for `fsdp_mesh_sizes`.
        os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)
    if requested_backend(args) != "deepspeed" or torch.cuda.is_available() or world_size() < 2:
        return
    if args.use_cpu or _env_true("ACCELERATE_USE_CPU"):
        return  # check_request says why this cannot run
    from accelerate import PartialState

    # as TrainingArguments does for `deepspeed=...`: the variable makes PartialState start DeepSpeed's comm
    asked = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=datetime.timedelta(seconds=args.ddp_timeout))
    finally:
        if asked is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
    if args.accelerator_config is None:
        args.accelerator_config = {}
    if isinstance(args.accelerator_config, dict):
        args.accelerator_config["use_configured_state"] = True
    else:
        args.accelerator_config.use_configured_state = True


def load_kwargs(args, backend: str | None) -> dict:
    """Extra `from_pretrained` arguments, so that each rank's weights load straight to where they live.

    - FSDP2: transformers' sharding at load time over all processes, with bf16 compute when the run is
      bf16 (the routers then cast their weight to fp32 in the forward).
    - One process or DDP on an accelerator, unquantized: `device_map` to this rank's device, so the
      start-up (rescale probe included) runs there and the host never holds the whole model.
    - DeepSpeed partitions at load by itself (`zero.Init`); a quantized base loads on the host and
      `quantize_model` moves each layer to the device as it quantizes it (the bf16 model may not fit),
      then the rest of the model.
    """
    if backend is None:
        device = torch.device(args.device)
        if device.type != "cpu" and getattr(args, "quantize", "none") == "none":
            return {"device_map": {"": str(device)}}
        return {}
    if backend != "fsdp":
        return {}
    from transformers.distributed import DistributedConfig

    bf16 = bool(getattr(args, "bf16", False)) or os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    replicas, shards = fsdp_mesh_sizes()
    config = DistributedConfig(fsdp_size=shards, dp_replicate_size=replicas, fsdp_mixed_precision=bf16)
    return {"distributed_config": config}


_PARALLELISM = "PARALLELISM_CONFIG_"


def fsdp_mesh_sizes() -> tuple[int, int]:
    """(replicas, shards per replica) of the FSDP2 mesh: (1, world) for plain FSDP2; for hybrid sharding
    accelerate's `parallelism_config` sizes (`dp_replicate_size`, `dp_shard_size`), as `accelerate launch`
    exports them. Every rank is a data-parallel rank either way (each reads its own micro-batches);
    replicas x shards must be the world, and router_tune uses no other parallel dimension (tensor, context,
    sequence: the routers and their statistics assume whole sequences and whole layers on each rank)."""
    world = world_size()

    def size(name: str) -> int:
        value = os.environ.get(_PARALLELISM + name, "1") or "1"
        try:
            return int(value)
        except ValueError:
            raise RouterTuneError(f"{_PARALLELISM}{name}={value!r} is not a whole number.") from None

    replicas, shards = size("DP_REPLICATE_SIZE"), size("DP_SHARD_SIZE")
    others = {n.lower(): size(n) for n in ("TP_SIZE", "CP_SIZE", "SP_SIZE") if size(n) != 1}
    where = "the accelerate config's parallelism_config (or --parallelism_config_* launch flags)"
    if others:
        raise RouterTuneError(
            f"{where} asks for {others}: router_tune trains routers on whole sequences and whole layers per rank, "
            "with FSDP2 or hybrid sharding only. Keep parallelism_config_dp_replicate_size and _dp_shard_size."
        )
    if replicas < 1 or shards < 1:
        raise RouterTuneError(f"{where}: dp_replicate_size {replicas} and dp_shard_size {shards} must be >= 1.")
    if replicas == 1 and shards == 1:
        return 1, world  # no parallelism_config: plain FSDP2 over every rank
    if world % replicas:
        raise RouterTuneError(
            f"{where}: dp_replicate_size {replicas} does not divide the {world} processes; for hybrid sharding "
            "it is the number of machines and each machine runs the same number of processes."
        )
    if replicas * shards != world:
        raise RouterTuneError(
            f"{where}: dp_replicate_size {replicas} x dp_shard_size {shards} = {replicas * shards}, but the run has "
            f"{world} processes; set dp_shard_size to {world // replicas} (processes per replica)."
        )
    if shards == 1:
        raise RouterTuneError(
            f"{where}: dp_shard_size 1 replicates the whole model on every process and shards nothing; for plain data "
            "parallelism use recipes/accelerate/ddp.yaml."
        )
    return replicas, shards


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


def check_wrapped(accelerator, backend: str | None) -> None:
    """No silent downgrade: a run that asked for DeepSpeed got accelerate's DeepSpeed, ZeRO stage 3, over
    every process, or stops saying what it got instead."""
    if backend != "deepspeed":
        return
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    got = f"{accelerator.distributed_type.value} over {accelerator.num_processes} process(es)" + (
        f", ZeRO stage {plugin.zero_stage}" if plugin is not None else ""
    )
    if (
        accelerator.distributed_type != DistributedType.DEEPSPEED
        or plugin is None
        or plugin.zero_stage != 3
        or accelerator.num_processes != world_size()
    ):
        raise RouterTuneError(
            f"this run asks for DeepSpeed ZeRO-3 over {world_size()} processes, but accelerate set up {got}: the "
            "model would not be partitioned as asked. Use zero_stage: 3 (recipes/accelerate/deepspeed-zero3.yaml) "
            "and create the RouterTuneConfig in the launched process, before anything reads `args.device`."
        )


def prepare_zero3(model: nn.Module, block_class: type) -> None:
    """Set a model up for ZeRO-3 before `deepspeed.initialize`.

    - The MoE blocks become leaf modules (`set_z3_leaf_modules`): ZeRO-3 gathers a block's parameters
      all at once for its forward and backward instead of per submodule, in the order its trace
      recorded. Experts kept as separate modules, which a rank skips when none of its tokens routes to
      them, desync the ranks without it. transformers 5's fused experts (one [E, 2I, H] parameter per
      layer) are always called: 2-rank runs without leaves trained correctly here.
    - The embeddings' output requires grad (`enable_input_require_grads`): ZeRO-3 re-gathers a
      module's parameters for backward from a hook on its input, which never fires when the input
      does not require grad, as below the first MoE block when everything there is frozen ("size of
      tensor a (0) must match").
    """
    from deepspeed.utils import set_z3_leaf_modules

    if not set_z3_leaf_modules(model, [block_class]):
        raise RouterTuneError(f"no {block_class.__name__} in this {type(model).__name__}: nothing to mark as a leaf.")
    model.enable_input_require_grads()


def shard_fraction(model: nn.Module) -> float:
    """The share of the model's elements this rank holds (1.0 unsharded; about 1/world under FSDP2 or
    ZeRO-3, whose partitioned parameters keep their local part in `ds_tensor`)."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_numel
            local += p.ds_tensor.numel()
            continue
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(total, 1)


def finite_gradients(grads: list[torch.Tensor], partitioned: bool = False) -> bool:
    """Whether every gradient is finite on every rank. Sharded gradients (DTensors, or ZeRO-3's
    `partitioned` flat fp32 partitions) are checked on the local part and the result all-reduced: a NaN
    in one shard must skip the step everywhere. Plain gradients are already all-reduced by DDP: no
    collective."""
    from torch.distributed.tensor import DTensor

    sharded = partitioned or any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norm = torch.nn.utils.get_total_norm(local) if local else torch.zeros(())
    if sharded and torch.distributed.is_initialized():
        torch.distributed.all_reduce(norm)
    return bool(torch.isfinite(norm).item())


def end_process_group(accelerator=None) -> None:
    """Take a launched run's process group down while the interpreter is alive, every rank together.

    Left to interpreter exit, gloo's worker threads can still hold tensors and abort a finished run
    ("terminate called without an active exception"); and a rank that tears down while another is still
    inside a collective (DeepSpeed's teardown, the last checkpoint's gather) can abort that one, so the
    ranks meet at a barrier first. With `accelerator`, its trackers are finished too (`end_training`).
    Call it on success only: a rank that failed must not wait for the others in a collective.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    if accelerator is not None:
        accelerator.end_training()
    elif distributed:
        torch.distributed.destroy_process_group()


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
