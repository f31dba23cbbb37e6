"""RoutingStats against numpy formulas, and its cross-rank reduction on a real gloo world of 2."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from router_tune.losses.balancing import all_reduce_counts, load_balancing_loss, selection_counts
from router_tune.routing.stats import RoutingStats, RoutingSummary

L, E, K = 3, 6, 2
SOURCES = ["redpajama", "chat", "code"]


def batch(seed: int, tokens: int = 20, pad: int = 5, with_sources: bool = True):
    """Logits [T, E] per layer (padding rows hold huge garbage), mask [T] and source ids [T]."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(tokens, E, generator=g) * 2 for _ in range(L)]
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[tokens - pad :] = False
    for layer in logits:
        layer[tokens - pad :] = torch.randn(pad, E, generator=g) * 1e4
    # Sources 0 and 1 only: source 2 ("code") has no tokens, to pin down its empty row.
    source_ids = torch.randint(0, 2, (tokens,), generator=g) if with_sources else None
    return tuple(logits), mask, source_ids


def np_reference(batches):
    """Every statistic recomputed token by token in float64."""
    counts, prob_sum = np.zeros((L, E)), np.zeros((L, E))
    ent_sum, lse_sum, tokens = np.zeros(L), np.zeros(L), 0
    src_counts = np.zeros((len(SOURCES), L, E))
    for logits, mask, source_ids in batches:
        for t in range(len(mask)):
            if not mask[t]:
                continue
            tokens += 1
            for layer in range(L):
                row = logits[layer][t].double().numpy()
                p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
                for e in np.argsort(-p)[:K]:
                    counts[layer, e] += 1
                    src_counts[int(source_ids[t]), layer, e] += 1
                prob_sum[layer] += p
                ent_sum[layer] += -sum(x * np.log(x) for x in p if x > 0)
                lse_sum[layer] += np.log(np.exp(row).sum())
    return counts, prob_sum, ent_sum, lse_sum, tokens, src_counts


def test_counts_exclude_padding_and_sum_to_tokens_times_top_k():
    stats = RoutingStats(L, E, K, SOURCES)
    batches = [batch(0), batch(1, tokens=13, pad=2)]
    for logits, mask, source_ids in batches:
        stats.update(logits, mask, source_ids)
    counts, *_, tokens, _ = np_reference(batches)
    s = stats.summary()
    assert s.tokens == tokens == 15 + 11
    got = stats._acc["counts"].numpy()
    np.testing.assert_array_equal(got, counts)
    np.testing.assert_array_equal(got.sum(axis=1), np.full(L, tokens * K))


def test_summary_metrics_match_numpy_formulas():
    stats = RoutingStats(L, E, K, SOURCES, layer_ids=[1, 3, 5])
    batches = [batch(2), batch(3, tokens=17, pad=0)]
    for logits, mask, source_ids in batches:
        stats.update(logits, mask, source_ids)
    counts, prob_sum, ent_sum, lse_sum, tokens, src_counts = np_reference(batches)
    s = stats.summary()
    load = counts / counts.sum(axis=1, keepdims=True)
    mean_prob = prob_sum / tokens
    np.testing.assert_allclose(s.load, load, rtol=1e-12)
    np.testing.assert_allclose(s.load.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(s.mean_prob, mean_prob, rtol=1e-5)
    np.testing.assert_allclose(s.token_entropy, ent_sum / tokens, rtol=1e-5)
    np.testing.assert_allclose(s.mean_entropy, [-sum(p * np.log(p) for p in row) for row in mean_prob], rtol=1e-5)
    np.testing.assert_allclose(s.max_load, [max(row) / (1 / E) for row in load], rtol=1e-12)
    cv = [np.sqrt(sum((x - 1 / E) ** 2 for x in row) / E) / (1 / E) for row in load]
    np.testing.assert_allclose(s.cv, cv, rtol=1e-9)
    np.testing.assert_array_equal(s.dead, [sum(1 for c in row if c == 0) for row in counts])
    np.testing.assert_allclose(s.mean_lse, lse_sum / tokens, rtol=1e-5)
    # Per source: shares per layer, averaged over layers; the source without tokens is all zeros.
    for src in range(len(SOURCES)):
        for layer in range(L):
            total = src_counts[src, layer].sum()
            expected = src_counts[src, layer] / total if total else np.zeros(E)
            np.testing.assert_allclose(s.source_layer_load[src, layer], expected, rtol=1e-12)
        np.testing.assert_allclose(s.source_load[src], s.source_layer_load[src].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.source_load.sum(axis=1), [1.0, 1.0, 0.0], rtol=1e-12)
    assert s.source_tokens.tolist()[2] == 0 and sum(s.source_tokens.tolist()) == tokens

    scalars = s.scalars()
    assert scalars["routing/L3/max_load"] == pytest.approx(s.max_load[1])
    assert scalars["routing/L5/entropy"] == pytest.approx(ent_sum[2] / tokens, rel=1e-5)
    assert scalars["routing/L1/lse"] == pytest.approx(lse_sum[0] / tokens, rel=1e-5)
    assert scalars["routing/mean/cv"] == pytest.approx(np.mean(cv))
    assert scalars["routing/total/dead"] == int(np.sum(s.dead))
    assert scalars["routing/worst/max_load"] == pytest.approx(max(s.max_load))
    assert scalars["routing/L3/maxvio"] == pytest.approx(s.max_load[1] - 1)
    assert {k.split("/")[1] for k in scalars} == {"L1", "L3", "L5", "mean", "worst", "total"}


def test_dead_experts_and_json_round_trip():
    # Expert 4 and 5 are never in anyone's top 2: two dead experts per layer.
    logits = tuple(torch.cat([torch.randn(10, 4), torch.full((10, 2), -30.0)], dim=1) for _ in range(L))
    stats = RoutingStats(L, E, K)
    stats.update(logits)
    s = stats.summary()
    np.testing.assert_array_equal(s.dead, [2] * L)
    assert s.scalars()["routing/total/dead"] == 2 * L
    back = RoutingSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    for name, value in s.to_dict().items():
        assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(value)), name


def test_reset_reduce_and_argument_checks():
    stats = RoutingStats(L, E, K, SOURCES)
    logits, mask, source_ids = batch(4)
    stats.update(logits, mask, source_ids)
    stats.update(logits, mask, source_ids)
    stats.reduce()  # one process: nothing to sum, but the window is closed as under DDP
    assert stats.summary().tokens == stats.tokens_seen() == 30 and stats.micro_batches == 2
    with pytest.raises(RuntimeError, match="after reduce"):
        stats.update(logits, mask, source_ids)
    stats.reset()
    empty = stats.summary()
    assert (
        empty.tokens == stats.tokens_seen() == stats.micro_batches == 0
        and not np.isnan(empty.load).any()
        and np.all(empty.load == 0)
    )
    stats.update(logits, mask, source_ids)  # reset reopened the window
    with pytest.raises(ValueError, match="expected 3 layers"):
        stats.update(logits[:2])
    with pytest.raises(ValueError, match="without sources"):
        RoutingStats(L, E, K).update(logits, mask, source_ids)


def test_update_never_syncs_with_the_host(monkeypatch):
    stats = RoutingStats(L, E, K, SOURCES)
    logits, mask, source_ids = batch(5)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in RoutingStats.update")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    stats.update(logits, mask, source_ids)
    stats.update(tuple(lg.requires_grad_() for lg in logits), mask.float(), source_ids)


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits, mask, source_ids = batch(100 + rank, tokens=16, pad=4)
        stats = RoutingStats(L, E, K, SOURCES)
        stats.update(logits, mask, source_ids)
        stats.reduce()
        stats.reduce()  # a second call in the same window must not double count
        counts = all_reduce_counts(selection_counts(logits, K, mask))
        loss = load_balancing_loss(logits, K, mask, counts=counts)
        torch.save(
            {"summary": stats.summary().to_dict(), "counts": counts, "loss": loss.detach()}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_to_single_process_stats(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # One process seeing the same two micro-batches.
    halves = [batch(100 + r, tokens=16, pad=4) for r in range(2)]
    single = RoutingStats(L, E, K, SOURCES)
    for logits, mask, source_ids in halves:
        single.update(logits, mask, source_ids)
    expected = single.summary().to_dict()
    for result in ranks:
        assert result["summary"] == expected  # exact: counts are integers, float sums add in one order

    all_logits = tuple(torch.cat([h[0][layer] for h in halves]) for layer in range(L))
    all_mask = torch.cat([h[1] for h in halves])
    for result in ranks:
        torch.testing.assert_close(result["counts"], selection_counts(all_logits, K, all_mask), rtol=0, atol=0)
    # Global-batch balancing: with equal real tokens per rank, the mean of the ranks' losses
    # (what DDP's gradient averaging optimises) is the loss of the whole batch.
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, load_balancing_loss(all_logits, K, all_mask), rtol=1e-6, atol=0)
