"""The router registry: config name -> class, filled by `@register` as the plug-in modules load.

Kept apart from the package's `__init__` so that plug-ins import only this module (not the package
that imports them), and discovery reads the package folder without importing the package.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from gtmoe.checks import ConfigError

_PACKAGE = __name__.rpartition(".")[0]  # gtmoe.routers
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
    """Import every module of the package once, so each registers its routers."""
    global _discovered
    if not _discovered:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if module.name != "registry":
                importlib.import_module(f"{_PACKAGE}.{module.name}")
        _discovered = True


def known() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str, key: str = "router.name") -> type:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"config key '{key}' = {name!r}: unknown router; known routers: {', '.join(known())}")
    return _REGISTRY[name]
