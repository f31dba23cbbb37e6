"""The parts of RouterTrainer's loop that are not the loss: routing logs on schedule, a clean
stop on SIGINT / SIGTERM, loss-part sums between logs, and the identical-experts warning."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from router_tune.model.fingerprints import identical_expert_groups

logger = logging.getLogger("router_tune.training.trainer")  # one logger for the trainer and its loop support


class RouterTrainingCallback(TrainerCallback):
    """Routing logs every `routing_log_every` steps and a clean stop after SIGINT / SIGTERM."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        every = args.routing_log_every
        if every and (state.global_step % every == 0 or state.global_step >= state.max_steps):
            trainer.log_routing()
        if any_rank(trainer._interrupted, args.device):
            logger.warning("interrupted: saving a checkpoint at step %d and stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control


class LossWindow:
    """Sums of the loss parts since the last log, kept on device (no host sync per step)."""

    def __init__(self):
        self.micro_batches = 0

    def add(self, ce_sum, targets, aux, z):
        if self.micro_batches == 0:
            self.ce, self.targets, self.aux, self.z = ce_sum, targets, aux, z
        else:
            self.ce, self.targets = self.ce + ce_sum, self.targets + targets
            self.aux, self.z = self.aux + aux, self.z + z
        self.micro_batches += 1

    def flush(self) -> dict[str, float]:
        n = self.micro_batches
        out = {
            "lm_loss": (self.ce / self.targets.clamp_min(1)).item(),
            "aux_loss": (self.aux / n).item(),
            "z_loss": (self.z / n).item(),
        }
        self.micro_batches = 0
        return out


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any (the tensor lives on `device`: NCCL needs the GPU)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


@contextlib.contextmanager
def stop_on_signals(trainer):
    """SIGINT / SIGTERM set a flag; the callback saves a checkpoint at the end of the step and stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer._interrupted = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def warn_identical_experts(fingerprints, info) -> None:
    """Say before training when experts are copies: routing among copies changes no output."""
    groups = identical_expert_groups(fingerprints)  # per layer: groups of >= 2 identical experts
    if not any(groups):
        return
    all_same = all(len(layer) == 1 and len(layer[0]) == info.num_experts for layer in groups)
    if all_same and info.normalizes_topk:
        logger.warning(
            "All experts of every layer are identical: router training cannot change this model's "
            "outputs (top-k weights sum to 1), only its load balance."
        )
    else:
        logger.warning("Some layers have identical experts (per layer, groups of expert indices): %s", groups)
