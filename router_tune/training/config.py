"""RouterTuneConfig: every recipe key in one place, validated before any weight is loaded.

A recipe is a YAML file of `RouterTuneConfig` fields (ours below, plus every
`transformers.TrainingArguments` field); any field can be overridden on the command line:

    router-tune train recipes/demo.yaml --learning_rate 3e-4 --max_steps 50
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import SchedulerType

from router_tune.errors import RouterTuneError
from router_tune.training.checkpoints import check_resume_value
from router_tune.training.global_batch import REDUCE_MODES
from router_tune.training.loss_free import BALANCING_MODES, BIAS_SCOPES, BIAS_UPDATES
from router_tune.training.router_lr import LR_SCALES
from router_tune.training.sharding import configure_process_group

# Recipe keys and environment variables whose values must never reach logs, checkpoints,
# wandb or model cards.
SECRET_KEY = re.compile(r"(token|key|secret|password)$", re.IGNORECASE)
ROUTER_GRADIENTS = ("sparse", "dense", "default_moe")
# A logit-unit rate below this is almost certainly a raw Adam rate from an older recipe (the default
# is 1.0), and a raw Adam rate above MAX_RAW_LR almost certainly a logit-unit one.
MIN_LOGIT_LR, MAX_RAW_LR = 0.05, 0.5


@dataclass
class RouterTuneConfig(TrainingArguments):
    """Training arguments for router-only training. Our fields first; the rest are
    `transformers.TrainingArguments` (https://huggingface.co/docs/transformers/main_classes/trainer)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The merged MoE checkpoint: a local directory or a hub id. A relative path (here, in "
            "tokenizer_name_or_path and in datasets) is made absolute from the current directory when it exists "
            "there, else from the recipe's directory or its project root (the one holding its `recipes/` folder), so "
            "shipped recipes run from anywhere. output_dir is relative to the current directory."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The tokenizer, when the checkpoint has none of its own: the directory or hub id of the "
            "model it was merged from (default: the checkpoint's)."
        },
    )
    datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "Training sources, a list of {source, path, weight, ...}: source redpajama, wizard_vicuna, "
            "text or sharegpt; path a hub dataset id or a local file or directory; weight the source's relative "
            "share of training tokens. Optional: name, max_documents, subsets (redpajama), field (text, "
            "sharegpt), roles (sharegpt), template (vicuna_v1.1 or tokenizer) and assistant_only_loss (chat "
            "sources)."
        },
    )
    block_size: int = field(default=1024, metadata={"help": "Tokens per packed training block."})
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Share of whole documents per source held out for evaluation, never trained on."},
    )
    eval_max_blocks: int = field(
        default=64, metadata={"help": "Held-out blocks per source used by the before/after evaluation."}
    )
    eval_before_after: bool = field(
        default=True, metadata={"help": "Evaluate held-out perplexity and routing at the start and end of training."}
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={
            "help": "Training blocks shuffled in a buffer of this many (datasets' IterableDataset.shuffle): "
            "packing cuts a long document into consecutive blocks, which would otherwise fill steps in a "
            "row. 0 = stream order."
        },
    )
    document_shuffle_buffer: int = field(
        default=1000,
        metadata={
            "help": "Documents of each data file shuffled in a buffer of this many before tokenizing, and "
            "the files' order shuffled (same order for the same seed). Data files are often sorted, and "
            "reading them in order trains on a prefix unlike the held-out documents. 0 = file order."
        },
    )
    max_bad_records: int = field(
        default=0,
        metadata={"help": "Malformed data records that may be skipped (counted, reported) before it is an error."},
    )
    router_aux_loss_coef: float = field(
        default=0.01,
        metadata={
            "help": "Weight of the load-balancing loss (Switch form per layer, E * sum_i f_i P_i with f the "
            "share of top-k choices and P the mean probability of expert i; 1.0 = perfectly balanced). Larger "
            "values even out expert loads at some cost in perplexity; 0 = off."
        },
    )
    balancing: str = field(
        default="switch",
        metadata={
            "help": "How expert loads are balanced. switch: the load-balancing loss (router_aux_loss_coef). "
            "loss_free: no balancing loss; a per-expert bias added to each router's logits only to choose the "
            "top-k (the mixing weights stay the unbiased softmax), moved after every optimizer step by "
            "loss_free_rate against the step's expert loads over the whole global batch (arXiv 2408.15664). "
            "The bias is training state: kept in checkpoints, never evaluated or exported. both: the two together.",
            "choices": list(BALANCING_MODES),
        },
    )
    loss_free_rate: float = field(
        default=0.001,
        metadata={
            "help": "balancing loss_free / both: the selection bias change per optimizer step, in logit units, "
            "as loss_free_update applies it."
        },
    )
    loss_free_update: str = field(
        default="sign",
        metadata={
            "help": "balancing loss_free / both: the bias update after each optimizer step. sign: b_i += rate * "
            "sign(mean load - load of expert i), the paper's rule. proportional: b_i += rate * (mean load - load "
            "of expert i) / mean load, a step that grows with the relative load error and shrinks as loads even "
            "out (the paper's variant for softmax gates).",
            "choices": list(BIAS_UPDATES),
        },
    )
    loss_free_scope: str = field(
        default="experts",
        metadata={
            "help": "balancing loss_free / both: what each expert's load is balanced against. experts: the "
            "layer's mean load (the paper's rule). twins: the mean of its twin group (experts whose outputs are "
            "nearly the same, as inspect reports them); experts without a twin keep a zero bias, so the loads "
            "across groups follow the data mix.",
            "choices": list(BIAS_SCOPES),
        },
    )
    loss_free_fade: float = field(
        default=0.25,
        metadata={
            "help": "balancing loss_free / both: the last share of the steps over which the selection bias the "
            "routers choose with fades linearly to zero while loss_free_distill_coef teaches the router weights "
            "the biased choice, so that the exported model (which has no bias) keeps the balance. 0 = no fade: "
            "the export routes without the balance the bias gave."
        },
    )
    loss_free_fold: bool = field(
        default=False,
        metadata={
            "help": "balancing loss_free / both: instead of the fade, fold the selection bias into the router "
            "weights at the last step (W_e += b_e v, with v the direction on which the router inputs of the "
            "first training blocks read about 1, fitted by least squares) and zero it, so that the checkpoint and "
            "the export choose about as the biased routers did (loss_free_fade is then not used). One process "
            "or DDP."
        },
    )
    loss_free_distill_coef: float = field(
        default=1.0,
        metadata={
            "help": "balancing loss_free / both, during the fade: the weight of KL(softmax(logits + bias) || "
            "softmax(logits)) per router, which pulls each router's own choice toward the biased one."
        },
    )
    aux_loss_scope: str = field(
        default="layer",
        metadata={
            "help": "layer: balance each layer, mean over layers. pooled: transformers' formula, all layers pooled.",
            "choices": ["layer", "pooled"],
        },
    )
    aux_loss_reduce: str = field(
        default="global",
        metadata={
            "help": "Where the balancing loss's expert counts f come from. global: summed over data-parallel "
            "ranks and the step's accumulation micro-batches so far (Qwen's global-batch balancing). "
            "global_prev: the previous step's counts over all its micro-batches and ranks (the same f "
            "for a whole step: one all-reduce per step, exact under accumulation). micro: the local "
            "micro-batch's own counts.",
            "choices": list(REDUCE_MODES),
        },
    )
    router_overload_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the overload loss: per layer, the sum over experts of max(0, load/mean - "
            "router_overload_threshold) x mean probability. Zero in layers under the threshold, it pushes tokens "
            "off overloaded experts only. 0 = off (the default). On merges whose routers cannot tell some domains "
            "apart, forcing their tokens off an expert costs perplexity."
        },
    )
    router_overload_threshold: float = field(
        default=1.2,
        metadata={"help": "Load / mean above which an expert counts as overloaded (router_overload_loss_coef)."},
    )
    router_twin_loss_coef: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the twin balancing loss: balance within each group of twin experts (experts whose "
            "outputs are nearly the same, measured at start-up: routing/twins.py) and nowhere else. It moves "
            "tokens between a group's busy and idle twins and leaves each group's share of the tokens to the LM "
            "loss. Adds to the Switch loss (router_aux_loss_coef) or to loss-free balancing. 0 = off (the "
            "default); without twins it is 0."
        },
    )
    router_z_loss_coef: float = field(
        default=0.001, metadata={"help": "Weight of the router z-loss (mean logsumexp^2 of router logits, ST-MoE)."}
    )
    router_jitter: float = field(
        default=0.0, metadata={"help": "Multiplicative uniform noise (1 +- jitter) on router inputs while training."}
    )
    router_rescale: str = field(
        default="auto",
        metadata={
            "help": "Rescale overconfident routers before training, keeping their ranking of experts (a merge "
            "tool's gates were never trained: their confidence is no information, and it slows training, down to "
            "no gradient at all when saturated): auto (every layer whose logits' std over the experts exceeds 1, "
            "down to 1; never up), off (e.g. for routers trained before), or a number: every layer to that std."
        },
    )
    router_calibration: bool = field(
        default=True,
        metadata={
            "help": "After the last step, multiply every router's weight by the one factor t (of 0.5-4) that "
            "gives the lowest LM loss on the first training blocks (t = 1 kept unless another does better). "
            "The top-k experts of every token stay the same, only the mixing weights sharpen or soften. "
            "Checkpoints keep the routers as trained; the final routers (what export reads) carry t, recorded "
            "in router_tune.json (router_calibration). false = the routers exactly as trained."
        },
    )
    router_calibration_blocks: int = field(
        default=16,
        metadata={"help": "Training blocks the calibration measures the LM loss on (one forward pass per factor)."},
    )
    router_lr_scale: str = field(
        default="input",
        metadata={
            "help": "input: learning_rate is in logit units and each layer's routers get learning_rate / s, s the "
            "mean L1 norm of the router's input measured on the first 8 training blocks (Adam moves a logit "
            "by up to rate * ||input||_1 per step, so a raw rate does not transfer across widths). predicted: "
            "the same with s = sqrt(2/pi) * ||g||_1 from the norm weight g before the router (no forward pass; "
            "off on real pretrained models, whose hidden states are not Gaussian). none: learning_rate is "
            "Adam's rate for every router.",
            "choices": list(LR_SCALES),
        },
    )
    router_gradient: str = field(
        default="sparse",
        metadata={
            "help": "What the router learns from experts outside a token's top-k (the forward is unchanged): "
            "sparse (the model's own gradient: nothing), dense (DenseMixer: their real outputs, one extra "
            "no-grad expert forward, which lengthens the forward), default_moe (an EMA of each expert's output "
            "stands in).",
            "choices": list(ROUTER_GRADIENTS),
        },
    )
    router_gradient_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps that use `router_gradient` before switching to sparse (0 = the whole run)."},
    )
    routing_log_every: int = field(
        default=50,
        metadata={
            "help": "Steps between expert-usage logs (histograms, heatmaps, balance scalars); "
            "0 collects no routing statistics at all."
        },
    )
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype for the frozen model: auto (as stored), bfloat16, float16, "
            "float32. Routers always compute in float32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    use_hub_kernels: bool = field(
        default=False,
        metadata={
            "help": "Let transformers replace layers with hub kernels (downloaded code, e.g. the MoE experts' "
            "forward) when the `kernels` package is installed. Off by default: they would run under the routers "
            "being trained, the ZeRO-3 and quantized expert paths, and need the hub."
        },
    )
    quantize: str = field(
        default="none",
        metadata={
            "help": "Frozen weights in 4-bit or 8-bit for one-GPU training (needs router-tune[quant]): nf4 "
            "(experts and attention in NF4, double-quantized scales), int8 (LLM.int8) or none. Routers stay "
            "float32; export still splices them into the original full-precision shards.",
            "choices": ["none", "nf4", "int8"],
        },
    )
    quantize_head: bool = field(
        default=False,
        metadata={
            "help": "Also quantize the LM head (with `quantize`). The loss then takes the plain CE path "
            "(full logits), as the chunked CE reads the head as a dense matrix."
        },
    )
    ce_chunk_tokens: int = field(
        default=256,
        metadata={
            "help": "Tokens per chunk of the LM cross-entropy, so the full logits tensor is never "
            "held: the loss's peak is one chunk of fp32 logits, chunk x vocab x 4 bytes (0 = no chunking)."
        },
    )
    expert_saved_dtype: str = field(
        default="auto",
        metadata={
            "help": "The dtype the frozen experts keep their gate_up output in for backward, the largest "
            "activation of a MoE layer. compute: as computed. bfloat16: rounded to bfloat16 (the forward stays "
            "exact; the gradient through the experts reads the rounded copy). auto: bfloat16 for a 16-bit "
            "checkpoint computed in float32 (model_dtype auto on a CPU without native bfloat16, or float32 asked "
            "for), as a bfloat16 run of it keeps them anyway; else compute.",
            "choices": ["auto", "compute", "bfloat16"],
        },
    )
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "Consecutive steps with a non-finite loss that stop the run (each is skipped)."}
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "Allow loading pickle (.bin) weights. Pickle can execute code: trust the source."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code shipped inside the checkpoint to run."}
    )

    # TrainingArguments fields whose defaults are wrong for router training (TRL's SFTConfig does the same).
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: batches carry `source_id` for the source x expert matrix."}
    )
    ddp_find_unused_parameters: bool = field(
        default=False, metadata={"help": "Routers are used on every step, so DDP needs no unused-parameter search."}
    )
    learning_rate: float = field(
        default=1.0,
        metadata={
            "help": "Peak learning rate. With router_lr_scale input (the default) or predicted in logit units: about "
            "how far one step can move a token's router logits, the same on any width (each layer's Adam rate "
            "is this / s, s the L1 norm of the router's input). With router_lr_scale none, Adam's rate."
        },
    )
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a fraction of max_steps if < 1."})
    logging_steps: float = field(default=10, metadata={"help": "Steps between loss logs."})
    save_steps: float = field(default=100, metadata={"help": "Steps between router-only checkpoints."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept (oldest removed)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "wandb, tensorboard, all or none."})

    def __post_init__(self):
        configure_process_group(self)  # before TrainingArguments set up devices (DeepSpeed on a CPU)
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        own = inspect.get_annotations(RouterTuneConfig)  # our keys (transformers checks its own)
        problems = [
            f"`{f.name}` must be one of {', '.join(f.metadata['choices'])}, got {getattr(self, f.name)!r}."
            for f in fields(self)
            if f.name in own and "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]
        ]
        if not self.model_name_or_path:
            problems.append("`model_name_or_path` is missing: set it to a merged MoE directory or hub id.")
        if self.block_size <= 1:
            problems.append(f"`block_size` must be at least 2 tokens, got {self.block_size}.")
        if self.shuffle_buffer < 0:
            problems.append(f"`shuffle_buffer` must be >= 0 blocks (0 = stream order), got {self.shuffle_buffer}.")
        if self.document_shuffle_buffer < 0:
            problems.append(
                "`document_shuffle_buffer` must be >= 0 documents (0 = file order), "
                f"got {self.document_shuffle_buffer}."
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"`eval_fraction` must be in [0, 1), got {self.eval_fraction}.")
        for name in (
            "router_aux_loss_coef",
            "router_overload_loss_coef",
            "router_twin_loss_coef",
            "router_z_loss_coef",
            "router_jitter",
        ):
            if getattr(self, name) < 0:
                problems.append(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.router_overload_threshold < 1.0:
            problems.append(
                f"`router_overload_threshold` must be >= 1.0 (1.0 = every expert over the mean load is "
                f"overloaded), got {self.router_overload_threshold}."
            )
        if not self.loss_free_rate > 0:
            problems.append(f"`loss_free_rate` must be > 0 (the bias step in logit units), got {self.loss_free_rate}.")
        if not 0.0 <= self.loss_free_fade <= 1.0:
            problems.append(f"`loss_free_fade` is a share of the steps in [0, 1], got {self.loss_free_fade}.")
        if self.loss_free_distill_coef < 0:
            problems.append(f"`loss_free_distill_coef` must be >= 0, got {self.loss_free_distill_coef}.")
        if self.router_lr_scale not in LR_SCALES:
            pass  # reported with the other keys outside their choices
        elif self.router_lr_scale != "none" and self.learning_rate < MIN_LOGIT_LR:
            problems.append(
                f"`learning_rate` {self.learning_rate:g} is read in logit units (router_lr_scale: "
                f"{self.router_lr_scale}), where {self.learning_rate:g} barely moves a router (the default is "
                "1.0). If it is an Adam rate from an older recipe, add `router_lr_scale: none`; else raise it."
            )
        elif self.router_lr_scale == "none" and self.learning_rate > MAX_RAW_LR:
            problems.append(
                f"`learning_rate` {self.learning_rate:g} is Adam's raw rate here (router_lr_scale: none) and would "
                "throw the routers around: values in logit units need `router_lr_scale: input` (the default)."
            )
        if self.router_gradient_steps < 0:
            problems.append(f"`router_gradient_steps` must be >= 0 (0 = every step), got {self.router_gradient_steps}.")
        if self.router_rescale not in ("auto", "off"):
            try:
                if float(self.router_rescale) <= 0:
                    raise ValueError
            except ValueError:
                problems.append(
                    f"`router_rescale` must be auto, off or a positive number, got {self.router_rescale!r}."
                )
        if self.router_calibration_blocks < 1:
            problems.append(
                f"`router_calibration_blocks` must be >= 1 (set `router_calibration: false` to skip the "
                f"calibration), got {self.router_calibration_blocks}."
            )
        if self.quantize_head and self.quantize == "none":
            problems.append("`quantize_head: true` needs `quantize: nf4` or `int8`.")
        if self.routing_log_every < 0:
            problems.append(f"`routing_log_every` must be >= 0 (0 = off), got {self.routing_log_every}.")
        if self.datasets is not None and (not isinstance(self.datasets, list) or not self.datasets):
            problems.append(
                "`datasets` must be a non-empty list of sources, e.g. [{source: redpajama, path: DIR, weight: 0.7}]."
            )
        try:
            # where checkpoints are written: other machines may lack it and get rank 0's (shared_resume)
            if os.environ.get("RANK", "0") == "0":
                check_resume_value(self.resume_from_checkpoint, self.output_dir)
        except RouterTuneError as err:
            problems.append(str(err))
        if problems:
            raise RouterTuneError(" ".join(problems))

    def public_dict(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict with every secret removed (for run files, wandb, model cards)."""
        return redact_secrets(self.to_dict())


def redact_secrets(value: Any) -> Any:
    """Drop every key that looks like a secret (`*_token`, `*_key`, ...) at any depth."""
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def config_field_names() -> list[str]:
    return [f.name for f in fields(RouterTuneConfig) if f.init and not f.name.startswith("_")]


def _check_keys(keys, origin: str) -> None:
    valid = set(config_field_names())
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = (
                f" Did you mean `{close[0]}`?"
                if close
                else " See docs/recipe-keys.md (or `router-tune train --help`) for the full list."
            )
            raise RouterTuneError(f"unknown key `{key}` in {origin}.{hint}")


def _cli_keys(argv: list[str]) -> list[str]:
    return [a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")]


def resolve_recipe_paths(recipe: dict, recipe_path: Path) -> None:
    """Make the recipe's model, tokenizer and data paths work from any directory. A relative path that
    exists from the current directory is made absolute; else, if it exists relative to the recipe's directory
    or to its project root (the directory holding the `recipes/` folder the recipe is in), that path is used.
    Absolute, the run file and the model card name what was loaded wherever they are read. Anything else
    (a hub id, a path that exists nowhere) is left for the checks that name it. output_dir stays relative
    to the current directory."""
    here = recipe_path.absolute().parent
    bases = [Path.cwd(), here] + [d.parent for d in (here, *here.parents) if d.name == "recipes"][:1]

    def resolve(value):
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        found = next((base / value for base in bases if (base / value).exists()), None)
        return str(found) if found else value

    for key in ("model_name_or_path", "tokenizer_name_or_path"):
        if key in recipe:
            recipe[key] = resolve(recipe[key])
    for entry in recipe.get("datasets") or []:
        if isinstance(entry, dict) and "path" in entry:
            entry["path"] = resolve(entry["path"])


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = (), **kwargs: Any) -> RouterTuneConfig:
    """Read a recipe YAML, apply `--key value` command-line overrides and keyword overrides.

    Raises:
        RouterTuneError: missing or malformed file, unknown key (naming the closest valid one),
            invalid value.
    """
    recipe: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RouterTuneError(
                f"recipe {path} does not exist. Pass the path of a YAML file, e.g. recipes/demo.yaml."
            )
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RouterTuneError(f"recipe {path} is not valid YAML: {err}") from None
        if not isinstance(recipe, dict):
            raise RouterTuneError(f"recipe {path} must be a mapping of keys to values, got {type(recipe).__name__}.")
        _check_keys(recipe, f"recipe {path}")
        resolve_recipe_paths(recipe, path)
        recipe.setdefault("output_dir", str(Path("runs") / path.stem))
    _check_keys(_cli_keys(list(overrides)), "the command line")
    _check_keys(kwargs, "the arguments")
    recipe.update(kwargs)

    parser = HfArgumentParser(RouterTuneConfig)
    parser.set_defaults(**recipe)
    try:
        (config,) = parser.parse_args_into_dataclasses(list(overrides), look_for_args_file=False)
    except SystemExit as exit_:
        raise RouterTuneError(
            f"invalid command-line override in {' '.join(overrides)} (see the message above)."
        ) from exit_
    except (ValueError, TypeError) as err:
        raise RouterTuneError(str(err)) from None
    return config
