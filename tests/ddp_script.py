"""Run by tests/test_ddp.py, under `accelerate launch` (2 gloo processes) or alone (1 process).

python tests/ddp_script.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH GRAD_ACCUMULATION [ROUTER_GRADIENT [BALANCING]]

BALANCING loss_free / both: the selection bias moves by 0.05 a step, so that three steps route differently.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.trainers import distributed_trainer  # noqa: E402

model_dir, out, batch, ga = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
balancing = sys.argv[6] if len(sys.argv) > 6 else "switch"
trainer = distributed_trainer(
    model_dir,
    out,
    steps=3,
    batch=batch,
    ga=ga,
    router_gradient=sys.argv[5] if len(sys.argv) > 5 else "sparse",
    balancing=balancing,
    **({"loss_free_rate": 0.05} if balancing != "switch" else {}),
)
trainer.train()
trainer.save_model()
print(f"world={trainer.accelerator.num_processes} step={trainer.state.global_step}")
# every rank together, before the interpreter exits (router_tune.training.sharding.end_process_group)
trainer.end_training()
