"""Loss-free balancing (training/loss_free.py): a selection-only bias per expert and layer on the router
logits, moved after each optimizer step from the global batch's expert counts; kept in checkpoints and
resumed exactly, equal on two ranks and on one, never seen by evaluation or export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from router_tune.model.loading import load_moe
from router_tune.model.routers import find_routers, routers_to_fp32, set_selection_bias
from router_tune.training.loss_free import LossFreeBalancing
from tests.cli_runs import free_port
from tests.trainers import make_trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("fixture", ["mixtral_legacy", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_bias_moves_the_choice_only_and_only_in_training(fixture, request):
    model, info = load_moe(request.getfixturevalue(fixture), device_map="cpu", compute_device="cpu")
    routers_to_fp32(model)
    bias = torch.zeros(len(info.routers), info.num_experts)
    set_selection_bias(model, bias)
    model.train()
    x = torch.randn(64, info.hidden_size, generator=torch.Generator().manual_seed(0))
    for ref in find_routers(model):
        stock = type(ref.module).__mro__[1].forward  # the architecture's own router
        expected = stock(ref.module, x)
        for got, want in zip(ref.module(x), expected):  # zero bias: exactly the stock router
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    bias[:, -1] = 100.0  # in place: every router sees it at the next forward
    for ref in find_routers(model):
        logits, weights, indices = ref.module(x)
        assert (indices == info.num_experts - 1).any(dim=-1).all()  # the biased expert is always chosen
        probs = torch.softmax(logits.float(), dim=-1).gather(-1, indices)  # the unbiased probabilities
        if info.normalizes_topk:
            probs = probs / probs.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(weights, probs)
        ref.module.eval()  # evaluation never sees the bias
        for got, want in zip(ref.module(x), type(ref.module).__mro__[1].forward(ref.module, x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_update_moves_each_expert_against_its_load(mixtral_legacy):
    model, _ = load_moe(mixtral_legacy, device_map="cpu", compute_device="cpu")
    routers_to_fp32(model)
    balancing = LossFreeBalancing(model, rate=0.001, device="cpu")
    balancing.update(torch.tensor([[30.0, 10.0, 20.0, 20.0], [0.0, 0.0, 40.0, 40.0]]))
    expected = torch.tensor([[-0.001, 0.001, 0.0, 0.0], [0.001, 0.001, -0.001, -0.001]])
    torch.testing.assert_close(balancing.bias, expected)
    router = find_routers(model)[1].module
    assert router.selection_bias.tolist() == [0.0] * 4  # the routers see the bias at the next step's set_step
    balancing.set_step(0, 10)
    assert router.selection_bias.tolist() == balancing.bias[1].tolist()  # a view of `applied`


def test_proportional_update_follows_the_relative_load_error(mixtral_legacy):
    """b_i += u (mean - load_i) / mean: loads 30, 10, 20, 20 (mean 20) move by -0.5u, +0.5u, 0, 0; a layer
    with no routed token does not move."""
    model, _ = load_moe(mixtral_legacy, device_map="cpu", compute_device="cpu")
    balancing = LossFreeBalancing(model, rate=0.1, device="cpu", update="proportional")
    balancing.update(torch.tensor([[30.0, 10.0, 20.0, 20.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(balancing.bias, torch.tensor([[-0.05, 0.05, 0.0, 0.0], [0.0] * 4]))
    balancing.update(torch.tensor([[0.0, 80.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]))  # mean 20: errors 1, -3, 1, 1
    torch.testing.assert_close(balancing.bias, torch.tensor([[0.05, -0.25, 0.1, 0.1], [0.0] * 4]))
    with pytest.raises(ValueError, match="loss_free_update"):
        LossFreeBalancing(model, rate=0.1, device="cpu", update="signum")


def test_twin_scope_balances_each_expert_against_its_group(mixtral_legacy):
    """Groups {0, 1}, {2}, {3} in layer 0 and {0, 2}, {1, 3} in layer 1: loads 30, 10, 20, 40 move experts 0 and 1
    toward their group's 20 and leave the twinless 2 and 3 alone; the layer's mean (25) would move every one."""
    model, _ = load_moe(mixtral_legacy, device_map="cpu", compute_device="cpu")
    groups = [[[0, 1], [2], [3]], [[0, 2], [1, 3]]]
    counts = torch.tensor([[30.0, 10.0, 20.0, 40.0], [30.0, 10.0, 20.0, 40.0]])
    twins = LossFreeBalancing(model, rate=0.1, device="cpu", update="proportional", groups=groups)
    twins.update(counts)
    # layer 1: {0, 2} mean 25 -> -0.2 u, +0.2 u; {1, 3} mean 25 -> +0.6 u, -0.6 u
    torch.testing.assert_close(twins.bias, torch.tensor([[-0.05, 0.05, 0.0, 0.0], [-0.02, 0.06, 0.02, -0.06]]))
    layer = LossFreeBalancing(model, rate=0.1, device="cpu", update="proportional")
    layer.update(counts)
    torch.testing.assert_close(layer.bias, torch.tensor([[-0.02, 0.06, 0.02, -0.06]] * 2))
    with pytest.raises(ValueError, match="1 layers of expert groups for 2 routers"):
        LossFreeBalancing(model, rate=0.1, device="cpu", groups=groups[:1])


def test_resume_restores_the_bias_and_the_switch_loss_is_not_trained(mixtral_legacy, tmp_path):
    """4 steps straight, and 2 + 2 resumed from checkpoint-2 with a 500x larger Switch coefficient: the same
    routers and bias, bit for bit (a lost bias routes steps 3-4 differently; a trained Switch loss moves them)."""
    kw = dict(steps=4, batch=2, balancing="loss_free", loss_free_rate=0.05, save_steps=2, routing_log_every=0)
    whole = make_trainer(mixtral_legacy, tmp_path / "whole", router_aux_loss_coef=0.01, **kw)
    whole.train()
    whole.save_model()
    saved = json.loads((tmp_path / "whole" / "checkpoint-2" / "router_tune.json").read_text())["selection_bias"]
    assert any(any(row) for row in saved)  # the resumed run must restore a bias that has moved
    resumed = make_trainer(mixtral_legacy, tmp_path / "resumed", router_aux_loss_coef=5.0, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    resumed.save_model()
    assert torch.equal(resumed.loss_free.bias, whole.loss_free.bias)
    a, b = (
        load_file(tmp_path / "whole" / "routers.safetensors"),
        load_file(tmp_path / "resumed" / "routers.safetensors"),
    )
    assert a.keys() == b.keys() == {n for r in find_routers(whole.model) for n in r.param_names}  # no bias tensor
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)
    meta = json.loads((tmp_path / "whole" / "router_tune.json").read_text())
    assert meta["selection_bias"] == whole.loss_free.state()


def test_two_cpu_processes_equal_one(mixtral_legacy, tmp_path):
    """Uneven tokens per rank, 2 ranks x 2 micro-batches vs one process on the 8-block global batch: the bias
    moves with the counts of the whole global batch, so routers and bias agree."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    script = str(ROOT / "tests" / "ddp_script.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "recipes/accelerate/cpu-ddp.yaml"), "--main_process_port", str(free_port())]
    runs = {"two": launch + [script, str(mixtral_legacy), str(tmp_path / "two"), "2", "2", "sparse", "loss_free"]}
    runs["one"] = [sys.executable, script, str(mixtral_legacy), str(tmp_path / "one"), "8", "1", "sparse", "loss_free"]
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    bias = {n: json.loads((tmp_path / n / "router_tune.json").read_text())["selection_bias"] for n in runs}
    assert bias["one"] == bias["two"] and any(any(row) for row in bias["one"])
    a, b = load_file(tmp_path / "two" / "routers.safetensors"), load_file(tmp_path / "one" / "routers.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_counts_and_statistics_follow_the_biased_choice(mixtral_legacy, tmp_path):
    """A bias of 100 on experts 0 and 1 sends every token there (top-2 of 4): the step's counts, which move
    the bias, and the logged loads must be those of the biased choice, not of the plain softmax."""
    rate = 0.01
    trainer = make_trainer(
        mixtral_legacy, tmp_path / "run", steps=1, batch=2, balancing="loss_free", loss_free_rate=rate,
        routing_log_every=1,
    )  # fmt: skip
    trainer.loss_free.bias[:, :2] = 100.0
    trainer.train()
    expected = torch.tensor([[100.0 - rate, 100.0 - rate, rate, rate]] * trainer.loss_free.bias.shape[0])
    torch.testing.assert_close(trainer.loss_free.bias, expected)
    load = torch.as_tensor(trainer.telemetry.last_summary.load)
    torch.testing.assert_close(load, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * load.shape[0]).to(load.dtype))


def test_fade_scale_falls_linearly_over_the_last_share_of_the_steps():
    from router_tune.training.loss_free import fade_scale

    assert [fade_scale(s, 8, 0.5) for s in range(8)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [fade_scale(s, 8, 0.0) for s in range(8)] == [1] * 8
    assert [fade_scale(s, 4, 1.0) for s in range(4)] == [1, 0.75, 0.5, 0.25]


def test_distillation_gradient_pulls_the_softmax_toward_the_biased_one():
    """d KL(softmax(l + b) || softmax(l)) / d l = (softmax(l) - softmax(l + b)) / tokens, per layer, averaged over
    layers; padding tokens contribute nothing."""
    from router_tune.losses.balancing import bias_distillation_loss

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    bias = torch.tensor([[0.5, -0.5, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1])
    bias_distillation_loss(logits, bias, mask).backward()
    for layer, row in zip(logits, bias):
        expected = (torch.softmax(layer, -1) - torch.softmax(layer + row, -1)).detach() * mask[:, None] / 5 / 2
        torch.testing.assert_close(layer.grad, expected)
    zero = [x.detach().requires_grad_() for x in logits]
    assert bias_distillation_loss(zero, torch.zeros_like(bias), mask).item() == pytest.approx(0.0, abs=1e-12)


def test_fade_scales_the_routers_bias_and_trains_the_distillation_only_in_it(mixtral_legacy, tmp_path):
    """6 steps, fade 0.5: the routers choose with the whole bias for steps 0-2, then 1, 2/3, 1/3 of it; the
    distillation term enters the loss from step 3 on (a run with coefficient 0 agrees until then only)."""
    kw = dict(steps=6, batch=2, balancing="loss_free", loss_free_rate=0.05, loss_free_fade=0.5, routing_log_every=0)
    seen = []
    runs = {}
    for coef in (0.0, 5.0):
        trainer = make_trainer(mixtral_legacy, tmp_path / f"c{coef}", loss_free_distill_coef=coef, **kw)
        if coef:
            original = trainer.compute_loss

            def spy(*a, trainer=trainer, original=original, **k):
                seen.append(
                    (
                        trainer.state.global_step,
                        trainer.loss_free.scale,
                        torch.equal(trainer.loss_free.applied, trainer.loss_free.bias * trainer.loss_free.scale),
                    )
                )
                return original(*a, **k)  # fmt: skip

            trainer.compute_loss = spy
        trainer.train()
        runs[coef] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [(s, round(x, 4)) for s, x, _ in seen] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 0.6667), (5, 0.3333)]
    assert all(ok for *_, ok in seen)
    assert runs[0.0][:3] == runs[5.0][:3] and all(a != b for a, b in zip(runs[0.0][3:], runs[5.0][3:]))


def test_constant_direction_reads_one_on_every_input():
    """With a channel that is 2 on every token, v = e_0 / 2 up to the ridge: x . v = 1 everywhere; mean-zero noise
    alone has no such direction (x . v stays about 0: the residual is about 1)."""
    from router_tune.training.loss_free import constant_direction

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 16, generator=g)
    with_channel = torch.cat([torch.full((4000, 1), 2.0), noise[:, 1:]], dim=1)
    v, residual = constant_direction(with_channel, ridge=1e-9)
    torch.testing.assert_close(v, torch.tensor([0.5] + [0.0] * 15, dtype=torch.float64), atol=1e-6, rtol=0)
    assert residual < 1e-6
    assert constant_direction(noise)[1] > 0.99


def test_fold_moves_the_bias_into_the_router_weights(mixtral_legacy):
    """After the fold, each router's own logits on inputs with a constant channel are its old logits plus the
    bias (the residual of x . v is ~0), and the bias is zero."""
    model, _ = load_moe(mixtral_legacy, device_map="cpu", compute_device="cpu")
    routers = find_routers(model)
    hidden = routers[0].module.weight.shape[1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, hidden, generator=g)
    x[:, 3] = 1.5  # the constant channel
    balancing = LossFreeBalancing(model, rate=0.1, device="cpu")
    balancing.bias.copy_(torch.tensor([[0.5, -0.5, 0.25, -0.25], [1.0, 0.0, 0.0, -1.0]]))
    before = [x @ r.module.weight.detach().T for r in routers]
    bias = balancing.bias.clone()
    residuals = balancing.fold(model, [x, x])
    assert max(residuals) < 1e-3 and not balancing.bias.any() and not balancing.applied.any()
    for layer, r in enumerate(routers):
        torch.testing.assert_close(x @ r.module.weight.detach().T, before[layer] + bias[layer], atol=2e-3, rtol=0)


def test_training_with_the_fold_ends_with_the_bias_in_the_weights(mixtral_legacy, tmp_path):
    """The same 3 steps with and without loss_free_fold: the folded run's routers are the other's plus
    b (x) v, v fitted on the probe blocks' router inputs of the other's final routers, and its bias is zero."""
    from router_tune.training.loss_free import constant_direction
    from router_tune.training.router_lr import probe_router_inputs

    kw = dict(steps=3, batch=2, balancing="loss_free", loss_free_rate=0.05, loss_free_fade=0.0, routing_log_every=0)
    plain = make_trainer(mixtral_legacy, tmp_path / "plain", **kw)
    plain.train()
    folded = make_trainer(mixtral_legacy, tmp_path / "folded", loss_free_fold=True, **kw)
    folded.train()
    assert not folded.loss_free.bias.any() and plain.loss_free.bias.any()
    assert len(folded.run_info()["bias_fold"]["residual_rms"]) == len(folded.moe.routers)
    inputs = [[] for _ in plain.moe.routers]
    probe_router_inputs(plain.model, plain.moe, plain._probe_batches, lambda i, x: inputs[i].append(x.float()))
    for layer, (a, b) in enumerate(zip(find_routers(plain.model), find_routers(folded.model))):
        v, _ = constant_direction(torch.cat(inputs[layer]))
        expected = a.module.weight.detach() + (plain.loss_free.bias[layer].double()[:, None] * v).float()
        torch.testing.assert_close(b.module.weight.detach(), expected, atol=1e-5, rtol=1e-5)
