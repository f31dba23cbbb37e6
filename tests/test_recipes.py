"""Every shipped recipe trains, with its own settings, on a tiny local model of its architecture.

A recipe is a user-facing interface: `model_dtype`, `bf16`, activation checkpointing, the chunked CE,
quantization, balancing and the schedule all reach the trainer exactly as the recipe writes them.
Only what cannot be had here is swapped: the hub model for a tiny local one of the same architecture,
layout, expert count, top-k and on-disk dtype; hub datasets for the bundled samples in the same schema;
the step count, the evaluation's block count (before / after still run, on 2 blocks: 64 blocks of 2048
tokens in emulated bf16 took minutes here), and `use_cpu` (a GPU recipe's bf16 runs on a CPU only with it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

from router_tune.cli import main
from router_tune.io.checkpoint import resolve_checkpoint
from tests import factories

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "router_tune" / "assets" / "samples"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# The hub datasets the recipes name, and the bundled files in the same upstream schema.
LOCAL_DATA = {
    "togethercomputer/RedPajama-Data-1T-Sample": SAMPLES / "redpajama",
    "cognitivecomputations/wizard_vicuna_70k_unfiltered": SAMPLES / "wizard_vicuna",
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": torch.bfloat16}


def local_model_like(recipe: dict, root: Path) -> Path:
    """The recipe's model when it is on disk; else a tiny Mixtral shaped like the hub model it names
    (experts, top-k, the recipe's dtype on disk, context >= block_size), built here."""
    name = recipe["model_name_or_path"]
    if name.startswith("build/real/"):
        # scripts/make_real_moe.py's merge (built on demand, not in CI): 4 SmolLM2 experts, bf16 on
        # disk, tied embeddings, a tokenizer whose own template is ChatML without generation markers
        model = factories.mixtral(root / "real-like", experts=4, dtype=torch.bfloat16, tied=True)
        tokenizer = AutoTokenizer.from_pretrained(model)
        tokenizer.chat_template = factories.CHATML
        tokenizer.save_pretrained(model)
        return model
    if (ROOT / name).is_dir():
        return ROOT / name
    assert name == "Kquant03/Raiden-16x3.43B", f"add a local stand-in for {name} to this test"
    return factories.mixtral(
        root / "raiden-like",
        experts=16,
        dtype=DTYPES[recipe.get("model_dtype", "auto")],
        max_position_embeddings=max(2048, recipe.get("block_size", 0)),
    )


def local_recipe(recipe_path: Path, tmp_path: Path) -> tuple[Path, dict]:
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model_name_or_path"] = str(local_model_like(recipe, tmp_path))
    for source in recipe["datasets"]:
        source["path"] = str(LOCAL_DATA.get(source["path"], ROOT / source["path"]))
    recipe.update(max_steps=2, output_dir=str(tmp_path / "run"), eval_max_blocks=2)
    if recipe.get("bf16") or recipe.get("fp16"):
        recipe["use_cpu"] = True
    path = tmp_path / recipe_path.name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, recipe


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_trains_with_its_own_settings(recipe_path, tmp_path, monkeypatch):
    if "quantize" in recipe_path.read_text():
        pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    path, recipe = local_recipe(recipe_path, tmp_path)
    stored_before = AutoConfig.from_pretrained(resolve_checkpoint(recipe["model_name_or_path"])).dtype
    assert main(["train", str(path)]) == 0

    run = tmp_path / "run"
    info = json.loads((run / "router_tune.json").read_text())
    assert info["global_step"] == 2
    settings = info["recipe"]
    for key in ("model_dtype", "bf16", "activation_checkpointing", "quantize", "ce_chunk_tokens", "block_size"):
        if key in recipe:
            assert settings[key] == recipe[key], key
    if recipe.get("model_dtype", "auto") != "auto":  # an explicit dtype is obeyed, on a CPU too
        assert info["weights_dtype"] == recipe["model_dtype"]
    (last,) = run.glob("checkpoint-2")
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    losses = [(entry["step"], entry["lm_loss"]) for entry in history if "lm_loss" in entry]
    assert losses and losses[-1][0] == 2 and torch.isfinite(torch.tensor(losses[-1][1])), history
    # the stored dtype stays what the recipe asked for: the export splices into it
    assert AutoConfig.from_pretrained(resolve_checkpoint(recipe["model_name_or_path"])).dtype == stored_before
