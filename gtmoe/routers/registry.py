"""The router registry: config name -> class, filled by `@register` as the plug-in modules load.

Kept apart from the package's `__init__` so that plug-ins import only this module (not the package
that imports them), and discovery reads the package folder without importing the package.

Routers come from two places: the modules of this package, then the modules that installed
distributions name in the entry-point group `gtmoe.routers` (docs/adding-a-router.md), so a
researcher adds a router without editing gtmoe. Each entry point names a module; importing it runs
its `@register` decorators.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from gtmoe.errors import ConfigError

ENTRY_POINT_GROUP = "gtmoe.routers"

_PACKAGE = __name__.rpartition(".")[0]  # gtmoe.routers
_REGISTRY: dict[str, type] = {}
_discovered = False


def register(name: str):
    """Class decorator: register a router (or the dense FFN entry) under its config name.

    Refuses a name taken by another class, and a router whose `option_terms` values or `state_names`
    have no readable label in `term_labels` / `state_labels` (the analysis names them with these).
    """

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            taken = _REGISTRY[name]
            raise ConfigError(
                f"router name {name!r} registered twice: {taken.__module__}.{taken.__qualname__} "
                f"and {cls.__module__}.{cls.__qualname__}; rename one"
            )
        cls.name = name
        if "label" not in vars(cls):
            cls.label = name
        _check_labels(name, cls)
        _REGISTRY[name] = cls
        return cls

    return wrap


def _check_labels(name: str, cls: type) -> None:
    """Every term an option scales and every logged state has a label (selection_terms() keys need an
    instance, so tests check those)."""
    terms, states = getattr(cls, "term_labels", {}), getattr(cls, "state_labels", {})
    missing_terms = sorted(set(getattr(cls, "option_terms", {}).values()) - set(terms))
    missing_states = [state for state in getattr(cls, "state_names", ()) if state not in states]
    if missing_terms or missing_states:
        what = [f"term_labels lacks {missing_terms}"] if missing_terms else []
        what += [f"state_labels lacks {missing_states}"] if missing_states else []
        raise ConfigError(f"router {name!r} ({cls.__module__}.{cls.__qualname__}): {'; '.join(what)}")


def _load_plugin(entry: EntryPoint) -> None:
    """Import one `gtmoe.routers` entry point's module; any failure is one ConfigError line naming it."""
    where = f"router plug-in {entry.name!r} (entry point {entry.value!r} in group {ENTRY_POINT_GROUP!r})"
    before = set(_REGISTRY)
    try:
        entry.load()
    except ConfigError as error:  # a duplicate name or a missing label, raised by @register
        raise ConfigError(f"{where}: {error}") from error
    except Exception as error:  # any import failure of foreign code, reported in one line
        cause = " ".join(str(error).split())  # a plug-in's message may span lines
        raise ConfigError(f"{where} failed to import: {type(error).__name__}: {cause}") from error

    def defined_here(cls: type) -> bool:  # in the entry point's module or one of its submodules
        return cls.__module__ == entry.module or cls.__module__.startswith(f"{entry.module}.")

    if set(_REGISTRY) == before and not any(map(defined_here, _REGISTRY.values())):
        raise ConfigError(f"{where}: module {entry.module!r} registers no router (decorate one with @register)")


def _discover() -> None:
    """Import every module of the package once, then every plug-in, so each registers its routers."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # set first: a plug-in may call known() or get() while it is imported
    try:
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if module.name != "registry":
                importlib.import_module(f"{_PACKAGE}.{module.name}")
        for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
            _load_plugin(entry)
    except BaseException:
        _discovered = False  # retried (and refused again) on the next call, never silently half-loaded
        raise


def known() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str, key: str = "router.name") -> type:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"config key '{key}' = {name!r}: unknown router; known routers: {', '.join(known())}")
    return _REGISTRY[name]


def describe(name: str) -> dict:
    """How the analysis names router `name` (JSON-serialisable; the study record's `routers` entry):
    {"label", "routed" (a Router, not the dense FFN), "balanced_by_construction", "terms" (selection
    term -> label), "states" (logged state -> label, in `state_names` order), "balance_knob" (the
    option that sets how hard it balances, or None)}."""
    from gtmoe.routers.base import Router  # here, not at the top: plug-ins import this module alone

    cls = get(name)
    state_labels = dict(getattr(cls, "state_labels", {}))
    return {
        "label": str(vars(cls).get("label", name)),
        "routed": issubclass(cls, Router),
        "balanced_by_construction": bool(getattr(cls, "balanced_by_construction", False)),
        "terms": {str(term): str(label) for term, label in getattr(cls, "term_labels", {}).items()},
        "states": {str(state): str(state_labels.get(state, state)) for state in getattr(cls, "state_names", ())},
        "balance_knob": getattr(cls, "balance_knob", None),
    }
