"""Router plug-ins.

Every module in this package registers its class under a config name with
`@register("name")`; the package imports all of its modules on first use, so
adding a router is one new file here plus a variant entry in `config.yaml`.
A registered class has a `Config` dataclass (its options, validated) and a
`build_ffn(...)` classmethod that returns the block's feed-forward module.
"""

from __future__ import annotations

import importlib
import pkgutil

from gtmoe.config import ConfigError
from gtmoe.routers.base import Router, RouterOptions, Routing

__all__ = ["Router", "RouterOptions", "Routing", "register", "get", "known"]

_REGISTRY: dict[str, type] = {}
_discovered = False


def register(name: str):
    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"router name {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _discovered = True


def known() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str, key: str = "router.name") -> type:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"config key '{key}' = {name!r}: unknown router; known routers: {', '.join(known())}")
    return _REGISTRY[name]
