"""Run by tests/test_sharded.py under `torch.distributed.run` (2 gloo processes, DS_ACCELERATOR=cpu):
routers of a ZeRO-3 partitioned model are found by their full shape, read whole and written back.
With `bf16`, after one DeepSpeed bf16 step they are read from the fp32 master partitions (the
module's copy is rounded to bf16) and written to both.

python -m torch.distributed.run --nproc_per_node 2 tests/zero3_script.py MODEL_DIR [bf16]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from router_tune.architectures import architecture_for  # noqa: E402
from router_tune.model.routers import (  # noqa: E402
    find_routers,
    freeze_all_but_routers,
    gathered,
    load_router_state_dict,
    router_state_dict,
    routers_to_fp32,
)
from router_tune.training.sharding import end_process_group, prepare_zero3  # noqa: E402

bf16 = sys.argv[2:] == ["bf16"]
deepspeed.init_distributed(dist_backend="gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
routers_to_fp32(model)
freeze_all_but_routers(model)
prepare_zero3(model, architecture_for(model.config).block_class())
before = router_state_dict(model)
config = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "bf16": {"enabled": bf16},
}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

weights = [ref.module.weight for ref in find_routers(model)]
assert all(w.numel() == 0 and tuple(w.ds_shape) == (4, 32) for w in weights), [w.shape for w in weights]
if bf16:
    ids = torch.arange(16).reshape(1, 16) + 16 * torch.distributed.get_rank()
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
    engine.step()
    masters = router_state_dict(model)
    with gathered(weights):
        module_copy = [w.detach().clone() for w in weights]
    assert all(w.dtype == torch.bfloat16 for w in module_copy)
    for (name, t), w in zip(masters.items(), module_copy):
        assert t.dtype == torch.float32 and not torch.equal(t, before[name]), name  # trained
        assert not torch.equal(t, t.bfloat16().float()), name  # fp32 values, not the bf16 copy
        torch.testing.assert_close(t.bfloat16(), w)
    before = masters
else:
    after = router_state_dict(model)
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
load_router_state_dict(model, {n: t + 1.0 for n, t in before.items()})
again = router_state_dict(model)
assert all(torch.equal(before[n] + 1.0, again[n]) for n in before)
for ref, w in zip(find_routers(model), weights):  # the master, not only the module copy
    torch.testing.assert_close(safe_get_full_fp32_param(w).cpu(), before[f"{ref.module_name}.weight"] + 1.0)
print(f"ZERO3 OK rank={torch.distributed.get_rank()}", flush=True)
# every rank together, before the interpreter exits (router_tune.training.sharding.end_process_group)
end_process_group()
