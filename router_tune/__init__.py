"""router_tune: train only the routers of merged (frankenMoE) Mixture-of-Experts models.

    from router_tune import RouterTrainer, load_recipe
    trainer = RouterTrainer(args=load_recipe("recipes/demo.yaml", max_steps=100))
    trainer.train()
    trainer.save_model()          # routers.safetensors + router_tune.json in output_dir

Names are imported lazily (PEP 562) so that `router-tune --help` does not pay for torch
and transformers.
"""
from __future__ import annotations

import importlib

from router_tune.errors import RouterTuneError

__version__ = "0.1.0"

_EXPORTS = {
    "RouterTrainer": "router_tune.trainer",
    "RouterTuneConfig": "router_tune.config",
    "load_recipe": "router_tune.config",
    "load_moe": "router_tune.moe",
    "describe_moe": "router_tune.moe",
    "find_routers": "router_tune.moe",
    "freeze_all_but_routers": "router_tune.moe",
    "routers_to_fp32": "router_tune.moe",
    "router_state_dict": "router_tune.moe",
    "load_router_state_dict": "router_tune.moe",
    "expert_fingerprints": "router_tune.moe",
    "load_balancing_loss": "router_tune.losses",
    "router_z_loss": "router_tune.losses",
    "RoutingStats": "router_tune.stats",
    "RoutingSummary": "router_tune.stats",
    "parse_sources": "router_tune.data",
    "build_train_dataset": "router_tune.data",
    "build_eval_blocks": "router_tune.data",
    "inspect_model": "router_tune.inspection",
}

__all__ = ["RouterTuneError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'router_tune' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
