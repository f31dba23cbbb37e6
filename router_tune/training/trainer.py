"""RouterTrainer: a `transformers.Trainer` that trains only the routers of a frozen MoE.

    from router_tune import RouterTrainer, load_recipe
    trainer = RouterTrainer(args=load_recipe("recipes/demo.yaml"))
    trainer.train()
    trainer.end_training()  # under `accelerate launch`: process group down, every rank together, before exit

What it changes in the stock Trainer (everything else — accelerate launch, gradient
accumulation, mixed precision, DeepSpeed/FSDP, progress bars, `report_to` — is inherited):
- model set-up: all but the routers frozen, routers in fp32, the model's own aux loss off;
- the router gradient: `router_gradient` dense / default_moe adds what unselected experts would
  have contributed to the router's gradient, the forward unchanged (router_gradient.py);
- `compute_loss`: CE / global target tokens + aux_coef * aux + z_coef * z, without the
  stock path's inflation of a model-added aux loss by world size and accumulation
  (transformers #48690), and the CE computed chunk-wise from hidden states (losses/lm_loss.py);
- routing statistics per micro-batch, logged every `routing_log_every` steps;
- checkpoints hold the routers (+ optimizer, scheduler, RNG, trainer state) only;
- non-finite gradients skip their optimizer step; SIGINT / SIGTERM save and stop cleanly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from router_tune import data
from router_tune.architectures import architecture_for
from router_tune.errors import RouterTuneError
from router_tune.evaluation.evaluate import evaluate_model
from router_tune.evaluation.report import format_comparison, write_report
from router_tune.io.checkpoint import resolve_checkpoint
from router_tune.io.router_files import TrainedRouters, read_trained_routers, write_router_delta
from router_tune.losses import balancing as losses
from router_tune.losses.lm_loss import next_token_loss_sum
from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
from router_tune.model.fingerprints import fingerprints_of
from router_tune.model.loading import describe_moe, load_moe
from router_tune.model.quantize import check_quantization, quantize_model
from router_tune.model.routers import (
    RouterLogitsCapture,
    freeze_all_but_routers,
    lm_head_as_identity,
    load_router_state_dict,
    router_state_dict,
    routers_to_fp32,
)
from router_tune.routing.stats import RoutingStats
from router_tune.routing.telemetry import RoutingTelemetry, format_routing_table, tensorboard_writer
from router_tune.training.checkpoints import mark_complete, shared_resume
from router_tune.training.config import RouterTuneConfig
from router_tune.training.global_batch import GlobalBatch
from router_tune.training.rescale import rescale_routers
from router_tune.training.router_gradient import RouterGradient
from router_tune.training.router_lr import (
    describe_router_lrs,
    measure_router_input_l1,
    router_input_scales,
    router_param_groups,
)
from router_tune.training.sharding import (
    StartupTimer,
    check_request,
    check_sharded,
    check_wrapped,
    end_process_group,
    finite_gradients,
    load_kwargs,
    on_main_process,
    prepare_zero3,
)
from router_tune.training.support import LossWindow, RouterTrainingCallback, stop_on_signals, warn_identical_experts
from router_tune.training.zero3_saved_views import saved_views_by_reference

logger = logging.getLogger(__name__)


class RouterTrainer(Trainer):
    """Router-only training of a Mixtral / Qwen2-MoE / Qwen3-MoE model.

    Args:
        model: a loaded MoE model, a path or hub id, or None to load `args.model_name_or_path`.
        args: the `RouterTuneConfig` (a `TrainingArguments`).
        train_dataset: blocks with `input_ids`, `labels` and optionally `attention_mask`,
            `position_ids`, `token_mask`, `source_id`; built from `args.datasets` when None.
        source_names: names of the `source_id` values of a given train_dataset (for the
            source x expert matrix).
        processing_class: the tokenizer; read from the model directory when None.
        Other arguments are those of `transformers.Trainer`.

    Raises:
        RouterTuneError: the model is not a supported MoE, data or recipe problems.
    """

    def __init__(
        self,
        model=None,
        args: RouterTuneConfig | None = None,
        train_dataset=None,
        processing_class=None,
        data_collator=None,
        callbacks=None,
        source_names=None,
        **kwargs,
    ):
        if args is None:
            raise RouterTuneError(
                "RouterTrainer needs `args`: a RouterTuneConfig, e.g. load_recipe('recipes/demo.yaml')."
            )
        # Everything cheap is checked before the weights load: quantization support, the checkpoint's
        # files and config, the tokenizer, and the first training blocks.
        if args.quantize != "none":  # bitsandbytes installed, mode supported here
            check_quantization(args.quantize, args.device)
        source = model if model is not None and not isinstance(model, (str, os.PathLike)) else None
        self.backend = check_request(args)
        if source is None:
            path = resolve_checkpoint(
                model or args.model_name_or_path,
                allow_pickle=args.allow_pickle,
                trust_remote_code=args.trust_remote_code,
            )
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
            architecture_for(model_config)
        else:
            path, model_config = source.config._name_or_path, source.config
        if processing_class is None:
            processing_class = data.load_tokenizer(args.tokenizer_name_or_path or path, args.trust_remote_code)
        self.source_names: list[str] = list(source_names or [])
        self.bad_records = data.BadRecords(args.max_bad_records)
        if train_dataset is None and args.datasets:
            specs = data.parse_sources(args.datasets)
            data.check_block_size(args.block_size, model_config)
            self.source_names = data.source_names(specs)
            train_dataset = data.build_train_dataset(
                specs,
                processing_class,
                args.block_size,
                seed=args.seed,
                eval_fraction=args.eval_fraction,
                bad_records=self.bad_records,
                shuffle_buffer=args.shuffle_buffer,
                document_shuffle_buffer=args.document_shuffle_buffer,
            )
        data_collator = data_collator or data.collate_blocks
        first_blocks = data.first_blocks(train_dataset, max(1, args.per_device_train_batch_size))

        timer = StartupTimer()
        if source is None:
            model, self.moe = load_moe(
                path,
                dtype=args.model_dtype,
                compute_device=args.device,
                allow_pickle=args.allow_pickle,
                trust_remote_code=args.trust_remote_code,
                use_hub_kernels=args.use_hub_kernels,
                **load_kwargs(args, self.backend),
            )
            if self.moe.dtype_note:
                logger.warning(self.moe.dtype_note)
        else:
            self.moe = describe_moe(model)
        check_sharded(model, self.backend)
        timer.lap("load")
        self.fingerprints = on_main_process(fingerprints_of, model, self.moe.source)
        timer.lap("fingerprints")
        warn_identical_experts(self.fingerprints, self.moe)
        routers_to_fp32(model, jitter=args.router_jitter)
        self.param_counts = freeze_all_but_routers(model)
        if self.backend == "deepspeed":  # partitioned later, by accelerator.prepare in train()
            prepare_zero3(model, architecture_for(model.config).block_class())
        # after fingerprinting and counting, which describe the real weights (export checks them)
        self.quantization = (
            quantize_model(model, args.quantize, device=args.device, head=args.quantize_head)
            if args.quantize != "none"
            else None
        )
        self.router_capture = RouterLogitsCapture(model)
        self.router_gradient = RouterGradient(model, args.router_gradient)
        # We add the balancing loss ourselves, once, with the right scaling.
        model.config.router_aux_loss_coef = 0.0
        model.config.output_router_logits = False

        self.router_rescaling, self._rescale_batch = [], None
        if args.router_rescale != "off" and first_blocks:
            # measured on the first training blocks, before any step; a ZeRO-3 partitioned model runs its
            # forward only inside DeepSpeed's engine, which train() creates (see create_scheduler)
            if self.backend == "deepspeed":
                self._rescale_batch = data_collator(first_blocks)
            else:
                self.router_rescaling = rescale_routers(
                    model, self.moe, data_collator(first_blocks), args.router_rescale
                )
        timer.lap("rescale probe")
        # The router-input L1 norms the logit-unit learning rate assumes, and what they measure on the
        # first blocks (a ZeRO-3 model runs forward only inside its engine: not measured there).
        self.router_input_l1 = {"predicted": router_input_scales(model, self.moe), "measured": None}
        if first_blocks and self.backend != "deepspeed":
            self.router_input_l1["measured"] = measure_router_input_l1(model, self.moe, data_collator(first_blocks))
        timer.lap("router input probe")
        self.startup_seconds = timer.report()

        callbacks = [RouterTrainingCallback(self)] + list(callbacks or [])
        if args.device.type == "cpu":
            args.dataloader_pin_memory = False  # no accelerator to pin for: torch warns on every dataloader
        # The stock Trainer refuses checkpoints of a model sharded at load time because it cannot save
        # its optimizer state; ours gathers the (router-only) optimizer state itself, see
        # `_save_optimizer_and_scheduler`, so the refusal is passed for the construction only.
        save_only_model = args.save_only_model
        args.save_only_model = save_only_model or getattr(model, "is_distributed_loading_by_transformers", False)
        try:
            super().__init__(
                model=model,
                args=args,
                train_dataset=train_dataset,
                processing_class=processing_class,
                data_collator=data_collator,
                callbacks=callbacks,
                **kwargs,
            )
        finally:
            args.save_only_model = save_only_model
        check_wrapped(self.accelerator, self.backend)
        # compute_loss already normalises over the whole accumulated, all-rank batch.
        self.loss_is_scaled_for_ga = True
        self.routing_stats = RoutingStats(
            len(self.moe.routers),
            self.moe.num_experts,
            self.moe.top_k,
            sources=self.source_names,
            layer_ids=self.moe.moe_layers,
        )
        self.telemetry = RoutingTelemetry(args.output_dir, args.report_to)
        self._window = LossWindow(overload=bool(args.router_overload_loss_coef))
        self.global_batch = GlobalBatch(
            args.aux_loss_reduce, self.moe.top_k, across_ranks=args.average_tokens_across_devices
        )
        self.nonfinite_steps = 0
        self._nonfinite_in_a_row = 0
        self._interrupted = False  # the signal (SIGINT / SIGTERM) that stopped the run, once one did
        self.report: Path | None = None  # report.json of the before/after evaluation, once written
        self.plots: list[Path] = []  # the run's PNGs, once training ended

    # ---- loss ----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        source_id = inputs.pop("source_id", None)
        # Packed blocks mark real tokens in `token_mask` (an attention_mask would switch off
        # transformers' packed-sequence masking, see data/packing.py); padded batches in attention_mask.
        token_mask = inputs.pop("token_mask", None)
        unwrapped = self.accelerator.unwrap_model(model)
        # The chunked CE reads the head as a dense [vocab, hidden] matrix: sharded (FSDP / DeepSpeed)
        # and quantized heads take the plain path instead.
        chunked = self.args.ce_chunk_tokens > 0 and not (self.sharded or self.args.quantize_head)
        steps = self.args.router_gradient_steps
        self.router_gradient.active = self.args.router_gradient != "sparse" and (
            steps == 0 or self.state.global_step < steps
        )
        with (
            self.router_gradient.updating() if model.training else contextlib.nullcontext(),
            self.router_capture() as router_logits,
            lm_head_as_identity(unwrapped) if chunked else contextlib.nullcontext() as head,
            saved_views_by_reference() if self.backend == "deepspeed" else contextlib.nullcontext(),
        ):
            outputs = model(**inputs, use_cache=False)
        ce_sum = next_token_loss_sum(outputs.logits, head, labels, self.args.ce_chunk_tokens)
        mask = token_mask if token_mask is not None else inputs.get("attention_mask")
        mask = mask.reshape(-1) if mask is not None else None

        targets = (labels[:, 1:] != data.IGNORE_INDEX).sum()
        in_step = model.training and num_items_in_batch is not None and self.global_batch.tokens is not None
        if in_step:
            # Every term is normalised by the whole step's (all micro-batches, all ranks) token counts;
            # DDP averages gradients over ranks, so `scale` undoes that average.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            step_targets, step_tokens = num_items_in_batch, self.global_batch.tokens
            counts = self.global_batch.counts_for(router_logits, mask)
        else:  # evaluation, or a caller outside the training loop: this micro-batch alone
            scale, step_targets, step_tokens, counts = 1, targets, None, None
        lm = ce_sum / torch.as_tensor(step_targets, device=ce_sum.device).clamp_min(1)
        aux = losses.load_balancing_loss(
            router_logits, self.moe.top_k, mask, self.args.aux_loss_scope, counts, num_tokens=step_tokens
        )
        balancing = self.args.router_aux_loss_coef * aux
        overload = None
        if self.args.router_overload_loss_coef:
            overload = losses.overload_loss(
                router_logits,
                self.moe.top_k,
                self.args.router_overload_threshold,
                mask,
                counts,
                num_tokens=step_tokens,
            ).mean()
            balancing = balancing + self.args.router_overload_loss_coef * overload
        z = losses.router_z_loss(router_logits, mask, num_tokens=step_tokens)
        loss = (lm + balancing + self.args.router_z_loss_coef * z) * scale

        if model.training:
            self._window.add(ce_sum.detach(), targets, aux.detach(), z.detach(), overload, whole=not in_step)
            if self.args.routing_log_every:
                with_sources = source_id is not None and self.source_names
                tokens = source_id.repeat_interleave(labels.shape[1]) if with_sources else None
                self.routing_stats.update(router_logits, mask, tokens)
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The stock step batches, plus the step's real-token count for the z and balancing losses."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.global_batch.begin_step(batch_samples, device)
        self._window.steps += 1
        return batch_samples, num_items_in_batch

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            # One parameter group per MoE layer with its own rate (training/router_lr.py), through the
            # Trainer's documented `params` override, so optimizer choice and wrapping stay the stock ones.
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = router_param_groups(
                model, self.moe, self.args.learning_rate, self.args.weight_decay, self.args.router_lr_scale
            )
            self.optimizer_cls_and_kwargs = (cls, {**kwargs, "params": groups})
            # logs report the recipe's learning_rate (logit units), not the first layer's Adam rate
            self._lr_log_factor = self.args.learning_rate / groups[0]["lr"]
            if self.router_input_l1["measured"] and self.is_world_process_zero():
                logger.info(
                    "router learning rates (learning_rate %g in logit units, router_lr_scale %s):\n%s",
                    self.args.learning_rate,
                    self.args.router_lr_scale,
                    describe_router_lrs(
                        self.moe.moe_layers,
                        [g["lr"] for g in groups],
                        self.router_input_l1["predicted"],
                        self.router_input_l1["measured"],
                    ),
                )
        optimizer = super().create_optimizer(model)
        inner_step = optimizer.step

        def step(*args, **kwargs):
            """Skip updates whose gradients are not finite (a non-finite loss anywhere in the step).

            Checked on the gradients, once per optimizer step: under DDP they are already
            all-reduced, so a NaN on one rank is a NaN on every rank and all ranks skip together,
            with no extra collective and no host sync per micro-batch."""
            self.global_batch.end_step()
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads and finite_gradients(grads, partitioned=self.is_deepspeed_enabled):
                self._nonfinite_in_a_row = 0
                return inner_step(*args, **kwargs)
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

    # ---- logging ---------------------------------------------------------------------------

    def _get_learning_rate(self) -> float:
        return super()._get_learning_rate() * getattr(self, "_lr_log_factor", 1.0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window.micro_batches:  # a training log: add the parts of the loss
            logs.update(self._window.flush())
            logs["nonfinite_steps"] = self.nonfinite_steps
        super().log(logs, start_time)

    def end_training(self) -> None:
        """Finish the trackers and take a launched run's process group down, every rank together
        (`end_process_group`): call it after a successful `train()`, before the process exits.

        The wandb run the Trainer's WandbCallback started (or joined) is finished here: left open, a
        later `wandb.init` in the same process returned it instead of a new run, and at a loaded exit its
        offline file was never written (both seen in the tests)."""
        wandb = sys.modules.get("wandb")
        if self.is_world_process_zero() and getattr(wandb, "run", None) is not None:
            wandb.finish()
        end_process_group(self.accelerator)

    def log_routing(self) -> None:
        """Reduce the routing statistics over ranks and log them (all ranks must call this)."""
        if self.routing_stats.micro_batches == 0:  # equal on every rank: no collective mismatch
            return
        self.routing_stats.reduce()
        summary = self.routing_stats.summary()
        self.routing_stats.reset()
        if self.is_world_process_zero():  # media (histograms, heatmaps) from the main process only
            scalars = self.telemetry.record(
                summary, self.state.global_step, tb_writer=tensorboard_writer(self.callback_handler.callbacks)
            )
        else:
            scalars = summary.scalars()
        self.log(scalars)

    # ---- router-only checkpoints ----------------------------------------------------------

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

    @property
    def sharded(self) -> bool:
        """Weights sharded over ranks (FSDP2 at load time, or accelerate's FSDP / DeepSpeed)."""
        return self.is_fsdp_enabled or self.is_deepspeed_enabled or self.is_distributed_loading_by_transformers

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
            self.model, _inner(self.optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
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
            self.model, _inner(self.optimizer), state, options=StateDictOptions(full_state_dict=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    def run_info(self) -> dict[str, Any]:
        return {
            "source_model": self.args.model_name_or_path or self.moe.source,
            "source_dir": self.moe.source,
            "architecture": self.moe.architecture,
            "layout": self.moe.layout,
            # what the frozen weights computed in (model_dtype auto on a CPU may differ from the stored dtype)
            "weights_dtype": str(self.moe.dtype).removeprefix("torch."),
            "num_experts": self.moe.num_experts,
            "top_k": self.moe.top_k,
            "moe_layers": self.moe.moe_layers,
            "fingerprints": self.fingerprints,
            "fingerprint_format": FINGERPRINT_FORMAT,
            "global_step": self.state.global_step,
            "nonfinite_steps": self.nonfinite_steps,
            "router_rescaling": self.router_rescaling,
            # each layer's peak Adam rate (router_lr_scale input: learning_rate / the input's L1 scale)
            "router_adam_rates": {
                group.get("layer", i): group.get("initial_lr", group["lr"])
                for i, group in enumerate(_inner(self.optimizer).param_groups if self.optimizer else [])
            },
            # the router-input L1 norms behind those rates: predicted from the norm weights, measured on
            # the first training blocks (router_lr.py)
            "router_input_l1": self.router_input_l1,
            # routers trained against a quantized base; the export is still the full-precision source
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "startup_seconds": self.startup_seconds,
            "trainable_parameters": self.param_counts.trainable,
            "total_parameters": self.param_counts.total,
            "sources": self.source_names,
            "skipped_records": len(self.bad_records.seen),
            "recipe": self.args.public_dict(),
            # aux_loss_reduce global_prev: the last step's expert counts, which the next step balances with
            "balance_counts": self.global_batch.state(),
        }

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint (routers via `_save`, optimizer, scheduler, RNG, trainer state), then the
        marker that says it is complete: a run killed while saving never resumes from a partial one."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            mark_complete(Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        trained = read_trained_routers(resume_from_checkpoint)
        load_router_state_dict(self.accelerator.unwrap_model(model or self.model), trained.tensors)
        self.global_batch.load_state(trained.meta.get("balance_counts"), self.args.device)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The stock scheduler; under DeepSpeed, also the first call after `accelerator.prepare` made
        the engine, and before any checkpoint is loaded or step taken:
        - `router_rescale` probes the routers now (the engine's forward gathers the partitions);
        - `Trainer` resumes a DeepSpeed run with `engine.load_checkpoint(load_module_strict=True)`,
          which fails on a checkpoint without the frozen weights (and it skips `_load_from_checkpoint`):
          the engine's load becomes non-strict, and restores the balancing counts as
          `_load_from_checkpoint` does."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        engine = getattr(getattr(self.accelerator, "deepspeed_engine_wrapped", None), "engine", None)
        if engine is None:
            return scheduler
        if self._rescale_batch is not None:
            batch = {k: v.to(self.args.device) for k, v in self._rescale_batch.items() if torch.is_tensor(v)}
            self._rescale_batch = None
            self.router_rescaling = rescale_routers(self.model, self.moe, batch, self.args.router_rescale)
        if not isinstance(engine.load_checkpoint, functools.partial):
            engine.load_checkpoint = functools.partial(self._load_deepspeed_checkpoint, engine.load_checkpoint)
        return scheduler

    def _load_deepspeed_checkpoint(self, load, checkpoint: str, **kwargs):
        kwargs["load_module_strict"] = False  # the module part holds the routers only
        result = load(checkpoint, **kwargs)
        trained = read_trained_routers(checkpoint)
        self.global_batch.load_state(trained.meta.get("balance_counts"), self.args.device)
        return result

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """The stock `train`, plus the held-out evaluation before and after (eval/report.*),
        the run plots and the routing table at the end.

        `resume_from_checkpoint`: a checkpoint-N directory, or True / "true" / "last" for the latest
        complete checkpoint in output_dir (incomplete ones, left by a kill while saving, are skipped).
        """
        # chosen by rank 0, the only writer of checkpoints; copied to ranks whose disk lacks it
        resume = shared_resume(resume_from_checkpoint, self.args.output_dir)
        evaluation = self._evaluation_blocks()
        # Before super().train(): on resume the checkpoint is loaded inside it, and "before"
        # must describe the source model's routers.
        before = self._evaluate(evaluation, "before training") if evaluation else None
        if before is not None and self.telemetry.first_summary is None:
            # the untrained routers are the "start" of the run plots (else the first window is)
            self.telemetry.first_step, self.telemetry.first_summary = 0, before.routing
        with stop_on_signals(self):
            result = super().train(resume_from_checkpoint=resume, **kwargs)
        if evaluation:
            after = self._evaluate(evaluation, f"step {self.state.global_step}")
            # to wandb / tensorboard beside the curves (Trainer.log: "eval_" keys go under eval/)
            self.log(
                {
                    f"eval_perplexity/{name}/{source}": value
                    for name, result in (("before", before), ("after", after))
                    for source, value in result.perplexity.items()
                }
            )
            if self.is_world_process_zero():
                results = {"before": before, "after": after}
                self.report = write_report(
                    Path(self.args.output_dir) / "eval",
                    results,
                    title=f"router_tune evaluation: {self.args.output_dir}",
                    meta={"global_step": self.state.global_step, **self._evaluated_weights()},
                )
                print(format_comparison(results))
        if self.is_world_process_zero():
            if self.bad_records.seen:
                logger.warning(self.bad_records.summary())
            self.plots = plots = self.telemetry.save_plots(self.state.log_history)
            if self.telemetry.last_summary is not None:
                print(format_routing_table(self.telemetry.last_summary))
            logger.info("plots: %s", ", ".join(str(p) for p in plots))
        return result

    def _evaluated_weights(self) -> dict:
        if self.quantization is None:
            return {}
        return {
            "weights": f"{self.quantization.mode}-quantized, as trained; `router-tune eval {self.args.output_dir}` "
            "evaluates the full-precision model that export writes"
        }

    def _evaluation_blocks(self) -> dict | None:
        """Held-out blocks of the recipe's sources; None when the run has no before/after evaluation.

        Skipped under FSDP / DeepSpeed (sharded weights): run `router-tune eval OUTPUT_DIR` after.
        """
        args = self.args
        if not (args.eval_before_after and args.datasets) or self.sharded:
            return None
        return data.build_eval_blocks(
            data.parse_sources(args.datasets),
            self.processing_class,
            args.block_size,
            eval_fraction=args.eval_fraction,
            max_blocks=args.eval_max_blocks,
            max_bad_records=args.max_bad_records,
        )

    def _evaluate(self, blocks: dict, label: str):
        """Every rank evaluates the same blocks (identical results, no collective to wait on)."""
        return evaluate_model(
            self.accelerator.unwrap_model(self.model),
            blocks,
            top_k=self.moe.top_k,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,  # the training device: the model is already there
            label=label,
            progress=self.is_world_process_zero(),
            # routers rounded as export stores them, also when the checkpoint computes in another dtype
            stored_dtype=self.moe.stored_dtype if self.moe.dtype_note else None,
        )


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
