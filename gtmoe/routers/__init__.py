"""Router plug-ins.

Every module in this package registers its class under a config name with
`@register("name")` (from `gtmoe.routers.registry`); the registry imports all of
the package's modules on first use, so adding a router is one new file here plus
a variant entry in `config.yaml`. A registered class has a `Config` dataclass (its
options, validated). A `Router` subclass becomes the gate of an MoE layer; any other
registered class (the dense baseline) provides `build_ffn(options, model_cfg)`, the
block's feed-forward module.
"""

from __future__ import annotations

from gtmoe.routers.base import Router, RouterOptions, Routing
from gtmoe.routers.registry import get, known, register

__all__ = ["Router", "RouterOptions", "Routing", "register", "get", "known"]
