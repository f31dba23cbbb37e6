"""router_tune: train only the routers of merged (frankenMoE) Mixture-of-Experts models.

Public API::

    from router_tune import load_moe, freeze_all_but_routers, RouterTuneError
"""
from router_tune.errors import RouterTuneError

__all__ = ["RouterTuneError"]
__version__ = "0.1.0"
