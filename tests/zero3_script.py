"""Run by tests/test_sharded.py under `torch.distributed.run` (2 gloo processes, DS_ACCELERATOR=cpu):
routers of a ZeRO-3 partitioned model are found by their full shape, read whole and written back.

python -m torch.distributed.run --nproc_per_node 2 tests/zero3_script.py MODEL_DIR
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from router_tune.model.routers import (  # noqa: E402
    find_routers,
    freeze_all_but_routers,
    load_router_state_dict,
    router_state_dict,
    routers_to_fp32,
)

deepspeed.init_distributed(dist_backend="gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
routers_to_fp32(model)
freeze_all_but_routers(model)
before = router_state_dict(model)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
deepspeed.initialize(model=model, optimizer=optimizer, config=config)

weights = [ref.module.weight for ref in find_routers(model)]
assert all(w.numel() == 0 and tuple(w.ds_shape) == (4, 32) for w in weights), [w.shape for w in weights]
after = router_state_dict(model)
assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)
load_router_state_dict(model, {n: t + 1.0 for n, t in before.items()})
again = router_state_dict(model)
assert all(torch.equal(before[n] + 1.0, again[n]) for n in before)
print(f"ZERO3 OK rank={torch.distributed.get_rank()}", flush=True)
