"""Held-out perplexity and routing statistics of a model (the library side of `router-tune eval`).

Library use (what RouterTrainer does at the start and end of training):

    blocks = build_eval_blocks(parse_sources(args.datasets), tokenizer, args.block_size,
                               eval_fraction=args.eval_fraction, max_blocks=args.eval_max_blocks)
    before = evaluate_model(model, blocks, label="before training")
    ...
    write_report(Path(args.output_dir) / "eval", {"before": before, "after": after})

Perplexity is token-weighted: exp(summed next-token cross-entropy / number of target tokens),
per source and over all sources, on the held-out documents the training pipeline never yields
(data.split.is_heldout). The routing statistics come from the same forward passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from router_tune.data import IGNORE_INDEX, collate_blocks, load_tokenizer
from router_tune.errors import RouterTuneError
from router_tune.io.checkpoint import resolve_checkpoint
from router_tune.io.router_files import ROUTERS_FILE, read_trained_routers
from router_tune.losses.lm_loss import next_token_loss_sum
from router_tune.model.loading import TORCH_DTYPES, describe_moe, load_moe
from router_tune.model.quantize import check_quantization, quantize_model
from router_tune.model.routers import deployed_routers, find_routers, lm_head_as_identity, load_router_state_dict
from router_tune.routing.stats import RoutingStats, RoutingSummary
from router_tune.routing.twins import CALIBRATION_TOKENS, ExpertTwins, measure_twins

SAMPLES = Path(__file__).parent.parent / "assets" / "samples"
DEFAULT_SAMPLES = [
    {"source": "redpajama", "path": str(SAMPLES / "redpajama")},
    {"source": "wizard_vicuna", "path": str(SAMPLES / "wizard_vicuna"), "template": "vicuna_v1.1"},
]
# Tokens per chunk of logits in the cross-entropy: bounds memory at one [chunk, vocab] fp32 tensor.
CE_CHUNK_TOKENS = 4096


@dataclass
class EvalResult:
    """Held-out evaluation of one model.

    Attributes:
        perplexity: {source: ppl, "overall": ppl}, token-weighted.
        loss: {source: mean CE in nats, "overall": ...}.
        tokens: {source: target tokens, "overall": ...} (tokens whose next-token loss was counted).
        routing: routing statistics over the real tokens of the same blocks.
        model: where the model came from (a path, hub id or run description).
        perplexity_fp32_routers: the perplexity with router logits computed in fp32 (as training
            does), measured when the model's dtype is not fp32; `perplexity` is the deployed one.
        twins: the twin expert groups (routing/twins.py) measured on the first held-out tokens of every
            source; `routing.expert_groups` holds the same groups, for the balance within and across them.
    """

    perplexity: dict[str, float]
    loss: dict[str, float]
    tokens: dict[str, int]
    routing: RoutingSummary
    model: str = ""
    blocks: dict[str, int] = field(default_factory=dict)
    perplexity_fp32_routers: dict[str, float] | None = None
    twins: ExpertTwins | None = None

    def balance(self) -> dict[str, float]:
        """Routing means over MoE layers: max_load (1 = balanced), its MaxVio (max_load - 1), token entropy
        (nats), dead experts (sum); with twin groups, max_load within and across them (means over layers)."""
        r = self.routing
        grouped = r.group_balance() or {}
        return {
            "max_load": float(r.max_load.mean()),
            "maxvio": float(r.maxvio().mean()),
            **{key: float(values.mean()) for key, values in grouped.items()},
            "entropy": float(r.token_entropy.mean()),
            "dead": int(r.dead.sum()),
        }

    def layer_balance(self) -> dict[str, list[float]]:
        """Per MoE layer: max_load, maxvio and (with twin groups) within_max_load and across_max_load."""
        r = self.routing
        grouped = r.group_balance() or {}
        return {
            "max_load": np.asarray(r.max_load, dtype=float).tolist(),
            "maxvio": r.maxvio().tolist(),
            **{key: values.tolist() for key, values in grouped.items()},
        }

    def to_dict(self) -> dict:
        """Plain JSON types. `balance` is derived (ignored by from_dict), for readers of report.json."""
        return {
            "model": self.model,
            "perplexity": dict(self.perplexity),
            "loss": dict(self.loss),
            "tokens": dict(self.tokens),
            "blocks": dict(self.blocks),
            "balance": self.balance(),
            "layer_balance": self.layer_balance(),
            "twins": self.twins.to_dict() if self.twins else None,
            "routing": self.routing.to_dict(),
            # the deployed model's figures are `perplexity`; these, with fp32 router logits, beside them
            **({"perplexity_fp32_routers": dict(self.perplexity_fp32_routers)} if self.perplexity_fp32_routers else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        return cls(
            perplexity=dict(data["perplexity"]),
            loss=dict(data["loss"]),
            tokens=dict(data["tokens"]),
            routing=RoutingSummary.from_dict(data["routing"]),
            model=data.get("model", ""),
            blocks=dict(data.get("blocks") or {}),
            perplexity_fp32_routers=data.get("perplexity_fp32_routers"),
            twins=ExpertTwins.from_dict(data["twins"]) if data.get("twins") else None,
        )


@contextlib.contextmanager
def _output_head(model: nn.Module):
    """Yield the frozen LM head with `model(...)` returning hidden states, or None when the head is
    not a bias-free Linear (then the model's own logits are used)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        yield None
        return
    # lm_loss_sum insists on a frozen head (it never computes the head's gradient); nothing
    # is back-propagated here, so freezing it for the duration changes nothing.
    grad = head.weight.requires_grad
    head.weight.requires_grad_(False)
    try:
        with lm_head_as_identity(model) as real_head:
            yield real_head
    finally:
        head.weight.requires_grad_(grad)


def evaluate_model(
    model: nn.Module,
    eval_blocks: dict[str, list[dict]],
    *,
    top_k: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    label: str = "",
    progress: bool = True,
    stored_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Held-out perplexity per source and overall, and routing statistics over the same tokens, of
    the model as it ships: routers rounded to the checkpoint's dtype and run by the architecture's own
    forward, as in an exported checkpoint (`deployed_routers`). When the routers ship in less than fp32,
    the perplexity with fp32 router weights (how training computes them) is measured too and kept in
    `EvalResult.perplexity_fp32_routers`.

    Args:
        model: a loaded (unwrapped) MoE causal LM; put in eval mode, its training flag is restored.
        eval_blocks: {source: blocks} from `build_eval_blocks` (packed blocks without attention_mask).
        top_k: experts per token for the routing statistics (default: the model's).
        batch_size: blocks per forward pass.
        device: where batches go (default: the device of the model's first parameter).
        label: stored as `EvalResult.model`.
        progress: show a tqdm bar over batches.
        stored_dtype: the dtype the checkpoint stores its weights in, when the model computes in another
            (a bf16 checkpoint computed in fp32 on a CPU: `MoeInfo.stored_dtype`); default: the model's.

    Single-process: every caller evaluates all blocks and nothing is reduced across ranks.

    Raises:
        RouterTuneError: no blocks, or a source without a single target token.
    """
    if not eval_blocks or not any(eval_blocks.values()):
        raise RouterTuneError("no evaluation blocks: give at least one source with held-out documents.")
    info = describe_moe(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sources = list(eval_blocks)
    stats = RoutingStats(
        len(info.routers),
        info.num_experts,
        top_k or info.top_k,
        sources=sources,
        device=device,
        layer_ids=info.moe_layers,
    )
    batches = [
        (s, eval_blocks[s][i : i + batch_size]) for s in sources for i in range(0, len(eval_blocks[s]), batch_size)
    ]
    with deployed_routers(model, stored_dtype):
        twins = measure_twins(model, *calibration_batch(eval_blocks, device))
        stats.expert_groups = twins.groups
        loss, tokens = held_out_loss(model, batches, sources, device, stats, progress)
    fp32_routers = None
    if (stored_dtype or info.dtype) != torch.float32:
        fp32_loss, _ = held_out_loss(model, batches, sources, device, None, progress)
        fp32_routers = {k: math.exp(v) for k, v in fp32_loss.items()}
    return EvalResult(
        perplexity={k: math.exp(v) for k, v in loss.items()},
        loss=loss,
        tokens=tokens,
        routing=stats.summary(),
        model=label,
        blocks={s: len(b) for s, b in eval_blocks.items()},
        perplexity_fp32_routers=fp32_routers,
        twins=twins,
    )


def calibration_batch(eval_blocks: dict[str, list[dict]], device, tokens: int = CALIBRATION_TOKENS):
    """The twin measurement's inputs and mask: the first `tokens / sources` positions of each source's
    first block, so that every source is represented."""
    firsts = [blocks[0] for blocks in eval_blocks.values() if blocks]
    width = min(tokens // len(firsts) or 1, *(len(b["input_ids"]) for b in firsts))
    keys = [k for k in ("input_ids", "position_ids", "token_mask", "attention_mask") if k in firsts[0]]
    batch = {k: torch.as_tensor([list(b[k][:width]) for b in firsts], dtype=torch.long, device=device) for k in keys}
    mask = batch.pop("token_mask", None)
    return batch, mask if mask is not None else batch.get("attention_mask")


def held_out_loss(model, batches, sources, device, stats: RoutingStats | None = None, progress: bool = False):
    """Mean next-token CE per source and overall over `batches`, routing statistics into `stats`."""
    ce = {s: torch.zeros((), dtype=torch.float64) for s in sources}
    targets = dict.fromkeys(sources, 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _output_head(model) as head:
            for source, blocks in tqdm(batches, desc="eval", unit="batch", disable=not progress):
                batch = {k: v.to(device) for k, v in collate_blocks(blocks).items()}
                # Packed blocks: position_ids restart per document and no attention_mask / KV cache,
                # so transformers masks across documents (see data/packing.py).
                outputs = model(
                    input_ids=batch["input_ids"],
                    position_ids=batch["position_ids"],
                    use_cache=False,
                    output_router_logits=stats is not None,
                )
                ce[source] += next_token_loss_sum(outputs.logits, head, batch["labels"], CE_CHUNK_TOKENS).double().cpu()
                targets[source] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if stats is not None:
                    # Every block of the batch belongs to this source; its index in `sources` is the id.
                    ids = torch.full(
                        (batch["input_ids"].numel(),), sources.index(source), dtype=torch.long, device=device
                    )
                    stats.update(outputs.router_logits, batch["token_mask"].reshape(-1), ids)
    finally:
        model.train(was_training)
    empty = [s for s in sources if targets[s] == 0]
    if empty:
        raise RouterTuneError(
            f"held-out blocks of {', '.join(empty)} hold no target token (every label is -100): "
            "evaluate more or longer blocks (max_blocks, block_size), add documents, or for chat data "
            "check that the template marks assistant turns."
        )
    loss = {s: float(ce[s]) / targets[s] for s in sources}
    loss["overall"] = float(sum(ce.values())) / sum(targets.values())
    return loss, {**targets, "overall": sum(targets.values())}


def is_run_dir(path: str | Path) -> bool:
    """A router_tune run, checkpoint-N or router delta directory (holds routers.safetensors)."""
    return Path(path, ROUTERS_FILE).is_file()


def load_for_eval(
    model_or_run: str | Path,
    *,
    routers: str | Path | None = None,
    dtype="auto",
    quantize: str = "none",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tokenizer: str | Path | None = None,
    device_map=None,
):
    """Load a model to evaluate: a checkpoint directory or hub id, or a router_tune run.

    Args:
        model_or_run: a model directory / hub id, or a run directory, one of its checkpoint-N
            directories or a router delta (routers.safetensors + router_tune.json): then the source
            model recorded in router_tune.json (`source_dir`, else `source_model`) is loaded and the
            trained routers are copied in.
        routers: a routers.safetensors file or run directory whose routers replace the model's.
        dtype: weights dtype for a plain model; a run loads in its recipe's `model_dtype`.
        quantize: none (full precision: what export writes and users deploy), nf4 or int8 (the frozen
            weights quantized as in a quantized training run).
        tokenizer: where the tokenizer is, when not in the checkpoint (default: the run's
            `tokenizer_name_or_path`, else the checkpoint's own).
        device_map: where the weights load (`from_pretrained`'s): a device, or "auto" over all GPUs.

    Returns:
        (model, tokenizer, MoeInfo, label): label says what was loaded, for reports.

    Raises:
        RouterTuneError: missing path, not a supported MoE, routers that do not fit the model.
    """

    trained, label = None, str(model_or_run)
    source: str | Path = model_or_run
    if is_run_dir(model_or_run):
        trained = read_trained_routers(model_or_run)
        source = trained.source_dir()
        dtype = TORCH_DTYPES.get(trained.fingerprints_dtype, "auto")
        step = trained.meta.get("global_step")
        label = f"{model_or_run} (routers{f' at step {step}' if step is not None else ''} on {trained.source_model})"
    elif not Path(str(model_or_run)).expanduser().exists() and str(model_or_run).startswith((".", "/", "~")):
        raise RouterTuneError(
            f"{model_or_run} does not exist: pass a model directory, a hub id, or a router_tune "
            "run directory (it holds routers.safetensors and router_tune.json)."
        )
    # Quantized layers live on one device: the one --device named, else the GPU if there is one.
    single = isinstance(device_map, str) and device_map != "auto"
    device = device_map if single else ("cuda" if torch.cuda.is_available() else "cpu")
    check_quantization(quantize, device)  # before any weight loads
    # `auto` on a CPU without native bf16 computes a bf16 checkpoint in fp32 (as training does): the same
    # weights, and evaluate_model(stored_dtype=info.stored_dtype) rounds the routers as export stores them
    model, info = load_moe(
        source,
        dtype=dtype,
        compute_device=device,
        device_map=device_map,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    for extra in (trained, read_trained_routers(routers) if routers is not None else None):
        if extra is not None:
            load_router_state_dict(model, extra.tensors)
    if routers is not None:
        label += f" + routers {routers}"
    if quantize != "none":
        quantize_model(model, quantize, device=device)  # the whole model ends on `device`
        label += f" ({quantize}-quantized)"
    return model, tokenizer_of(model_or_run, trust_remote_code, tokenizer), info, label


@contextlib.contextmanager
def forced_routing(model: nn.Module, experts: int | Sequence[int]):
    """Send every token of every MoE layer to `experts` with equal weights (the other top-k slots get
    weight 0): one expert is the oracle that routes a domain to the expert fine-tuned on it; several
    (at most top-k) are e.g. a domain's near-twin experts shared evenly, a balanced oracle."""
    chosen = [experts] if isinstance(experts, int) else [int(e) for e in experts]

    def force(module, args, output):
        logits, scores, indices = output
        top_k, num_experts = indices.shape[-1], logits.shape[-1]
        if not 0 < len(chosen) <= top_k or len(set(chosen)) < len(chosen):
            raise RouterTuneError(f"forced routing needs 1 to {top_k} distinct experts, got {chosen}")
        if not all(0 <= e < num_experts for e in chosen):
            raise RouterTuneError(f"forced routing to experts {chosen}, but the model has {num_experts}")
        fill = [e for e in range(num_experts) if e not in chosen][: top_k - len(chosen)]
        indices = torch.tensor(chosen + fill, device=indices.device).expand_as(indices)
        scores = torch.zeros_like(scores)
        scores[..., : len(chosen)] = 1.0 / len(chosen)
        return logits, scores, indices

    handles = [ref.module.register_forward_hook(force) for ref in find_routers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def evaluate_oracle(
    model: nn.Module,
    eval_blocks: dict[str, list[dict]],
    expert_of_source: dict[str, int | Sequence[int]],
    *,
    top_k: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Held-out perplexity when each source is routed to its own expert (`expert_of_source`; a list of
    experts shares each token evenly among them, see `forced_routing`).

    Returns {"perplexity": {source..., "overall"}, "experts": expert_of_source}: the upper bound
    that router training on a domain-expert merge approaches.
    """
    missing = sorted(set(eval_blocks) - set(expert_of_source))
    if missing:
        raise RouterTuneError(
            f"no oracle expert given for source(s) {', '.join(missing)}: pass every source, "
            "e.g. --oracle code=0,python_docs=1"
        )
    losses, tokens = {}, {}
    for source, blocks in eval_blocks.items():
        with forced_routing(model, expert_of_source[source]):
            result = evaluate_model(
                model, {source: blocks}, top_k=top_k, batch_size=batch_size, label=f"oracle {source}", progress=False
            )
        losses[source], tokens[source] = result.loss[source], result.tokens[source]
    total = sum(tokens.values())
    perplexity = {s: math.exp(loss) for s, loss in losses.items()}
    perplexity["overall"] = math.exp(sum(losses[s] * tokens[s] for s in losses) / total)
    return {"perplexity": perplexity, "experts": dict(expert_of_source)}


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    """Raise unless both tokenizers turn text into the same ids (one set of blocks serves both models)."""
    probe = "Hello world! USER: 2 + 2 = ? ASSISTANT: def f(x):\n    return x  # é ü 中文"
    same = (
        a.get_vocab() == b.get_vocab()
        and a(probe, add_special_tokens=True)["input_ids"] == b(probe, add_special_tokens=True)["input_ids"]
        and (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (b.bos_token_id, b.eos_token_id, b.pad_token_id)
    )
    if not same:
        raise RouterTuneError(
            f"{name_a} and {name_b} do not share a tokenizer (different vocabulary, special tokens "
            "or encoding), so they cannot be evaluated on the same blocks. Compare models built "
            "from the same base, e.g. a run and its source model."
        )


def tokenizer_of(model_or_run: str | Path, trust_remote_code: bool, tokenizer: str | Path | None = None):
    """The tokenizer of a model or run: `tokenizer` when given, a run's `tokenizer_name_or_path`, else
    the checkpoint's own (a clear error when it has none, see data.load_tokenizer)."""
    if tokenizer is None and is_run_dir(model_or_run):
        trained = read_trained_routers(model_or_run)
        tokenizer = (trained.meta.get("recipe") or {}).get("tokenizer_name_or_path") or trained.source_dir()
    if tokenizer is None:
        tokenizer = resolve_checkpoint(model_or_run, trust_remote_code=trust_remote_code)
    return load_tokenizer(tokenizer, trust_remote_code)
