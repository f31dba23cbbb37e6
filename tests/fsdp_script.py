"""Run by tests/test_sharded.py under `accelerate launch --config_file recipes/accelerate/cpu-fsdp2.yaml`
(2 gloo processes, FSDP2) or cpu-hsdp.yaml (4 processes, 2 replicas x 2 shards), or alone (1 process,
no sharding) for the reference run.

python tests/fsdp_script.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH GRAD_ACCUMULATION STEPS [RESUME] [KEY=VALUE ...]

KEY=VALUE: recipe settings for the run, e.g. model_dtype=bfloat16.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from router_tune.training.sharding import shard_fraction  # noqa: E402
from tests.rank_reports import print_report  # noqa: E402
from tests.trainers import distributed_trainer  # noqa: E402

model_dir, out, batch, ga, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resume = next((a for a in sys.argv[6:] if "=" not in a), None)
settings = dict(a.split("=", 1) for a in sys.argv[6:] if "=" in a)

import router_tune.training.trainer as trainer_module  # noqa: E402

hashed = []  # which ranks hash the experts' bytes (only the main process should)
fingerprints_of = trainer_module.fingerprints_of
trainer_module.fingerprints_of = lambda *a: hashed.append(1) or fingerprints_of(*a)
trainer = distributed_trainer(model_dir, out, steps=steps, batch=batch, ga=ga, save_steps=2, **settings)
import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

layers = trainer.model.get_decoder().layers
frozen = [p for p in layers.parameters() if not p.requires_grad]
report = {
    "world": trainer.accelerator.num_processes,
    "rank": trainer.accelerator.process_index,
    "shard_fraction": shard_fraction(trainer.model),
    "layer_weights_dtensor": all(isinstance(p, DTensor) for p in frozen),
    "layer_shard_fraction": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in frozen)
    / sum(p.numel() for p in frozen),
    # the mesh the frozen weights live on ({dim name: size}) and a sum of this rank's part of them: equal
    # on ranks holding the same shard (replicas), different between the shards of one replica
    "mesh": dict(zip(frozen[0].device_mesh.mesh_dim_names, frozen[0].device_mesh.shape))
    if isinstance(frozen[0], DTensor)
    else {},
    "local_sum": sum(float((p.to_local() if isinstance(p, DTensor) else p).double().sum()) for p in frozen),
    "fingerprint_calls": len(hashed),
    "fingerprints": trainer.fingerprints,
    "startup_phases": sorted(trainer.startup_seconds),
}
# what this rank's first micro-batch was: its target tokens and layer 0's top-1 expert counts (each rank
# must train on different data, routed differently, for the comparison with one process to mean much)
first = {}
compute_loss = trainer.compute_loss


def recording_compute_loss(model, inputs, *a, **k):
    first.setdefault("targets", int((inputs["labels"][:, 1:] != -100).sum()))
    return compute_loss(model, inputs, *a, **k)


def record_routing(module, args, output):
    first.setdefault("top1", torch.bincount(output[-1][:, 0], minlength=output[0].shape[-1]).tolist())


trainer.compute_loss = recording_compute_loss
layers[0].mlp.gate.register_forward_hook(record_routing)
trainer.train(resume_from_checkpoint=resume)
report["first_targets"], report["first_top1"] = first["targets"], first["top1"]
trainer.save_model()
report["step"] = trainer.state.global_step
routers = [p for p in trainer.model.parameters() if p.requires_grad]
report["router_dtypes"] = sorted({str(p.dtype) for p in routers})
report["router_state_dtypes"] = sorted({str(t.dtype) for p in routers for t in trainer.optimizer.state[p].values()})
report["frozen_dtypes"] = sorted({str(p.dtype) for p in frozen})
report["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print_report(report)
# every rank together, before the interpreter exits (router_tune.training.sharding.end_process_group)
trainer.end_training()
