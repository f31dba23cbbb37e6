"""What is in a MoE checkpoint, and are its routers sane (the library side of `router-tune inspect`).

Everything runs on CPU in inference mode and only reads the checkpoint. `inspect_model`
and `routing_report` return plain JSON-friendly dicts; `commands/inspect.py` prints them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from router_tune.data import load_tokenizer
from router_tune.errors import RouterTuneError
from router_tune.model.fingerprints import expert_fingerprints, identical_expert_groups
from router_tune.model.loading import MoeInfo, load_moe
from router_tune.model.memory import training_memory
from router_tune.model.routers import router_logits_on, router_param_names
from router_tune.routing.stats import group_balance
from router_tune.routing.twins import measure_twins, twins_from_fingerprints

DEFAULT_SAMPLE = Path(__file__).parent.parent / "assets" / "samples" / "inspect_sample.txt"
BUILTIN_SAMPLE = (
    "The river rose overnight and the village council met at dawn to decide whether to open the old flood gates. "
    "def merge_sorted(a, b):\n    out = []\n    while a and b:\n"
    "        out.append(a.pop(0) if a[0] < b[0] else b.pop(0))\n"
    "    return out + a + b\n"
    "USER: Can you explain why the sky is blue? ASSISTANT: Sunlight is scattered by the molecules of the air, "
    "and blue light, with its shorter wavelength, is scattered much more than red light. "
    "In 1687 Newton published the Principia, in which he stated the laws of motion and universal gravitation."
)
SATURATED_TOP1 = 0.9  # mean top-1 probability above which a softmax router no longer mixes experts


def inspect_model(
    path_or_hub_id: str | Path,
    sample_text: str | Path | None = None,
    *,
    max_tokens: int = 512,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tokenizer: str | Path | None = None,
) -> dict:
    """Load a checkpoint on CPU (routers in fp32) and return the full inspection report.

    `tokenizer` names one when the checkpoint has none; without any, the routing statistics on
    sample text are skipped and the report says so."""
    if max_tokens < 2:
        raise RouterTuneError(f"--max-tokens {max_tokens} is too small: routing statistics need at least 2 tokens.")
    text, text_source = _sample(sample_text)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a report, not a download: keep the output clean
    try:
        model, info = load_moe(
            path_or_hub_id,
            device_map="cpu",
            compute_device="cpu",
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        loaded = load_tokenizer(tokenizer, trust_remote_code)
    else:
        try:
            loaded = load_tokenizer(model.config._name_or_path, trust_remote_code)
        except RouterTuneError:  # no tokenizer files: the rest of the report still stands
            loaded = None
    return routing_report(model, info, loaded, text, text_source=text_source, max_tokens=max_tokens)


def _sample(sample_text: str | Path | None) -> tuple[str, str]:
    path = Path(sample_text) if sample_text else (DEFAULT_SAMPLE if DEFAULT_SAMPLE.is_file() else None)
    if path is None:
        return BUILTIN_SAMPLE, "built-in paragraph"
    if not path.is_file():
        raise RouterTuneError(f"sample text {path} does not exist: pass an existing UTF-8 text file to --sample-text.")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise RouterTuneError(f"sample text {path} is empty: pass a file with some text in it.")
    return text, str(path)


def routing_report(
    model, info: MoeInfo, tokenizer=None, text: str | None = None, *, text_source: str = "text", max_tokens: int = 512
) -> dict:
    """The report for an already-loaded model; routing statistics only when a tokenizer and text are given."""
    config = model.config
    router_names = set(router_param_names(model))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(model.get_parameter(n).numel() for n in router_names)
    fingerprints = expert_fingerprints(model)
    groups = identical_expert_groups(fingerprints)
    routing, sample, twins = None, None, twins_from_fingerprints(fingerprints)
    if tokenizer is not None and text:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
        routing = _route(model, ids, info)
        sample = {"source": text_source, "tokens": int(ids.shape[1])}
        twins = measure_twins(model, {"input_ids": ids}, max_tokens=max_tokens)
    if routing:
        balance = group_balance([ly["load"] for ly in routing], twins.groups)
    layers = []
    for i, ref in enumerate(info.routers):
        norms = ref.module.weight.detach().float().norm(dim=1)
        layer = {
            "layer": ref.layer,
            "router_norm": {"mean": _r(norms.mean()), "min": _r(norms.min()), "max": _r(norms.max())},
            "identical_experts": groups[i],
            "twin_groups": twins.groups[i],
            **({"expert_similarity": twins.similarity[i]} if twins.similarity else {}),
        }
        if routing:
            max_load = max(routing[i]["load"]) * info.num_experts
            layer.update(
                routing[i],
                max_load=_r(max_load),
                maxvio=_r(max_load - 1.0),
                within_max_load=_r(balance["within_max_load"][i]),
                across_max_load=_r(balance["across_max_load"][i]),
            )
        layers.append(layer)
    report = {
        "model": {
            "source": info.source,
            "architecture": info.architecture,
            "model_class": info.model_class,
            "layout": info.layout,
            "dtype": str(info.stored_dtype or info.dtype).removeprefix("torch."),
            # what this report computed in here: a bf16 checkpoint runs in fp32 on a CPU without bf16 matmuls
            "computed_in": str(info.dtype).removeprefix("torch."),
            "dtype_note": info.dtype_note,
            "num_layers": info.num_layers,
            "moe_layers": info.moe_layers,
            "num_experts": info.num_experts,
            "top_k": info.top_k,
            "normalizes_topk": info.normalizes_topk,
            "hidden_size": info.hidden_size,
            "vocab_size": config.vocab_size,
        },
        "parameters": {"total": total, "trainable": trainable, "percent": round(100.0 * trainable / total, 4)},
        # training plans for the stored dtype, whatever this CPU computed the report in
        "memory": training_memory(info, total, trainable, config.vocab_size, dtype=info.stored_dtype),
        # the same plan with the frozen weights quantized (recipe key `quantize`), activation checkpointing on
        "memory_quantized": {
            mode: training_memory(
                info,
                total,
                trainable,
                config.vocab_size,
                dtype=info.stored_dtype,
                quantize=mode,
                model=model,
                activation_checkpointing=True,
            )
            for mode in ("nf4", "int8")
        },
        "copied_gates": _copied_gates(info),
        "sample": sample,
        # how twin_groups were found: output cosine on the sample tokens, or bit-identical weights without them
        "twins": {
            "method": twins.method,
            "threshold": twins.threshold,
            "tokens": twins.tokens,
            "description": twins.describe(),
        },  # fmt: skip
        "layers": layers,
    }
    report["findings"] = findings(report)
    return report


def _r(x) -> float:
    return round(float(x), 4)


def _route(model, ids: torch.Tensor, info: MoeInfo) -> list[dict]:
    logits = router_logits_on(model, {"input_ids": ids})
    out = []
    for layer_logits in logits:
        probs = torch.softmax(layer_logits, dim=-1)
        chosen = probs.topk(info.top_k, dim=-1).indices.flatten()
        load = torch.bincount(chosen, minlength=info.num_experts).float() / chosen.numel()
        # in nats, as train's and eval's H(tok): ln E = uniform, 0 = saturated
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        out.append(
            {"top1_prob": _r(probs.max(-1).values.mean()), "entropy": _r(entropy), "load": [_r(x) for x in load]}
        )
    return out


def _copied_gates(info: MoeInfo) -> list[list[int]]:
    """Groups of MoE layers whose gates are bit-identical (mergekit cheap_embed writes one gate everywhere)."""
    groups: list[list[int]] = []
    for ref in info.routers:
        for g in groups:
            if torch.equal(info.routers[info.moe_layers.index(g[0])].module.weight, ref.module.weight):
                g.append(ref.layer)
                break
        else:
            groups.append([ref.layer])
    return [g for g in groups if len(g) > 1]


def findings(report: dict) -> list[str]:
    """Plain-language conclusions from the numbers of a report."""
    m, layers, out = report["model"], report["layers"], []
    e = m["num_experts"]
    if layers and all(ly["identical_experts"] == [list(range(e))] for ly in layers):
        if not m["normalizes_topk"]:
            out.append(
                f"all {e} experts of every layer are identical, but this model does not renormalise its "
                "top-k weights (norm_topk_prob=False): the router still scales each MoE layer's output by "
                "the sum of its top-k probabilities, so router training can change the outputs only "
                "through that scale, not through the choice of expert"
            )
        else:
            tail = "; only the shared-expert gate can change the outputs" if m["architecture"] == "qwen2_moe" else ""
            out.append(
                f"all {e} experts of every layer are identical: router training cannot change this "
                f"model's outputs, only its load balance{tail}"
            )
    else:
        for ly in layers:
            for g in ly["identical_experts"]:
                out.append(
                    f"layer {ly['layer']}: experts {', '.join(map(str, g))} are identical "
                    "(the router cannot tell them apart by their output)"
                )
    twin_layers: dict[tuple[int, ...], list[int]] = {}  # one line per group of twins, with its layers
    for ly in layers:
        for g in ly["twin_groups"]:
            if len(g) > 1 and g not in ly["identical_experts"]:
                twin_layers.setdefault(tuple(g), []).append(ly["layer"])
    for g, where in twin_layers.items():
        out.append(
            f"experts {', '.join(map(str, g))} are twins in layer{'s' if len(where) > 1 else ''} "
            f"{', '.join(map(str, where))} (their outputs on the sample text are far closer than the layer's "
            "typical pair): choosing between them changes little, so their loads should be even"
        )
    copied = report["copied_gates"]
    if copied and copied[0] == m["moe_layers"]:
        out.append(
            "gates of all layers are identical (mergekit cheap_embed): every layer routes on the same "
            "token-embedding direction; router training lets each layer route on its own"
        )
    else:
        out.extend(f"layers {', '.join(map(str, g))} share an identical gate" for g in copied)
    saturated = [ly for ly in layers if ly.get("top1_prob", 0.0) > SATURATED_TOP1]
    if saturated:
        which = ", ".join(str(ly["layer"]) for ly in saturated)
        probs = ", ".join(f"{ly['top1_prob']:.2f}" for ly in saturated)
        many = len(saturated) > 1
        out.append(
            f"{'routers of layers' if many else 'router of layer'} {which} {'are' if many else 'is'} "
            f"saturated (mean top-1 prob {probs}): typical of mergekit `random` gates, the softmax no "
            "longer mixes experts and gives little gradient; consider router rescaling before training"
        )
    for ly in layers:
        dead = [str(i) for i, x in enumerate(ly.get("load", [])) if x == 0.0]
        if dead:
            out.append(
                f"layer {ly['layer']}: expert{'s' * (len(dead) > 1)} {', '.join(dead)} received no token "
                "of the sample text"
            )
    if report["sample"] is None:
        out.append(
            "no tokenizer in the checkpoint: routing statistics on sample text were skipped (name one with --tokenizer)"
        )
    return out or ["no problems found"]
