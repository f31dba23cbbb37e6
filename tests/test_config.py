"""RouterTuneConfig and recipes: validation before any weight is read, shipped recipes, generated docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_tune.data import parse_sources
from router_tune.errors import RouterTuneError
from router_tune.training.config import load_recipe
from router_tune.training.recipe_keys import keys_markdown, keys_text


def test_unknown_recipe_key_names_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: x\nrouter_aux_loss_coeff: 0.1\n")
    with pytest.raises(RouterTuneError, match="router_aux_loss_coeff.*Did you mean `router_aux_loss_coef`"):
        load_recipe(recipe)


@pytest.mark.parametrize(
    "body, message",
    [
        ("router_aux_loss_coef: 0.1\n", "model_name_or_path` is missing"),
        ("model_name_or_path: x\naux_loss_scope: global\n", "aux_loss_scope"),
        ("model_name_or_path: x\nrouter_z_loss_coef: -1\n", "router_z_loss_coef` must be >= 0"),
        ("- a\n- b\n", "must be a mapping"),
        ("model_name_or_path: x\nrouter_gradient: dense_mixer\n", "router_gradient` must be one of sparse, dense"),
        ("model_name_or_path: x\nrouter_gradient_steps: -5\n", "router_gradient_steps` must be >= 0"),
        ("model_name_or_path: x\nrouter_overload_threshold: 0.8\n", "router_overload_threshold` must be >= 1.0"),
        ("model_name_or_path: x\nrouter_overload_loss_coef: -1\n", "router_overload_loss_coef` must be >= 0"),
        ("model_name_or_path: x\nrouter_twin_loss_coef: -0.1\n", "router_twin_loss_coef` must be >= 0"),
    ],
)
def test_bad_recipes(tmp_path, body, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    with pytest.raises(RouterTuneError, match=message):
        load_recipe(recipe)


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.glob("recipes/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    config = load_recipe(recipe, use_cpu=True)  # GPU recipes (bf16) validate here on the CPU
    assert config.model_name_or_path and config.datasets
    assert parse_sources(config.datasets)
    header = recipe.read_text().splitlines()[:12]
    assert any("router-tune train recipes/" in line or "router_tune train recipes/" in line for line in header), (
        "every recipe starts with the command that runs it"
    )


def test_recipe_key_docs_are_current():
    doc = Path(__file__).parent.parent / "docs" / "recipe-keys.md"
    assert doc.read_text() == keys_markdown(), "run: python -m router_tune.training.recipe_keys > docs/recipe-keys.md"
    text = Path(__file__).parent.parent / "router_tune" / "training" / "recipe_keys.txt"  # `train --help` shows it
    assert text.read_text() == keys_text() + "\n", (
        "run: python -m router_tune.training.recipe_keys --text > router_tune/training/recipe_keys.txt"
    )


@pytest.mark.parametrize(
    "config", sorted(Path(__file__).parent.parent.glob("recipes/accelerate/*.yaml")), ids=lambda p: p.name
)
def test_shipped_accelerate_configs(config):
    """accelerate reads every shipped config; each is headed by the command that launches it, names
    no architecture's classes (router_tune derives ZeRO-3 leaves from the model), and a DeepSpeed
    JSON it names exists and is valid."""
    import json

    from accelerate.commands.config.config_args import ClusterConfig

    root = Path(__file__).parent.parent
    cluster = ClusterConfig.from_yaml_file(str(config))
    header = [line for line in config.read_text().splitlines()[:6] if line.startswith("#")]
    assert any(f"--config_file {config.relative_to(root)}" in line for line in header), header
    ds = cluster.deepspeed_config or {}
    assert "deepspeed_moe_layer_cls_names" not in ds and "transformer_moe_cls_names" not in ds
    if "deepspeed_config_file" in ds:
        assert json.loads((root / ds["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"] == 3


def test_recipe_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    """A shipped recipe from another directory finds its model and data under the project root; a recipe's
    own relative paths resolve beside it; paths that exist from the current directory become absolute; hub ids
    stay."""
    root = Path(__file__).resolve().parent.parent
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "router_tune" / "assets" / "demo-moe").mkdir(parents=True)  # exists from the cwd: kept
    monkeypatch.chdir(elsewhere)
    config = load_recipe(root / "recipes" / "demo.yaml")
    assert config.model_name_or_path == str(elsewhere / "router_tune/assets/demo-moe")  # absolute: named as loaded
    assert [Path(d["path"]) for d in config.datasets][
        0
    ] == root / "router_tune/assets/samples/redpajama/github_sample.jsonl"
    assert config.output_dir == "runs/demo"
    (elsewhere / "router_tune" / "assets" / "demo-moe").rmdir()
    assert load_recipe(root / "recipes" / "demo.yaml").model_name_or_path == str(root / "router_tune/assets/demo-moe")
    own = tmp_path / "project" / "exp.yaml"
    (own.parent / "data").mkdir(parents=True)
    (own.parent / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    own.write_text("model_name_or_path: org/model\ndatasets: [{source: redpajama, path: data/a.jsonl}]\n")
    config = load_recipe(own)
    assert config.model_name_or_path == "org/model" and config.datasets[0]["path"] == str(own.parent / "data/a.jsonl")
