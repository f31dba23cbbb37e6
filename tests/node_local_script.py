"""Run by tests/test_ddp.py under `accelerate launch` (2 gloo processes), or alone (1 process) for the
reference run. Each rank writes to its own output directory, OUT_DIR/rank-R, as ranks on separate
machines with node-local disks do: only rank 0's holds the checkpoints.

python tests/node_local_script.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH GRAD_ACCUMULATION STEPS [RESUME]
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router_tune.model.routers import router_state_dict  # noqa: E402
from tests.rank_reports import print_report  # noqa: E402
from tests.trainers import distributed_trainer  # noqa: E402

model_dir, out, batch, ga, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resume = sys.argv[6] if len(sys.argv) > 6 else None
rank = int(os.environ.get("RANK", "0"))
trainer = distributed_trainer(model_dir, Path(out) / f"rank-{rank}", steps=steps, batch=batch, ga=ga, save_steps=2)
trainer.train(resume_from_checkpoint=resume)
trainer.save_model()
routers = router_state_dict(trainer.model)
print_report(
    {
        "rank": rank,
        "step": trainer.state.global_step,
        "router_sums": {name: t.double().sum().item() for name, t in routers.items()},
    }
)
# every rank together, before the interpreter exits (router_tune.training.sharding.end_process_group)
trainer.end_training()
