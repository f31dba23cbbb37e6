"""Router losses against formulas written out with loops, and against transformers itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from router_tune.losses.balancing import (
    all_reduce_counts,
    load_balancing_loss,
    overload_loss,
    router_z_loss,
    selection_counts,
    twin_balancing_loss,
)

L, T, E, K = 3, 24, 5, 2


def make_logits(seed: int = 0, tokens: int = T, layers: int = L, experts: int = E, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(tokens, experts, generator=g) * scale).requires_grad_() for _ in range(layers))


def make_mask(seed: int = 1, tokens: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(tokens, generator=g) > 0.3
    mask[0] = True
    return mask


def np_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


def loop_counts_and_probs(layer_logits, k, mask):
    """Selections, probability sums and real-token count of one layer, one token at a time."""
    lg = layer_logits.detach().numpy()
    counts, prob_sum, n = np.zeros(lg.shape[1]), np.zeros(lg.shape[1]), 0
    for t in range(lg.shape[0]):
        if mask is not None and not mask[t]:
            continue
        p = np_softmax(lg[t])
        for e in np.argsort(-p)[:k]:
            counts[e] += 1
        prob_sum += p
        n += 1
    return counts, prob_sum, n


def loop_layer_loss(logits, k, mask=None, counts=None):
    total = 0.0
    for layer, lg in enumerate(logits):
        c, prob_sum, n = loop_counts_and_probs(lg, k, mask)
        if counts is not None:
            c = np.asarray(counts[layer], dtype=np.float64)
        num_experts = len(c)
        f = [c[i] / c.sum() for i in range(num_experts)]
        total += num_experts * sum(f[i] * prob_sum[i] / n for i in range(num_experts))
    return total / len(logits)


def loop_z_loss(logits, mask=None):
    total = 0.0
    for lg in logits:
        values = [
            math.log(sum(math.exp(float(x)) for x in row)) ** 2
            for t, row in enumerate(lg.detach().numpy())
            if mask is None or mask[t]
        ]
        total += sum(values) / len(values)
    return total / len(logits)


@pytest.mark.parametrize("use_mask", [False, True])
def test_layer_scope_matches_loop_formula(use_mask):
    logits, mask = make_logits(), make_mask() if use_mask else None
    got = load_balancing_loss(logits, K, mask)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(loop_layer_loss(logits, K, mask), rel=1e-5)


def test_pooled_matches_transformers_without_padding():
    logits = make_logits(seed=3)
    expected = load_balancing_loss_func(logits, E, K, None)
    torch.testing.assert_close(load_balancing_loss(logits, K, scope="pooled"), expected, rtol=1e-6, atol=0)


def test_pooled_matches_transformers_with_padding():
    batch, seq = 4, 6
    logits = make_logits(seed=4, tokens=batch * seq)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, :2] = 0  # left padding
    attention_mask[2, 4:] = 0  # right padding
    expected = load_balancing_loss_func(logits, E, K, attention_mask)
    got = load_balancing_loss(logits, K, attention_mask.reshape(-1), scope="pooled")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_balanced_routing_scores_exactly_one_for_layer_and_top_k_for_pooled():
    # Token t prefers experts t and t+1 (mod E): every expert gets exactly 2 selections per E tokens.
    rows = [[5.0 if e in (t % E, (t + 1) % E) else float(-e) for e in range(E)] for t in range(4 * E)]
    logits = tuple(torch.tensor(rows) * (layer + 1) for layer in range(L))
    assert load_balancing_loss(logits, K).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss(logits, K, scope="pooled").item() == pytest.approx(K, abs=1e-6)


@pytest.mark.parametrize("scope", ["layer", "pooled"])
def test_padding_changes_nothing(scope):
    logits = make_logits(seed=5)
    g = torch.Generator().manual_seed(9)
    garbage = [torch.randn(7, E, generator=g) * 1e4 for _ in range(L)]
    garbage[0][0, 1] = float("inf")
    garbage[1][2, 0] = float("nan")
    padded = tuple(torch.cat([lg.detach(), junk]).requires_grad_() for lg, junk in zip(logits, garbage))
    mask = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)])

    base_aux, base_z = load_balancing_loss(logits, K, scope=scope), router_z_loss(logits)
    aux, z = load_balancing_loss(padded, K, mask, scope=scope), router_z_loss(padded, mask)
    torch.testing.assert_close(aux, base_aux, rtol=1e-6, atol=0)
    torch.testing.assert_close(z, base_z, rtol=1e-6, atol=0)
    (aux + z).backward()
    for lg in padded:
        assert torch.isfinite(lg.grad).all()
        assert lg.grad[T:].abs().sum() == 0


def test_counts_override_uses_given_counts_for_f_and_local_logits_for_p():
    logits, mask = make_logits(seed=6), make_mask(seed=2)
    other = make_logits(seed=7, tokens=40)
    counts = selection_counts(other, K)  # e.g. the global batch this micro-batch belongs to
    got = load_balancing_loss(logits, K, mask, counts=counts)
    assert got.item() == pytest.approx(loop_layer_loss(logits, K, mask, counts=counts.numpy()), rel=1e-5)
    # The local micro-batch's own counts reproduce the default.
    own = load_balancing_loss(logits, K, mask, counts=selection_counts(logits, K, mask))
    torch.testing.assert_close(own, load_balancing_loss(logits, K, mask), rtol=1e-6, atol=0)
    # Pooled with counts: f_i = k * (sum over layers of counts_i) / total, P pooled over layers.
    pooled = load_balancing_loss(logits, K, mask, scope="pooled", counts=counts)
    c = counts.numpy().astype(np.float64).sum(axis=0)
    prob_sum, n = np.zeros(E), 0
    for lg in logits:
        _, s, n_layer = loop_counts_and_probs(lg, K, mask)
        prob_sum, n = prob_sum + s, n + n_layer
    expected = E * sum(K * c[i] / c.sum() * prob_sum[i] / n for i in range(E))
    assert pooled.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="counts must have shape"):
        load_balancing_loss(logits, K, counts=counts[:1])


def test_z_loss_matches_formula():
    logits, mask = make_logits(seed=8, scale=4.0), make_mask(seed=3)
    assert router_z_loss(logits).item() == pytest.approx(loop_z_loss(logits), rel=1e-5)
    assert router_z_loss(logits, mask).item() == pytest.approx(loop_z_loss(logits, mask), rel=1e-5)


def test_gradients_match_analytic_derivatives():
    """aux (layer): dL/dz_tj = E/(L n) * p_tj * (f_j - sum_i f_i p_ti); z: 2 lse_t p_tj / (L n)."""
    logits, mask = make_logits(seed=10), make_mask(seed=4)
    load_balancing_loss(logits, K, mask).backward()
    aux_grads = [lg.grad.clone() for lg in logits]
    for lg in logits:
        lg.grad = None
    router_z_loss(logits, mask).backward()
    for lg, aux_grad in zip(logits, aux_grads):
        counts, _, n = loop_counts_and_probs(lg, K, mask)
        f = counts / counts.sum()
        for t, row in enumerate(lg.detach().numpy()):
            p = np_softmax(row)
            if not mask[t]:
                expected_aux = expected_z = np.zeros(E)
            else:
                expected_aux = E / (L * n) * p * (f - np.dot(f, p))
                expected_z = 2 * math.log(np.exp(row.astype(np.float64)).sum()) * p / (L * n)
            np.testing.assert_allclose(aux_grad[t].numpy(), expected_aux, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(lg.grad[t].numpy(), expected_z, rtol=1e-4, atol=1e-7)
        assert aux_grad[mask].abs().sum() > 0


def test_selection_counts_count_real_tokens_times_top_k():
    logits, mask = make_logits(seed=11), make_mask(seed=5)
    counts = selection_counts(logits, K, mask)
    assert counts.shape == (L, E) and not counts.requires_grad
    for layer, lg in enumerate(logits):
        expected, _, n = loop_counts_and_probs(lg, K, mask)
        np.testing.assert_array_equal(counts[layer].numpy(), expected)
        assert counts[layer].sum().item() == n * K


def test_all_reduce_counts_is_detached_identity_on_one_process():
    counts = torch.rand(L, E, requires_grad=True)
    out = all_reduce_counts(counts)
    assert not out.requires_grad
    torch.testing.assert_close(out, counts.detach(), rtol=0, atol=0)


def test_all_padding_gives_zero_not_nan_and_bad_scope_raises():
    logits, mask = make_logits(seed=12), torch.zeros(T, dtype=torch.bool)
    for scope in ("layer", "pooled"):
        assert load_balancing_loss(logits, K, mask, scope=scope).item() == 0.0
    assert router_z_loss(logits, mask).item() == 0.0
    with pytest.raises(ValueError, match="scope must be one of"):
        load_balancing_loss(logits, K, scope="global")


def loop_overload(logits, k, threshold, mask=None, counts=None):
    """Per layer: sum over experts of max(0, E * f_i - threshold) * P_i, one token at a time."""
    values = []
    for layer, lg in enumerate(logits):
        c, prob_sum, n = loop_counts_and_probs(lg, k, mask)
        if counts is not None:
            c = np.asarray(counts[layer], dtype=np.float64)
        num_experts = len(c)
        values.append(sum(max(0.0, num_experts * c[i] / c.sum() - threshold) * prob_sum[i] / n for i in range(E)))
    return values


@pytest.mark.parametrize("use_mask", [False, True])
def test_overload_loss_matches_loop_formula(use_mask):
    logits, mask = make_logits(seed=14, scale=2.5), make_mask(seed=7) if use_mask else None
    for threshold in (1.0, 1.2, 1.5):
        got = overload_loss(logits, K, threshold, mask)
        assert got.shape == (L,)
        np.testing.assert_allclose(got.detach().numpy(), loop_overload(logits, K, threshold, mask), rtol=1e-5)
    # counts from elsewhere (the global batch) give f; the local logits give P
    counts = selection_counts(make_logits(seed=15, tokens=40, scale=2.5), K)
    got = overload_loss(logits, K, 1.1, mask, counts=counts)
    np.testing.assert_allclose(got.detach().numpy(), loop_overload(logits, K, 1.1, mask, counts.numpy()), rtol=1e-5)


def test_overload_loss_only_acts_on_overloaded_experts():
    """Zero (and no gradient) in a layer whose experts are all under the threshold; elsewhere the
    gradient lowers the overloaded expert's logits, for every token, and raises every other one's."""
    logits = make_logits(seed=16, layers=2)
    counts = torch.tensor([[10.0, 10.0, 10.0, 9.0, 9.0], [30.0, 4.0, 2.0, 6.0, 6.0]])  # layer 1: expert 0 at 3.125x
    loss = overload_loss(logits, K, 1.2, counts=counts)
    assert loss[0].item() == 0.0 and loss[1].item() > 0.0
    loss.sum().backward()
    assert logits[0].grad.abs().sum() == 0
    assert (logits[1].grad[:, 0] > 0).all() and (logits[1].grad[:, 1:] < 0).all()  # descent moves 0 down


TWIN_GROUPS = [[[0, 3], [1, 4], [2]], [[0, 1, 2], [3], [4]], [[0], [1], [2], [3], [4]]]  # one partition per layer


def group_ids(groups):
    ids = torch.zeros(len(groups), E, dtype=torch.long)
    for layer, partition in enumerate(groups):
        for gid, group in enumerate(partition):
            ids[layer, group] = gid
    return ids


def loop_twin(logits, k, groups, mask=None, counts=None):
    """Mean over (layer, group of 2+) of sum_i (n f_i/F - 1) Q_i, Q_i the mean over real tokens of the group's
    probability times expert i's softmax among the group's logits, one token at a time."""
    terms = []
    for layer, lg in enumerate(logits):
        c, _, n = loop_counts_and_probs(lg, k, mask)
        if counts is not None:
            c = np.asarray(counts[layer], dtype=np.float64)
        f, rows = c / c.sum(), lg.detach().numpy().astype(np.float64)
        for group in groups[layer]:
            if len(group) < 2:
                continue
            share, mass = sum(f[i] for i in group), np.zeros(len(group))
            for t, row in enumerate(rows):
                if mask is None or mask[t]:
                    mass += np_softmax(row)[group].sum() * np_softmax(row[group]) / n
            weights = [len(group) * f[i] / share - 1 if share > 0 else 0.0 for i in group]
            terms.append(float(np.dot(weights, mass)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("use_mask", [False, True])
def test_twin_loss_matches_loop_formula(use_mask):
    logits, mask = make_logits(seed=17, scale=2.5), make_mask(seed=8) if use_mask else None
    got = twin_balancing_loss(logits, K, group_ids(TWIN_GROUPS), mask)
    assert got.item() == pytest.approx(loop_twin(logits, K, TWIN_GROUPS, mask), rel=1e-5)
    counts = selection_counts(make_logits(seed=18, tokens=40, scale=2.5), K)
    counts[0, [0, 3]] = 0.0  # a group that got no selection adds 0
    got = twin_balancing_loss(logits, K, group_ids(TWIN_GROUPS), mask, counts=counts)
    assert got.item() == pytest.approx(loop_twin(logits, K, TWIN_GROUPS, mask, counts.numpy()), rel=1e-5)
    with pytest.raises(ValueError, match="group_of must have shape"):
        twin_balancing_loss(logits, K, group_ids(TWIN_GROUPS)[:2], mask)


def test_twin_loss_moves_probability_between_twins_only():
    """Balanced within every group (however unequal the groups): 0 and no gradient, where the Switch loss
    pushes. A busy twin: the gradient reaches only the group's members, sums to zero over them for every token,
    and a descent step moves probability from the busy twin to its idle one."""
    logits = make_logits(seed=19, layers=1)
    groups = group_ids([[[0, 3], [1, 4], [2]]])

    def step(loss_fn):
        x = logits[0].detach().clone().requires_grad_()
        loss = loss_fn((x,))
        loss.backward()
        return loss.item(), x.grad, x.softmax(-1).mean(0), (x - x.grad).softmax(-1).mean(0)

    within = torch.tensor([[30.0, 5.0, 2.0, 30.0, 5.0]])
    loss, grad, _, _ = step(lambda lg: twin_balancing_loss(lg, K, groups, counts=within))
    assert loss == 0.0 and grad.abs().sum() == 0
    _, grad, _, _ = step(lambda lg: load_balancing_loss(lg, K, counts=within))
    assert grad.abs().max() > 1e-3

    busy = torch.tensor([[50.0, 5.0, 2.0, 10.0, 5.0]])  # expert 0 takes 5/6 of its group's tokens
    loss, grad, before, after = step(lambda lg: twin_balancing_loss(lg, K, groups, counts=busy))
    assert loss > 0 and grad[:, [1, 4, 2]].abs().sum() == 0  # {1, 4} is balanced, 2 has no twin
    torch.testing.assert_close(grad[:, [0, 3]].sum(-1), torch.zeros(T), atol=1e-9, rtol=0)
    assert grad[:, 0].abs().max() > 1e-4
    assert after[0] < before[0] and after[3] > before[3]


def test_no_host_sync(monkeypatch):
    """The per-step paths never pull a value to the host (item, bool, float, tolist, numpy, cpu)."""
    logits, mask = make_logits(seed=13), make_mask(seed=6)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in a per-step path")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = load_balancing_loss(logits, K, mask) + load_balancing_loss(logits, K, mask, scope="pooled")
    loss = loss + router_z_loss(logits, mask)
    loss = loss + load_balancing_loss(logits, K, mask, counts=all_reduce_counts(selection_counts(logits, K, mask)))
    loss = loss + overload_loss(logits, K, 1.2, mask).sum()
    loss = loss + twin_balancing_loss(logits, K, group_ids(TWIN_GROUPS), mask)
    loss.backward()
