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
import logging

from router_tune.errors import RouterTuneError

# bitsandbytes (imported by peft, which transformers' Trainer imports) warns on every CPU import
# that an optional kernel-hub package is missing; on a CPU it only falls back to its own kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

# The whole pipeline, in the order a run uses it: name -> module that defines it.
_EXPORTS = {
    "load_moe": "router_tune.model.loading",
    "describe_moe": "router_tune.model.loading",
    "find_routers": "router_tune.model.routers",
    "freeze_all_but_routers": "router_tune.model.routers",
    "routers_to_fp32": "router_tune.model.routers",
    "router_state_dict": "router_tune.model.routers",
    "load_router_state_dict": "router_tune.model.routers",
    "expert_fingerprints": "router_tune.model.fingerprints",
    "inspect_model": "router_tune.routing.inspection",
    "parse_sources": "router_tune.data",
    "build_train_dataset": "router_tune.data",
    "build_eval_blocks": "router_tune.data",
    "load_balancing_loss": "router_tune.losses.balancing",
    "overload_loss": "router_tune.losses.balancing",
    "twin_balancing_loss": "router_tune.losses.balancing",
    "router_z_loss": "router_tune.losses.balancing",
    "RoutingStats": "router_tune.routing.stats",
    "RoutingSummary": "router_tune.routing.stats",
    "RouterTuneConfig": "router_tune.training.config",
    "load_recipe": "router_tune.training.config",
    "RouterTrainer": "router_tune.training.trainer",
    "evaluate_model": "router_tune.evaluation.evaluate",
    "read_trained_routers": "router_tune.io.router_files",
    "export_run": "router_tune.export.exporter",
    "apply_routers": "router_tune.export.apply",
}

__all__ = ["RouterTuneError", "__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'router_tune' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
