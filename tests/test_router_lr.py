"""Router learning rates in logit units: each layer's Adam rate is learning_rate / s, s the L1 norm of
what its router reads, measured on the first training micro-batch (`router_lr_scale: input`) or
predicted as sqrt(2/pi) * ||g||_1 from the norm weight in front of the router (`predicted`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from router_tune import data
from router_tune.errors import RouterTuneError
from router_tune.model.loading import load_moe
from router_tune.model.routers import find_routers, router_state_dict
from router_tune.training.config import load_recipe
from router_tune.training.router_lr import PROBE_BLOCKS, router_input_scales
from tests.trainers import make_trainer

DEMO = Path(__file__).parent.parent / "router_tune" / "assets" / "demo-moe"


def with_uneven_norms(src: Path, out: Path) -> Path:
    """A copy of `src` whose router-input norm weights differ per layer (0.3x, 1x, 3x, ... a random
    positive pattern), so one rate for all layers cannot pass the tests below."""
    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            g = layer.post_attention_layernorm.weight
            g.copy_((0.3 * 10 ** (i % 3) / 2) * (0.5 + torch.rand(g.shape, generator=gen)))
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def expected_scales(model_dir: Path) -> list[float]:
    """sqrt(2/pi) * ||g||_1 per layer, read from the safetensors files (not the loaded model)."""
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in tensors if "post_attention_layernorm" in k})
    return [
        math.sqrt(2 / math.pi) * tensors[f"model.layers.{i}.post_attention_layernorm.weight"].abs().sum().item()
        for i in layers
    ]


def measured_scales(model_dir: Path, batch: dict) -> list[float]:
    """The independent reference for `input`: the mean L1 norm of each layer's post-attention norm output
    (what its router reads) over the real tokens of `batch`, hooked on a fresh load."""
    keep = batch["token_mask"].reshape(-1).bool()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = {}
    for i, layer in enumerate(model.model.layers):
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, i=i: reference.__setitem__(i, out.abs().sum(-1).reshape(-1)[keep].mean().item())
        )
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    return [reference[i] for i in sorted(reference)]


def probe_batch(trainer) -> dict:
    """The blocks the rates are measured on, in one batch (the trainer reads them in micro-batches)."""
    return data.collate_blocks(data.first_blocks(trainer.train_dataset, PROBE_BLOCKS))


def test_scale_predicts_the_real_l1_norm_of_router_inputs():
    """On the demo's trained model and real text, the weight-only formula is within 10% of the mean
    L1 norm of what each router actually reads."""
    model, info = load_moe(DEMO)
    tokenizer = data.load_tokenizer(DEMO)
    specs = data.parse_sources([{"source": "redpajama", "path": str(DEMO.parent / "samples" / "redpajama")}])
    blocks = data.build_eval_blocks(specs, tokenizer, 128, max_blocks=4)
    ids = torch.stack([torch.tensor(b["input_ids"]) for rows in blocks.values() for b in rows])
    measured = {}

    def record(layer):
        def hook(module, args):
            measured[layer] = args[0].detach().abs().sum(-1).mean().item()

        return hook

    handles = [ref.module.register_forward_pre_hook(record(ref.layer)) for ref in info.routers]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    predicted = router_input_scales(model, info)
    assert predicted == pytest.approx(expected_scales(DEMO), rel=1e-5)
    for ref, s in zip(info.routers, predicted):
        assert s == pytest.approx(measured[ref.layer], rel=0.10), (ref.layer, s, measured[ref.layer])


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "qwen2_moe"])
@pytest.mark.parametrize("lr_scale", ["input", "predicted", "none"])
def test_first_adam_step_moves_each_layer_by_its_own_rate(fixture, lr_scale, request, tmp_path):
    """Adam's first step moves every weight with a gradient by its group's rate: so the largest
    change of each layer's routing weights is learning_rate / s_layer (s measured for input, from the
    norm weights for predicted) or learning_rate (none), Qwen2-MoE's shared-expert gate included."""
    model_dir = with_uneven_norms(request.getfixturevalue(fixture), tmp_path / "model")
    lr = 1e-3 if lr_scale == "none" else 0.3
    # adam_epsilon ~0: the first step is then lr * sign(grad) even for the tiny shared-gate gradients
    trainer = make_trainer(model_dir, tmp_path / "run", steps=1, lr=lr, router_lr_scale=lr_scale, adam_epsilon=1e-20)
    before = router_state_dict(trainer.model)
    trainer.train()
    after = router_state_dict(trainer.model)
    scales = {
        "input": measured_scales(model_dir, probe_batch(trainer)),
        "predicted": expected_scales(model_dir),
        "none": None,
    }[lr_scale]
    layer_of = {name: ref.layer for ref in find_routers(trainer.model) for name in ref.param_names}
    for name in before:
        rate = lr / scales[layer_of[name]] if scales else lr
        step = (after[name] - before[name]).abs().max().item()
        assert step == pytest.approx(rate, rel=1e-3), (name, step, rate)
    assert trainer.run_info()["router_adam_rates"][0] == pytest.approx(lr / scales[0] if scales else lr)
    # logs speak the recipe's units, not the first layer's Adam rate
    assert trainer._get_learning_rate() == pytest.approx(lr)


def test_rates_in_the_wrong_units_are_refused(mixtral_legacy, tmp_path):
    common = {"model_name_or_path": str(mixtral_legacy), "output_dir": str(tmp_path), "datasets": []}
    with pytest.raises(RouterTuneError, match="logit units.*router_lr_scale: none"):
        load_recipe(None, learning_rate=1e-3, **common)
    with pytest.raises(RouterTuneError, match="raw rate.*router_lr_scale: input"):
        load_recipe(None, learning_rate=2.0, router_lr_scale="none", **common)
    with pytest.raises(RouterTuneError, match="router_lr_scale"):
        load_recipe(None, router_lr_scale="fan_in", **common)


def test_run_info_records_each_layers_rate_beside_its_measured_input_l1(mixtral_legacy, tmp_path):
    """The trainer measures what each router reads on the first PROBE_BLOCKS training blocks, in micro-batches
    of 3 (the last one shorter), whatever the batch size (real models are not
    Gaussian inside: SmolLM2-135M reads 0.46-0.77 of the predicted L1) and keeps it beside the
    prediction. Reference: the output of each layer's post-attention norm, hooked there, on a fresh load."""
    model_dir = with_uneven_norms(mixtral_legacy, tmp_path / "model")
    trainer = make_trainer(model_dir, tmp_path / "run", steps=1, batch=3)
    recorded = trainer.run_info()["router_input_l1"]
    assert recorded["predicted"] == pytest.approx(expected_scales(model_dir), rel=1e-5)
    assert recorded["measured"] == pytest.approx(measured_scales(model_dir, probe_batch(trainer)), rel=1e-4)
