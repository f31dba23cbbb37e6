"""Run by tests/test_zero3.py under `torch.distributed.run` (2 gloo processes, DS_ACCELERATOR=cpu):
how much of the gathered experts autograd keeps between a ZeRO-3 forward and its backward, without and
with `saved_views_by_reference`, and whether the router gradients are the same bits either way.

With the argument `checkpointing`: the same under transformers' (non-reentrant) activation checkpointing
of the decoder layers, and how far above its starting point the backward pass peaks (VmHWM after a reset
by /proc/self/clear_refs): without checkpointing, with it, and with it plus a tensor saved after the MoE
block inside each checkpointed layer (a control, see tests/test_zero3.py).

The model is a Mixtral whose experts dominate its bytes (3 layers of ~100 MB fp32 experts, tiny
everything else), partitioned by `deepspeed.initialize`, with the MoE blocks as ZeRO-3
leaves as RouterTrainer sets them. Prints one `REPORT {json}` line per rank.

python -m torch.distributed.run --nproc_per_node 2 tests/zero3_views_script.py [checkpointing]
"""

import ctypes
import gc
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from router_tune.architectures import architecture_for  # noqa: E402
from router_tune.model.routers import find_routers, freeze_all_but_routers, routers_to_fp32  # noqa: E402
from router_tune.training.sharding import end_process_group, prepare_zero3  # noqa: E402
from router_tune.training.zero3_saved_views import saved_views_by_reference  # noqa: E402
from tests.rank_reports import print_report  # noqa: E402

LAYERS, HIDDEN, INTER, EXPERTS = 3, 32, 32768, 8


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def anon_bytes() -> int:
    """This process's private resident memory (tensors, heap), after returning freed heap to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_bytes("RssAnon")


CHECKPOINTING = sys.argv[1:] == ["checkpointing"]


deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
ds_config = {
    "train_micro_batch_size_per_gpu": 1,
    # no look-ahead (prefetch, keeping gathered parameters for reuse): as with real-width layers, each of
    # which exceeds DeepSpeed's default reuse distance (1e9 elements), a block is released after its forward
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_prefetch_bucket_size": 0,
        "stage3_max_reuse_distance": 0,
    },
    "zero_allow_untested_optimizer": True,
}
config = MixtralConfig(
    vocab_size=320,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=EXPERTS,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)
torch.manual_seed(0)
model = MixtralForCausalLM(config)  # partitioned by deepspeed.initialize, as RouterTrainer's model is
routers_to_fp32(model)
freeze_all_but_routers(model)
prepare_zero3(model, architecture_for(model.config).block_class())
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
routers = [ref.module.weight for ref in find_routers(model)]
# the gradient at the embeddings' output has gone back through every block's experts: it needs the
# saved expert weights, which the router gradients of the lowest layer only partly do
embedding_grads = []


def keep_embedding_grad(module, args, out) -> None:
    out.register_hook(lambda g: embedding_grads.append(g.detach().clone()))


model.get_input_embeddings().register_forward_hook(keep_embedding_grad)
layer_expert_bytes = 3 * EXPERTS * HIDDEN * INTER * 4  # gate, up and down of every expert, fp32

ids = torch.arange(24).reshape(1, 24) * (rank + 3) % 320  # different tokens, different routing per rank
report = {"rank": rank, "layer_expert_bytes": layer_expert_bytes}
one = torch.ones((), requires_grad=True)


def save_after_block(module, args, out):
    """x * 1 with a factor that requires grad: the product saves the layer's output, so the layer's
    backward unpacks a saved tensor (and recomputes the layer) before it reaches the MoE block."""
    return out * one


modes = ("warm-up", "plain", "by_reference")  # warm-up: DeepSpeed's buffers exist before anything is measured
if CHECKPOINTING:  # RouterTrainer's forward context (by reference) in every mode, as under ZeRO-3
    modes = ("warm-up", "no_checkpointing", "checkpointing", "checkpointing_saved_after_block")
for mode in modes:
    hooks = []
    if mode.startswith("checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if mode == "checkpointing_saved_after_block":
            hooks = [layer.register_forward_hook(save_after_block) for layer in model.model.layers]
    model.train()  # checkpointing applies in training mode only
    before = anon_bytes()
    with (
        saved_views_by_reference()
        if mode != "plain"
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    ):
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    report[f"{mode}_held_after_forward"] = anon_bytes() - before
    start = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    engine.backward(loss)
    if CHECKPOINTING:
        report[f"{mode}_backward_peak"] = status_bytes("VmHWM") - start
    report[f"{mode}_loss"] = loss.item()
    grads = torch.cat([safe_get_full_grad(w).flatten() for w in routers] + [embedding_grads.pop().flatten()])
    report[f"{mode}_grads_sha256"] = hashlib.sha256(grads.numpy().tobytes()).hexdigest()[:16]  # short line: atomic
    report[f"{mode}_grads_norm"] = grads.norm().item()
    engine.optimizer.zero_grad()
    model.activation_checkpointing_disable()
    for hook in hooks:
        hook.remove()
    del loss
print_report(report)
# every rank together, before the interpreter exits (router_tune.training.sharding.end_process_group)
end_process_group()
