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

Checkpointing and every override of a private Trainer method live in trainer_overrides.py (with the
check that this transformers release still has them); the steps before the weights load, which the
dry-run plan shares, in preparation.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from router_tune import data
from router_tune.architectures import architecture_for
from router_tune.errors import RouterTuneError
from router_tune.evaluation.evaluate import evaluate_model
from router_tune.evaluation.report import format_comparison, write_report
from router_tune.losses import balancing as losses
from router_tune.losses.lm_loss import next_token_loss_sum
from router_tune.model.fingerprints import FORMAT as FINGERPRINT_FORMAT
from router_tune.model.fingerprints import fingerprints_of
from router_tune.model.frozen_experts import expert_saved_dtype, save_less_for_frozen_experts
from router_tune.model.loading import describe_moe, load_moe
from router_tune.model.quantize import check_quantization, quantize_model
from router_tune.model.routers import (
    RouterLogitsCapture,
    freeze_all_but_routers,
    lm_head_as_identity,
    routers_to_fp32,
)
from router_tune.routing.stats import RoutingStats
from router_tune.routing.telemetry import RoutingTelemetry, format_routing_table, tensorboard_writer
from router_tune.routing.twins import measure_twins, twins_from_fingerprints
from router_tune.training.calibration import calibrate_router_temperature
from router_tune.training.checkpoints import shared_resume
from router_tune.training.config import RouterTuneConfig
from router_tune.training.global_batch import GlobalBatch, model_inputs
from router_tune.training.loss_free import LossFreeBalancing
from router_tune.training.preparation import ModelSource, load_run_tokenizer, model_source, training_data
from router_tune.training.rescale import rescale_routers
from router_tune.training.router_gradient import RouterGradient
from router_tune.training.router_lr import (
    PROBE_BLOCKS,
    describe_router_lrs,
    measure_router_input_l1,
    probe_router_inputs,
    router_input_scales,
    router_param_groups,
)
from router_tune.training.sharding import (
    StartupTimer,
    check_request,
    check_sharded,
    check_wrapped,
    end_process_group,
    load_kwargs,
    on_main_process,
    prepare_zero3,
)
from router_tune.training.support import (
    LossWindow,
    RouterProgressCallback,
    RouterTrainingCallback,
    stop_on_signals,
    warn_identical_experts,
)
from router_tune.training.trainer_overrides import TrainerOverrides, inner_optimizer, warn_on_private_api_changes
from router_tune.training.zero3_saved_views import saved_views_by_reference

logger = logging.getLogger(__name__)


class RouterTrainer(TrainerOverrides, Trainer):
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
        warn_on_private_api_changes()
        # Everything cheap is checked before the weights load: the request, the checkpoint's files and
        # config, the tokenizer, and the first training blocks.
        source = self._check_request(args, model)
        train_dataset, processing_class = self._prepare_data(
            args, source, train_dataset, processing_class, source_names
        )
        data_collator = data_collator or data.collate_blocks
        # the stream's first blocks, read once for the start-up probes and the calibration after the last step
        calibration_blocks = args.router_calibration_blocks if args.router_calibration else 0
        batch_size = max(1, args.per_device_train_batch_size)
        head = data.first_blocks(train_dataset, max(batch_size, PROBE_BLOCKS, calibration_blocks))
        first_blocks = head[:batch_size]
        timer = StartupTimer()
        model = self._load_model(args, source)
        timer.lap("load")
        self._prepare_model(model, args, timer)
        self._prepare_rescaling(model, args, first_blocks, data_collator)
        timer.lap("rescale probe")
        self._probe_router_inputs(model, args, head[:PROBE_BLOCKS], data_collator)
        timer.lap("router input probe")
        self._measure_twins(model, first_blocks, data_collator)
        timer.lap("twin experts")
        # kept for the temperature calibration after the last step (training/calibration.py)
        self._calibration_blocks = head[:calibration_blocks]
        self.router_calibration = None
        self.startup_seconds = timer.report()
        if args.device.type == "cpu":
            args.dataloader_pin_memory = False  # no accelerator to pin for: torch warns on every dataloader
        self._init_trainer(
            model,
            args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            callbacks=[RouterTrainingCallback(self)] + list(callbacks or []),
            **kwargs,
        )
        check_wrapped(self.accelerator, self.backend)
        if self.pop_callback(ProgressCallback) is not None:  # the bar stays, its log lines become readable
            self.add_callback(RouterProgressCallback)
        self._prepare_run_state(args)

    # ---- preparation steps (in the order __init__ takes them) -------------------------------

    def _check_request(self, args: RouterTuneConfig, model) -> ModelSource:
        """What can be checked without reading a weight: quantization support, the backend asked for, the
        checkpoint's files, config and architecture."""
        if args.quantize != "none":  # bitsandbytes installed, mode supported here
            check_quantization(args.quantize, args.device)
        self.backend = check_request(args)
        return model_source(args, model)

    def _prepare_data(self, args, source: ModelSource, train_dataset, tokenizer, source_names):
        """The tokenizer and the training blocks: the recipe's `datasets` (`preparation.training_data`, as
        the dry-run plan builds them) unless a dataset was given."""
        self.source_names: list[str] = list(source_names or [])
        self.bad_records = data.BadRecords(args.max_bad_records)
        if train_dataset is None and args.datasets:
            built = training_data(args, source, tokenizer, self.bad_records)
            self.source_names = built.source_names
            return built.dataset, built.tokenizer
        return train_dataset, tokenizer if tokenizer is not None else load_run_tokenizer(args, source)

    def _load_model(self, args, source: ModelSource):
        """The model, loaded (unless given) with routers found and described in `self.moe`, sharded as the
        backend asks."""
        if source.loaded is None:
            model, self.moe = load_moe(
                source.path,
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
            model, self.moe = source.loaded, describe_moe(source.loaded)
        check_sharded(model, self.backend)
        return model

    def _prepare_model(self, model, args, timer: StartupTimer) -> None:
        """Fingerprint the experts, then routers fp32 and trainable, everything else frozen (and quantized
        when asked), router logits captured, the model's own aux loss off."""
        self.fingerprints = on_main_process(fingerprints_of, model, self.moe.source)
        timer.lap("fingerprints")
        warn_identical_experts(self.fingerprints, self.moe)
        routers_to_fp32(model, jitter=args.router_jitter)
        self.param_counts = freeze_all_but_routers(model)
        # the experts are frozen now: keep less of them for backward
        save_less_for_frozen_experts(
            model, expert_saved_dtype(args.expert_saved_dtype, self.moe.stored_dtype, self.moe.dtype)
        )
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

    def _prepare_rescaling(self, model, args, first_blocks: list[dict], collate) -> None:
        """`router_rescale`, measured on the first training blocks before any step. A ZeRO-3 partitioned model
        runs its forward only inside DeepSpeed's engine, which train() creates: the batch waits for
        `create_scheduler`."""
        self.router_rescaling, self._rescale_batch = [], None
        if args.router_rescale == "off" or not first_blocks:
            return
        if self.backend == "deepspeed":
            self._rescale_batch = collate(first_blocks)
        else:
            self.router_rescaling = rescale_routers(model, self.moe, collate(first_blocks), args.router_rescale)

    def _probe_router_inputs(self, model, args, blocks: list[dict], collate) -> None:
        """The router-input L1 norms behind the logit-unit learning rate (training/router_lr.py): predicted
        from the norm weights, and measured on the first training blocks (after `router_rescale`, which
        changes the mixing below), in micro-batches of the training batch size. A ZeRO-3 model runs forward
        only inside its engine: measured in `create_scheduler`, which then sets the rates."""
        self.router_input_l1 = {"predicted": router_input_scales(model, self.moe), "measured": None}
        batches = data.collate_in_batches(blocks, args.per_device_train_batch_size, collate)
        self._router_input_batches = None
        self._probe_batches = batches  # and the loss-free fold's, at the last step
        if not batches and args.loss_free_fold and args.balancing != "switch":
            raise RouterTuneError("loss_free_fold fits the fold on the first training blocks; this run has none.")
        if not batches:
            return
        if self.backend == "deepspeed":
            self._router_input_batches = batches
        else:
            self.router_input_l1["measured"] = measure_router_input_l1(model, self.moe, batches)

    def _measure_twins(self, model, first_blocks: list[dict], collate) -> None:
        """The twin expert groups the routing logs report balance within and across (routing/twins.py):
        measured on the first training micro-batch by rank 0; from the weights' fingerprints (bit-identical
        experts only) when the experts are sharded and cannot run one by one (measure_twins decides), when
        ZeRO-3's model runs only inside its engine, or without training blocks."""
        if self.backend == "deepspeed" or not first_blocks:
            self.twins = twins_from_fingerprints(self.fingerprints)
            return
        measure = functools.partial(measure_twins, fingerprints=self.fingerprints)
        self.twins = on_main_process(measure, model, *model_inputs(model, collate(first_blocks)))

    def _router_lr_scales(self) -> list[float] | None:
        """Each MoE layer's divisor of learning_rate, as `router_lr_scale` asks (None: no scaling)."""
        mode = self.args.router_lr_scale
        if mode == "none":
            return None
        if mode == "input" and self.router_input_l1["measured"]:
            return self.router_input_l1["measured"]
        return self.router_input_l1["predicted"]  # `predicted`, or a ZeRO-3 run until its engine measured

    def _prepare_run_state(self, args) -> None:
        """Per-run state: routing statistics and telemetry, the loss window, the step's global counts, and
        the counters and results the run fills in."""
        self.routing_stats = RoutingStats(
            len(self.moe.routers),
            self.moe.num_experts,
            self.moe.top_k,
            sources=self.source_names,
            layer_ids=self.moe.moe_layers,
            expert_groups=self.twins.groups,
        )
        self.telemetry = RoutingTelemetry(args.output_dir, args.report_to)
        self._window = LossWindow(overload=bool(args.router_overload_loss_coef), twins=bool(args.router_twin_loss_coef))
        self._twin_ids = self.twins.group_ids() if args.router_twin_loss_coef else None
        if self._twin_ids is not None and not self.twins.has_twins():
            logger.warning(
                "router_twin_loss_coef is set but no layer has twin experts (%s): the twin loss is 0.",
                self.twins.describe(),
            )
        # loss-free balancing: the routers' selection bias, moved after every optimizer step (loss_free.py)
        self.bias_fold = None  # the loss-free fold's residuals, once done
        self.loss_free = (
            LossFreeBalancing(
                self.model,
                args.loss_free_rate,
                args.device,
                fade=0.0 if args.loss_free_fold else args.loss_free_fade,
                update=args.loss_free_update,
                groups=self.twins.groups if args.loss_free_scope == "twins" else None,
            )
            if args.balancing != "switch"
            else None
        )
        self.global_batch = GlobalBatch(
            args.aux_loss_reduce,
            self.moe.top_k,
            across_ranks=args.average_tokens_across_devices,
            step_counts=self.loss_free is not None,
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
        steps = self.args.router_gradient_steps
        self.router_gradient.active = self.args.router_gradient != "sparse" and (
            steps == 0 or self.state.global_step < steps
        )
        with (
            self.router_gradient.updating() if model.training else contextlib.nullcontext(),
            self.router_capture() as router_logits,
            lm_head_as_identity(unwrapped) if self.chunked_ce else contextlib.nullcontext() as head,
            saved_views_by_reference() if self.backend == "deepspeed" else contextlib.nullcontext(),
        ):
            outputs = model(**inputs, use_cache=False)
        ce_sum = next_token_loss_sum(outputs.logits, head, labels, self.args.ce_chunk_tokens)
        mask = token_mask if token_mask is not None else inputs.get("attention_mask")
        mask = mask.reshape(-1) if mask is not None else None

        targets = (labels[:, 1:] != data.IGNORE_INDEX).sum()
        # the routers chose their top-k with it: counts and statistics follow the tokens where they went
        bias = self.loss_free.applied if self.loss_free is not None and model.training else None
        in_step = model.training and num_items_in_batch is not None and self.global_batch.tokens is not None
        if in_step:
            # Every term is normalised by the whole step's (all micro-batches, all ranks) token counts;
            # DDP averages gradients over ranks, so `scale` undoes that average.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            step_targets, step_tokens = num_items_in_batch, self.global_batch.tokens
            counts = self.global_batch.counts_for(router_logits, mask, bias)
        else:  # evaluation, or a caller outside the training loop: this micro-batch alone
            scale, step_targets, step_tokens, counts = 1, targets, None, None
        lm = ce_sum / torch.as_tensor(step_targets, device=ce_sum.device).clamp_min(1)
        aux = losses.load_balancing_loss(
            router_logits, self.moe.top_k, mask, self.args.aux_loss_scope, counts, num_tokens=step_tokens
        )
        # balancing loss_free: the Switch loss is still computed (and logged), not trained with
        balancing = (self.args.router_aux_loss_coef if self.args.balancing != "loss_free" else 0.0) * aux
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
        twins = None
        if self._twin_ids is not None:
            twins = losses.twin_balancing_loss(
                router_logits, self.moe.top_k, self._twin_ids, mask, counts, num_tokens=step_tokens
            )
            balancing = balancing + self.args.router_twin_loss_coef * twins
        z = losses.router_z_loss(router_logits, mask, num_tokens=step_tokens)
        loss = (lm + balancing + self.args.router_z_loss_coef * z) * scale
        lf = self.loss_free
        if in_step and lf is not None and lf.fading(self.state.global_step, self.state.max_steps):
            # the fade: the router weights learn the biased choice the selection bias is leaving them
            distill = losses.bias_distillation_loss(router_logits, lf.bias, mask, num_tokens=step_tokens)
            loss = loss + self.args.loss_free_distill_coef * distill * scale

        if model.training:
            self._window.add(ce_sum.detach(), targets, aux.detach(), z.detach(), overload, twins, whole=not in_step)
            if self.args.routing_log_every:
                with_sources = source_id is not None and self.source_names
                tokens = source_id.repeat_interleave(labels.shape[1]) if with_sources else None
                self.routing_stats.update(router_logits, mask, tokens, selection_bias=bias)
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The stock step batches, plus the step's real-token count for the z and balancing losses (called
        once per optimizer step, before its micro-batches)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.global_batch.begin_step(batch_samples, device)
        self._window.steps += 1
        if self.loss_free is not None:  # the bias this step's routers choose with (faded near the end)
            self.loss_free.set_step(self.state.global_step, self.state.max_steps)
        return batch_samples, num_items_in_batch

    def balancing_step(self, counts: torch.Tensor | None) -> None:
        """After an optimizer step that was taken: loss-free balancing moves its bias against the step's
        expert counts (all micro-batches and ranks: `GlobalBatch.end_step`)."""
        if self.loss_free is not None and counts is not None:
            self.loss_free.update(counts)
            if self.args.loss_free_fold and self.state.global_step == self.state.max_steps - 1:
                self._fold_bias()

    def _fold_bias(self) -> None:
        """The last step's bias into the router weights (loss_free.py: the fold), fitted on the router inputs
        of the probe blocks with the routers as trained. Every rank folds its own copy from the same blocks;
        rank 0's is the one saved (no step follows)."""
        inputs: list[list[torch.Tensor]] = [[] for _ in self.moe.routers]
        model = self.accelerator.unwrap_model(self.model)
        probe_router_inputs(model, self.moe, self._probe_batches, lambda i, x: inputs[i].append(x.float().cpu()))
        residuals = self.loss_free.fold(model, [torch.cat(x) for x in inputs])
        self.bias_fold = {"residual_rms": [round(r, 4) for r in residuals]}
        logger.info("loss-free bias folded into the routers: rms of x.v - 1 per layer %s", self.bias_fold)

    def load_balancing_state(self, meta: dict) -> None:
        """On resume: the balancing state a checkpoint's router_tune.json keeps (global_prev counts, bias)."""
        self.global_batch.load_state(meta.get("balance_counts"), self.args.device)
        if self.loss_free is not None:
            self.loss_free.load_state(meta.get("selection_bias"))

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            # One parameter group per MoE layer with its own rate (training/router_lr.py), through the
            # Trainer's documented `params` override, so optimizer choice and wrapping stay the stock ones.
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = router_param_groups(
                model, self.moe, self.args.learning_rate, self.args.weight_decay, self._router_lr_scales()
            )
            self.optimizer_cls_and_kwargs = (cls, {**kwargs, "params": groups})
            self._log_router_lrs(groups)
        return self.skip_nonfinite_steps(super().create_optimizer(model))

    def _log_router_lrs(self, groups: list[dict]) -> None:
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

    def _measure_router_inputs_in_engine(self, optimizer) -> None:
        """ZeRO-3: the router-input probe, run now that the engine's forward gathers the partitions, and the
        optimizer's per-layer rates set from it before the scheduler reads them."""
        batches = [
            {k: v.to(self.args.device) for k, v in b.items() if torch.is_tensor(v)} for b in self._router_input_batches
        ]
        self._router_input_batches = None
        self.router_input_l1["measured"] = measure_router_input_l1(self.model, self.moe, batches)
        scales = self._router_lr_scales()
        if scales is None:
            return
        scale_of = dict(zip(self.moe.moe_layers, scales))
        for group in optimizer.param_groups:
            if "layer" in group:  # ours (router_param_groups); a scheduler made earlier left initial_lr
                group["lr"] = self.args.learning_rate / scale_of[group["layer"]]
                if "initial_lr" in group:
                    group["initial_lr"] = group["lr"]
        self._log_router_lrs(optimizer.param_groups)

    # ---- logging ---------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window.micro_batches:  # a training log: add the parts of the loss
            logs.update(self._window.flush())
            logs["nonfinite_steps"] = self.nonfinite_steps
        # Streamed data has no epochs: the Trainer's `epoch` would be a meaningless fraction in every log.
        epoch = self.state.epoch
        if not hasattr(self.train_dataset, "__len__"):
            self.state.epoch = None
        try:
            super().log(logs, start_time)
        finally:
            self.state.epoch = epoch

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
        if self.loss_free is not None:  # how far the selection bias has moved: max - min per layer
            spread = (self.loss_free.bias.max(dim=-1).values - self.loss_free.bias.min(dim=-1).values).tolist()
            scalars.update({f"routing/L{layer}/bias_spread": v for layer, v in zip(self.moe.moe_layers, spread)})
            scalars["routing/bias_scale"] = self.loss_free.scale
        self.log(scalars)

    # ---- run description (written with every checkpoint, see TrainerOverrides._save) ---------

    @property
    def sharded(self) -> bool:
        """Weights sharded over ranks (FSDP2 at load time, or accelerate's FSDP / DeepSpeed)."""
        return self.is_fsdp_enabled or self.is_deepspeed_enabled or self.is_distributed_loading_by_transformers

    @property
    def chunked_ce(self) -> bool:
        """Whether the LM loss is the chunked CE through the frozen head (training and the calibration): it reads
        the head as a dense [vocab, hidden] matrix, so sharded (FSDP / DeepSpeed) and quantized heads take the
        plain path on the model's logits instead."""
        return self.args.ce_chunk_tokens > 0 and not (self.sharded or self.args.quantize_head)

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
            # the factor multiplied into every router after the last step (training/calibration.py)
            "router_calibration": self.router_calibration,
            # the expert groups the routing logs report balance within and across
            "twins": {k: v for k, v in self.twins.to_dict().items() if k != "similarity"},
            "bias_fold": self.bias_fold,
            # each layer's peak Adam rate (router_lr_scale input: learning_rate / the input's L1 scale)
            "router_adam_rates": {
                group.get("layer", i): group.get("initial_lr", group["lr"])
                for i, group in enumerate(inner_optimizer(self.optimizer).param_groups if self.optimizer else [])
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
            # balancing loss_free / both: the selection bias [MoE layer][expert] after this step (training state)
            "selection_bias": self.loss_free.state() if self.loss_free is not None else None,
        }

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The stock scheduler; under DeepSpeed, also the first call after `accelerator.prepare` made the
        engine, and before any checkpoint is loaded or step taken: `router_rescale` probes the routers and
        the router-input probe sets the per-layer rates now (the engine's forward gathers the partitions),
        and the engine's checkpoint load is made non-strict (`patch_deepspeed_resume`)."""
        engine = getattr(getattr(self.accelerator, "deepspeed_engine_wrapped", None), "engine", None)
        if engine is not None:
            if self._rescale_batch is not None:
                batch = {k: v.to(self.args.device) for k, v in self._rescale_batch.items() if torch.is_tensor(v)}
                self._rescale_batch = None
                self.router_rescaling = rescale_routers(self.model, self.moe, batch, self.args.router_rescale)
            if self._router_input_batches is not None:
                self._measure_router_inputs_in_engine(optimizer or self.optimizer)
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if engine is None:
            return scheduler
        self.patch_deepspeed_resume(engine)
        return scheduler

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
        before = self._evaluate_held_out(evaluation, "before training") if evaluation else None
        if before is not None and self.telemetry.first_summary is None:
            # the untrained routers are the "start" of the run plots (else the first window is)
            self.telemetry.first_step, self.telemetry.first_summary = 0, before.routing
        with stop_on_signals(self):
            result = super().train(resume_from_checkpoint=resume, **kwargs)
        self._calibrate_routers()
        if evaluation:
            after = self._evaluate_held_out(evaluation, f"step {self.state.global_step}")
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

    def _calibrate_routers(self) -> None:
        """`router_calibration`: one factor for every router's weight, on the first training blocks, with the
        model as export writes it (a loss-free selection bias left at the end is dropped for the measure)."""
        if not self._calibration_blocks or self.state.global_step < self.state.max_steps:
            return  # off, or stopped early (a signal): the run is resumed, and calibrated at its end
        batches = data.collate_in_batches(
            self._calibration_blocks, self.args.per_device_eval_batch_size, self.data_collator
        )
        applied = self.loss_free.applied if self.loss_free is not None else None
        kept = applied.clone() if applied is not None else None
        if applied is not None:
            applied.zero_()
        try:
            self.router_calibration = calibrate_router_temperature(
                self.accelerator.unwrap_model(self.model),
                batches,
                chunked=self.chunked_ce,
                chunk_tokens=self.args.ce_chunk_tokens,
            )
        finally:
            if applied is not None:
                applied.copy_(kept)

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

    def _evaluate_held_out(self, blocks: dict, label: str):
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
