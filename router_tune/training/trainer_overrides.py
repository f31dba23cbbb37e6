"""Every place RouterTrainer reaches into `transformers.Trainer`'s private API, and the check that it still can.

The stock Trainer has no public hook for what router training changes in checkpoints, so RouterTrainer
overrides private methods (`OVERRIDDEN`), patches two objects the Trainer builds (accelerate's optimizer
`step`, DeepSpeed's `engine.load_checkpoint`) and flips `args.save_only_model` around `Trainer.__init__`.
All of it is here, in `TrainerOverrides` (mixed in before `Trainer`). A transformers release that renames
or re-signs one of these methods would leave our override uncalled, silently: `private_api_problems()`
compares each with the Trainer it runs against, tests/test_trainer_overrides.py fails on any difference,
and RouterTrainer warns at start-up.

What the overrides do:
- checkpoints hold the routers and the run description (`_save`), on every backend (`save_model`), and a
  marker written last says a checkpoint is complete (`_save_checkpoint`); resume reads the routers back
  (`_load_from_checkpoint`);
- on sharded models the router optimizer state is gathered whole (`_save_optimizer_and_scheduler`,
  `_load_optimizer_and_scheduler`); DeepSpeed writes its own checkpoint without the frozen weights and
  resumes it non-strictly (`patch_deepspeed_resume`);
- the logged learning rate is the recipe's, in logit units (`_get_learning_rate`);
- optimizer steps whose gradients are not finite are skipped (`skip_nonfinite_steps`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from router_tune.errors import RouterTuneError
from router_tune.io.router_files import TrainedRouters, read_trained_routers, write_router_delta
from router_tune.model.routers import load_router_state_dict, router_state_dict
from router_tune.training.checkpoints import mark_complete
from router_tune.training.sharding import finite_gradients

logger = logging.getLogger(__name__)

# Private Trainer methods RouterTrainer overrides, or calls, with the parameter names they have in the
# transformers versions router_tune supports.
OVERRIDDEN = {
    "_get_learning_rate": ("self",),
    "_save": ("self", "output_dir", "state_dict"),
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
}
CALLED = {"_get_output_dir": ("self", "trial")}
# Private attributes the Trainer reads, which RouterTrainer sets.
READ_ATTRIBUTES = ("loss_is_scaled_for_ga",)
# What the patches and the flip rely on outside the Trainer class.
DEEPSPEED_LOAD = ("load_checkpoint", "load_module_strict")
DEEPSPEED_SAVE = ("save_checkpoint", "exclude_frozen_parameters")


def _parameters(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def private_api_problems(trainer_cls: type = Trainer, args_cls: type = TrainingArguments) -> list[str]:
    """What no longer matches between `trainer_cls` and the private API RouterTrainer relies on, one
    sentence per method or attribute, each naming it; empty when everything matches.

    Also checks that TrainerOverrides' own overrides keep the signatures they override."""
    problems = []
    for table in (OVERRIDDEN, CALLED):
        for name, expected in table.items():
            method = getattr(trainer_cls, name, None)
            if method is None:
                problems.append(f"transformers.Trainer.{name} no longer exists (RouterTrainer overrides or calls it)")
                continue
            found = _parameters(method)
            if found != expected:
                problems.append(f"transformers.Trainer.{name} now takes {found}, RouterTrainer expects {expected}")
            if name in OVERRIDDEN and _parameters(getattr(TrainerOverrides, name)) != expected:
                problems.append(f"TrainerOverrides.{name} does not take {expected}")
    source = inspect.getsource(trainer_cls)
    for attribute in READ_ATTRIBUTES:
        if attribute not in source:
            problems.append(f"transformers.Trainer no longer reads self.{attribute} (RouterTrainer sets it)")
    if "save_only_model" not in {f.name for f in dataclasses.fields(args_cls)}:
        problems.append("TrainingArguments.save_only_model no longer exists (RouterTrainer flips it)")
    return problems


def deepspeed_api_problems(engine_cls: type) -> list[str]:
    """Like `private_api_problems`, for DeepSpeed's engine (when DeepSpeed is installed)."""
    problems = []
    for method, keyword in (DEEPSPEED_LOAD, DEEPSPEED_SAVE):
        function = getattr(engine_cls, method, None)
        if function is None or keyword not in _parameters(function):
            problems.append(f"DeepSpeedEngine.{method} no longer takes `{keyword}` (RouterTrainer passes it)")
    return problems


def warn_on_private_api_changes() -> None:
    """Say at start-up, once, when this transformers release no longer matches the overrides."""
    for problem in _problems_once():
        logger.warning("%s: router-only checkpoints or logs may be wrong with this transformers release", problem)


@functools.cache
def _problems_once() -> tuple[str, ...]:
    return tuple(private_api_problems())


class TrainerOverrides:
    """The private `transformers.Trainer` overrides of RouterTrainer (`class RouterTrainer(TrainerOverrides,
    Trainer)`). Expects of the trainer: `run_info()`, `sharded`, `global_batch`, `nonfinite_steps`,
    `load_balancing_state(meta)` and `balancing_step(counts)`."""

    def _init_trainer(self, model, args, **kwargs) -> None:
        """`Trainer.__init__`. The stock Trainer refuses checkpoints of a model sharded at load time because it
        cannot save its optimizer state; ours gathers the (router-only) optimizer state itself (see
        `_save_optimizer_and_scheduler`), so the refusal is passed for the construction only."""
        save_only_model = args.save_only_model
        args.save_only_model = save_only_model or getattr(model, "is_distributed_loading_by_transformers", False)
        try:
            super().__init__(model=model, args=args, **kwargs)
        finally:
            args.save_only_model = save_only_model
        # compute_loss already normalises over the whole accumulated, all-rank batch.
        self.loss_is_scaled_for_ga = True

    # ---- logging ---------------------------------------------------------------------------

    def _get_learning_rate(self) -> float:
        return super()._get_learning_rate() * getattr(self, "_lr_log_factor", 1.0)

    # ---- router-only checkpoints -----------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the routers and the run description (a router-only delta) instead of the whole model.

        Every rank gathers the router parameters (a collective when they are sharded); the main
        process writes them."""
        routers = router_state_dict(self.accelerator.unwrap_model(self.model))
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:  # FSDP / DeepSpeed gathered the full state dict for us
            routers = {n: state_dict[n].detach().float().cpu() for n in routers if n in state_dict} or routers
        write_router_delta(output_dir, TrainedRouters(output_dir, output_dir, routers, self.run_info()))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Routers only, on every backend: the stock sharded save would gather the whole model."""
        if self.sharded:
            self._save(output_dir)
        else:
            super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Sharded: the optimizer state (routers only) is gathered whole and written once, so any
        number of ranks can resume from it; the stock save would write rank 0's shard alone.

        DeepSpeed: its own checkpoint of what its optimizer holds (the routers' fp32 partitions and
        their Adam moments, one small file per rank), without the frozen weights' partitions, which
        the stock save writes (the whole model, sharded). Resuming needs the same number of ranks."""
        if self.is_deepspeed_enabled:
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)
            return None
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(
            self.model,
            inner_optimizer(self.optimizer),
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if self.args.should_save:
            torch.save(state, Path(output_dir) / OPTIMIZER_NAME)
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.sharded or self.is_deepspeed_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(Path(checkpoint) / OPTIMIZER_NAME, weights_only=True)
        set_optimizer_state_dict(
            self.model, inner_optimizer(self.optimizer), state, options=StateDictOptions(full_state_dict=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint (routers via `_save`, optimizer, scheduler, RNG, trainer state), then the
        marker that says it is complete: a run killed while saving never resumes from a partial one."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            mark_complete(Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        trained = read_trained_routers(resume_from_checkpoint)
        load_router_state_dict(self.accelerator.unwrap_model(model or self.model), trained.tensors)
        self.load_balancing_state(trained.meta)

    # ---- patches of objects the Trainer builds ---------------------------------------------

    def patch_deepspeed_resume(self, engine) -> None:
        """`Trainer` resumes a DeepSpeed run with `engine.load_checkpoint(load_module_strict=True)`, which fails
        on a checkpoint without the frozen weights (and it skips `_load_from_checkpoint`): the engine's load
        becomes non-strict, and restores the balancing counts as `_load_from_checkpoint` does."""
        if not isinstance(engine.load_checkpoint, functools.partial):
            engine.load_checkpoint = functools.partial(self._load_deepspeed_checkpoint, engine.load_checkpoint)

    def _load_deepspeed_checkpoint(self, load, checkpoint: str, **kwargs):
        kwargs["load_module_strict"] = False  # the module part holds the routers only
        result = load(checkpoint, **kwargs)
        trained = read_trained_routers(checkpoint)
        self.load_balancing_state(trained.meta)
        return result

    def skip_nonfinite_steps(self, optimizer):
        """Replace `optimizer.step` (accelerate's wrapper) by one that skips updates whose gradients are not
        finite (a non-finite loss anywhere in the step), and stops after `max_nonfinite_steps` in a row.

        Checked on the gradients, once per optimizer step: under DDP they are already all-reduced, so a
        NaN on one rank is a NaN on every rank and all ranks skip together, with no extra collective and
        no host sync per micro-batch."""
        inner_step = optimizer.step

        def step(*args, **kwargs):
            counts = self.global_batch.end_step()
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads and finite_gradients(grads, partitioned=self.is_deepspeed_enabled):
                self._nonfinite_in_a_row = 0
                result = inner_step(*args, **kwargs)
                self.balancing_step(counts)  # a skipped step leaves the balancing bias too
                return result
            self.nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
            if self._nonfinite_in_a_row >= self.args.max_nonfinite_steps:
                raise RouterTuneError(
                    f"{self._nonfinite_in_a_row} consecutive steps had a non-finite loss (step "
                    f"{self.state.global_step + 1}); stopping. The last checkpoint in {self.args.output_dir} is "
                    "intact: resume from it with a lower learning_rate, or check the data for empty blocks."
                )
            logger.warning(
                "non-finite loss: optimizer step %d skipped (%d so far)",
                self.state.global_step + 1,
                self.nonfinite_steps,
            )
            return None

        optimizer.step = step
        return optimizer


def inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
