"""Session-scoped tiny checkpoints, built once per test run (a few seconds in all)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests import factories

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mixtral_legacy(models_root):
    """Mixtral, legacy on-disk layout (block_sparse_moe.experts.E.w1/w2/w3), fp32."""
    return factories.mixtral(models_root / "mixtral-legacy")


@pytest.fixture(scope="session")
def mixtral_fused(models_root):
    """Mixtral, fused layout (mlp.gate + mlp.experts.gate_up_proj/down_proj), as mergekit 0.1.5 writes it."""
    return factories.mixtral(models_root / "mixtral-fused", fused=True)


@pytest.fixture(scope="session")
def mixtral_bf16(models_root):
    return factories.mixtral(models_root / "mixtral-bf16", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def mixtral_tied(models_root):
    """bf16 with tied embeddings, as mergekit-moe writes a merge of SmolLM2-135M experts."""
    return factories.mixtral(models_root / "mixtral-tied", dtype=torch.bfloat16, tied=True)


@pytest.fixture(scope="session")
def mixtral_identical(models_root):
    """Every expert of every layer is the same copy (what `--i-understand...` merges produce)."""
    return factories.mixtral(models_root / "mixtral-identical", identical_experts=True)


@pytest.fixture(scope="session")
def mixtral_identical_tied(models_root):
    """Identical experts and tied embeddings: a merge of copies of SmolLM2-135M."""
    return factories.mixtral(models_root / "mixtral-identical-tied", identical_experts=True, tied=True)


@pytest.fixture(scope="session")
def mixtral_twins(models_root):
    """Two pairs of twin experts (one bit-identical, one near-identical) beside two distinct experts."""
    return factories.mixtral_twins(models_root / "mixtral-twins")


@pytest.fixture(scope="session")
def mixtral_saturated(models_root):
    """Gates drawn with torch.randn as mergekit's `random` mode does: saturated softmax."""
    return factories.mixtral(models_root / "mixtral-saturated", gate_init="random")


@pytest.fixture(scope="session")
def mixtral_copied_gates(models_root):
    """The same gate in every layer, as mergekit's `cheap_embed` mode makes."""
    return factories.mixtral(models_root / "mixtral-copied", gate_init="copied")


@pytest.fixture(scope="session")
def qwen2_moe(models_root):
    return factories.qwen2_moe(models_root / "qwen2-moe")


@pytest.fixture(scope="session")
def qwen3_moe(models_root):
    return factories.qwen3_moe(models_root / "qwen3-moe")


@pytest.fixture(scope="session")
def olmoe(models_root):
    return factories.olmoe(models_root / "olmoe")


@pytest.fixture(scope="session")
def dense_llama(models_root):
    return factories.dense_llama(models_root / "llama-dense")


@pytest.fixture
def copy_of(tmp_path):
    """Copy a session checkpoint before a test damages or modifies it."""

    def _copy(src):
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def qwen3_identical(models_root):
    """Qwen3-MoE with identical experts and norm_topk_prob=False: the router still scales the output."""
    return factories.qwen3_moe(models_root / "qwen3-identical", identical_experts=True)
