"""Run by tests/test_zero3.py under `DS_ACCELERATOR=cpu accelerate launch --config_file
recipes/accelerate/cpu-deepspeed-zero3.yaml` (2 gloo processes, DeepSpeed ZeRO-3), or alone
(1 process, no sharding) for the reference run.

python tests/zero3_train_script.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH GRAD_ACCUMULATION STEPS [RESUME]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router_tune.training.sharding import shard_fraction  # noqa: E402
from tests.rank_reports import print_report  # noqa: E402
from tests.trainers import distributed_trainer  # noqa: E402

model_dir, out, batch, ga, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resume = sys.argv[6] if len(sys.argv) > 6 else None

trainer = distributed_trainer(model_dir, out, steps=steps, batch=batch, ga=ga, save_steps=2)
trainer.train(resume_from_checkpoint=resume)
trainer.save_model()
# After accelerator.prepare (inside train): ZeRO-3 keeps each parameter's local partition in `ds_tensor`
# and leaves the parameter itself empty outside a gathered forward.
frozen = [p for p in trainer.model.get_decoder().layers.parameters() if not p.requires_grad]
report = {
    "world": trainer.accelerator.num_processes,
    "rank": trainer.accelerator.process_index,
    "distributed_type": str(trainer.accelerator.distributed_type),
    "shard_fraction": shard_fraction(trainer.model),
    "layer_partitioned": all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in frozen),
    "layer_local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in frozen),
    "layer_numel": sum(getattr(p, "ds_numel", p.numel()) for p in frozen),
    "router_rescaling": trainer.router_rescaling,
    "router_input_l1": trainer.router_input_l1["measured"],
    "router_adam_rates": list(trainer.run_info()["router_adam_rates"].values()),
    "step": trainer.state.global_step,
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
}
print_report(report)
# every rank together, before the interpreter exits (router_tune.training.sharding.end_process_group)
trainer.end_training()
