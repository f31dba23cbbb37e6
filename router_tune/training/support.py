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
from transformers.trainer_callback import ProgressCallback

from router_tune.errors import RouterTuneError
from router_tune.model.fingerprints import identical_expert_groups

logger = logging.getLogger("router_tune.training.trainer")  # one logger for the trainer and its loop support


class RouterTrainingCallback(TrainerCallback):
    """Routing logs every `routing_log_every` steps, a clean stop after SIGINT / SIGTERM, and a stop on
    every rank at once when the data held more malformed records than `max_bad_records`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        last_step = state.global_step >= state.max_steps
        # the final step logs its loss like its routing, so short runs and curves end where training did
        should_log = control.should_log or (last_step and args.logging_strategy != "no")
        every = args.routing_log_every
        if every and (state.global_step % every == 0 or last_step):
            trainer.log_routing()
        # transformers' on_log (run by the routing log) clears should_log: the step's loss log would be lost
        control.should_log = should_log
        interrupted, too_many_bad = any_rank([trainer._interrupted, trainer.bad_records.over_limit()], args.device)
        if too_many_bad:
            raise RouterTuneError(
                f"the training data held more malformed records than max_bad_records ({args.max_bad_records}) "
                f"at step {state.global_step}; the last checkpoint in {args.output_dir} is intact. Fix or remove "
                "them, or raise max_bad_records, and resume."
                + (f" {trainer.bad_records.summary()}." if trainer.bad_records.seen else "")
            )
        if interrupted:
            trainer._interrupted = trainer._interrupted or signal.SIGINT  # the signal reached another rank
            logger.warning("interrupted: saving a checkpoint at step %d and stopping", state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control


class RouterProgressCallback(ProgressCallback):
    """transformers' progress bar with each log written as one readable line instead of a raw dict: a
    training log as `step 40/60: loss 2.442 (lm 2.415, aux 1.094, z 9.393) lr 0.2992`, a routing log as
    its layer means and worst layer (the per-layer values go to the run's trackers and plots)."""

    PARTS = (
        ("lm_loss", "lm"),
        ("aux_loss", "aux"),
        ("overload_loss", "overload"),
        ("twin_loss", "twins"),
        ("z_loss", "z"),
    )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state.global_step, state.max_steps, self.PARTS))


def format_log(logs: dict, step: int, max_steps: int, parts) -> str:
    """One console line for a Trainer log (see RouterProgressCallback)."""
    head = f"step {step}/{max_steps}:"
    if "loss" in logs:
        inner = ", ".join(f"{short} {logs[key]:.4g}" for key, short in parts if key in logs)
        line = f"{head} loss {logs['loss']:.4g}" + (f" ({inner})" if inner else "")
        if "learning_rate" in logs:
            line += f" lr {logs['learning_rate']:.4g}"
        if logs.get("nonfinite_steps"):
            line += f", {logs['nonfinite_steps']} non-finite steps skipped"
        return line
    layers = {k: v for k, v in logs.items() if k.startswith("routing/L")}
    if layers:
        max_load = {k.split("/")[1]: v for k, v in layers.items() if k.endswith("/max_load")}
        worst = max(max_load, key=max_load.get) if max_load else None
        shown = {k: v for k, v in logs.items() if k.startswith("routing/") and k not in layers}
        line = f"{head} routing " + ", ".join(f"{k.removeprefix('routing/')} {v:.4g}" for k, v in shown.items())
        return line + (f"; worst layer {worst} max/mean {max_load[worst]:.3g}" if worst else "")
    shown = {k: v for k, v in logs.items() if k != "total_flos"}
    return f"{head} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


class LossWindow:
    """Sums of the loss parts since the last log, kept on device (no host sync per step).

    Inside a training step the balancing and z terms of a micro-batch are its share of the step's
    value (normalised by the step's tokens on all ranks), so they are summed over ranks and divided
    by the steps; outside a step (`whole=True`) each value is a whole one and they are averaged.
    """

    def __init__(self, overload: bool = False, twins: bool = False):
        self.micro_batches = 0
        self.steps = 0
        # the optional losses logged too (each trained with only when its coefficient is set)
        self.optional = [name for name, on in (("overload_loss", overload), ("twin_loss", twins)) if on]

    def add(self, ce_sum, targets, aux, z, overload=None, twins=None, whole: bool = False):
        device = ce_sum.device
        weight = torch.ones((), device=device) if whole else torch.zeros((), device=device)
        zero = torch.zeros((), device=device)
        optional = [zero if x is None else x.detach() for x in (overload, twins)]
        parts = torch.stack([ce_sum, targets, aux, z, *optional, weight]).float()
        self.sums = parts if self.micro_batches == 0 else self.sums + parts
        self.micro_batches += 1

    def flush(self) -> dict[str, float]:
        """Mean LM, balancing (overload, twin) and z losses of the window over all ranks (a collective:
        every rank calls it)."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        ce, targets, aux, z, overload, twins, whole = sums.tolist()
        norm = whole if whole else float(max(self.steps, 1))
        out = {"lm_loss": ce / max(targets, 1.0), "aux_loss": aux / norm, "z_loss": z / norm}
        out.update(
            {
                name: value / norm
                for name, value in (("overload_loss", overload), ("twin_loss", twins))
                if name in self.optional
            }
        )
        self.micro_batches, self.steps = 0, 0
        return out


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag true on every rank when it is true on any: one all-reduce for all of them (the tensor
    lives on `device`: NCCL needs the GPU)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]
    return list(flags)


@contextlib.contextmanager
def stop_on_signals(trainer):
    """SIGINT / SIGTERM set `trainer._interrupted` to the signal; the callback saves a checkpoint at the end
    of the step and stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer._interrupted = signum  # the exit status says which signal stopped the run (128 + signum)

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
