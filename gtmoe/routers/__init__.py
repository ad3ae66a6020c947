"""Router plug-ins.

Every module in this package registers its class under a config name with
`@register("name")` (from `gtmoe.routers.registry`); the registry imports all of
the package's modules on first use, so adding a router is one new file here plus
a variant entry in `config.yaml`. A registered class has a `Config` dataclass (its
options, validated). A `Router` subclass becomes the gate of an MoE layer; any other
registered class (the dense baseline) provides `build_ffn(options, model_cfg)`, the
block's feed-forward module. Each also declares how the analysis names it (`label`,
`term_labels`, `state_labels`, `balanced_by_construction`), read through `describe(name)`.

Routers from outside the package register the same way, from a module that an installed
distribution names in the entry-point group `gtmoe.routers` (docs/adding-a-router.md); the
registry imports those after the package's own modules.
"""

from __future__ import annotations

from gtmoe.routers.base import Router, RouterOptions, Routing
from gtmoe.routers.registry import describe, get, known, register

__all__ = ["Router", "RouterOptions", "Routing", "register", "get", "known", "describe"]
