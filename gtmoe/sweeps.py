"""Sweeps: a base variant and values of its router options, expanded into ordinary variants.

    sweeps:
      - name: rdesi_terms        # a target: `snakemake rdesi_terms` builds exactly these runs
        base: rdesi              # a variant of `variants`
        mode: one_at_a_time      # each option over its values, the others at the base's (default);
                                 # `full`: every combination of the values
        grid:
          beta: [0, 0.03, 0.1, 0.3, 1, 3]
          c: [0, 0.3, 1, 3, 10, 30]

A point is named after what it changes, `{base}-{option}{value}` (`rdesi-beta0.3`, in a full grid
`rdesi-beta0.3-c10`), and is an ordinary variant: its own runs, target and rows in every table. A
point whose resolved options equal an existing variant's is that variant (beta 0 is
`rdesi_no_reputation` when the config has it), so nothing is trained twice. The base itself is the
point at its own value of every option, so each dose-response curve passes through it.

`design` has one row per (sweep, option, value) point for the analysis (`python -m analysis
sensitivity`): which variant ran there and which selection term the option scales (the router's
`option_terms`), whose flip rate the figure shows.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from gtmoe import routers
from gtmoe.config import ConfigError, RouterConfig, check, check_name

MODES = ("one_at_a_time", "full")
MAX_VALUES = 32  # per option
MAX_POINTS = 512  # per sweep: each point is a variant x every seed of training
MAX_NAME_CHARS = 128  # generated variant names: run directories and target rules stay short


@dataclass
class Expansion:
    """New variants (name -> router mapping, in order), sweep members and the design rows."""

    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)  # sweep -> its variants, base first
    design: list[dict[str, Any]] = field(default_factory=list)


def format_value(value: float) -> str:
    """How a value appears in a variant name, readable and exact: 3.0 -> '3', 0.3 -> '0.3', 1e-05 -> '1e-05'.

    The short form is used only when it reads back as the value itself; otherwise the value's repr, the shortest
    text that does (1.0000001 -> '1.0000001', not '1'; 0.1 + 0.2 -> '0.30000000000000004'). So two different
    values never share a name, and every name maps back to its value.
    """
    text = str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else format(value, "g")
    return text if float(text) == value else repr(value)


def check_value(value: Any, key: str) -> None:
    # Numbers only: a dose-response curve needs an axis, and a value becomes part of names and paths.
    check(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        key,
        value,
        "must be a finite number",
    )


def resolved_options(router: str, options: dict[str, Any], max_steps: int, key: str):
    """The router's typed options as a run would use them (horizon-dependent options resolved)."""
    config = RouterConfig(name=router, options=dict(options))
    config.resolve(key)
    return config.for_horizon(max_steps).resolve(key)


def _identity(router: str, resolved: Any) -> tuple:
    """What makes two variants the same model: the router and every resolved option."""
    return (router, *sorted(dataclasses.asdict(resolved).items()))


def _points(mode: str, grid: dict[str, list[Any]]):
    """The (option -> value) assignments of a sweep: one option at a time, or every combination."""
    if mode == "one_at_a_time":
        for option, values in grid.items():
            for value in values:
                yield {option: value}
    else:
        for combination in itertools.product(*grid.values()):
            yield dict(zip(grid, combination))


def expand(
    entries: Any, variants: dict[str, dict[str, Any]], max_steps: int, every: dict[str, dict[str, Any]] | None = None
) -> Expansion:
    """Expand config `sweeps` over the already checked `variants` (name -> {"name": router, **options}), the
    variants a point may be (equal options: the same model). `every`: all the study's variants (default
    `variants`), whose names no sweep or point may take."""
    every = variants if every is None else every
    result = Expansion()
    origins: dict[str, str] = {}  # generated variant name -> the point it was generated for, in words
    if entries is None:
        return result
    check(isinstance(entries, list), "sweeps", entries, "must be a list of sweeps")
    if not entries:
        return result
    # Existing variants by resolved options: a point equal to one of them reuses it.
    known = {}
    for name, mapping in variants.items():
        router, options = mapping["name"], {k: v for k, v in mapping.items() if k != "name"}
        known.setdefault(_identity(router, resolved_options(router, options, max_steps, name)), name)
    for i, entry in enumerate(entries):
        key = f"sweeps[{i}]"
        check(isinstance(entry, dict), key, entry, "must be a mapping with name, base and grid")
        for extra in sorted(set(entry) - {"name", "base", "mode", "grid"}):
            check(False, f"{key}.{extra}", entry[extra], "unknown key; known keys here: base, grid, mode, name")
        name, base, mode, grid = (
            entry.get("name"),
            entry.get("base"),
            entry.get("mode", "one_at_a_time"),
            entry.get("grid"),
        )
        check_name(name, f"{key}.name")
        check(
            name not in every and name not in result.members,
            f"{key}.name",
            name,
            "is already the name of a variant or another sweep (each is a target)",
        )
        check(base in every, f"{key}.base", base, f"must be one of the variants: {', '.join(every)}")
        check(mode in MODES, f"{key}.mode", mode, f"must be one of {', '.join(MODES)}")
        check(
            isinstance(grid, dict) and len(grid) > 0, f"{key}.grid", grid, "must map router options to lists of values"
        )
        router = every[base]["name"]
        base_options = {k: v for k, v in every[base].items() if k != "name"}
        resolved_base = resolved_options(router, base_options, max_steps, base)
        router_cls = routers.get(router, key=f"{key}.base")
        option_names = [f.name for f in dataclasses.fields(resolved_base)]
        for option, values in grid.items():
            check(
                option in option_names,
                f"{key}.grid.{option}",
                values,
                f"not an option of router '{router}'; its options: {', '.join(option_names)}",
            )
            check(
                isinstance(values, list) and 0 < len(values) <= MAX_VALUES,
                f"{key}.grid.{option}",
                values,
                f"must be a list of 1 to {MAX_VALUES} values",
            )
            seen: dict[float, Any] = {}  # by value: 30 and 30.0, or 0 and -0.0, are one point
            for value in values:
                check_value(value, f"{key}.grid.{option}")
                check(
                    value not in seen,
                    f"{key}.grid.{option}",
                    values,
                    f"values must be unique: {seen.get(value)!r} and {value!r} are the same number",
                )
                seen[value] = value
        n_points = sum(map(len, grid.values())) if mode == "one_at_a_time" else math.prod(map(len, grid.values()))
        check(n_points <= MAX_POINTS, f"{key}.grid", f"{n_points} points", f"more than {MAX_POINTS} points")

        base_values = {option: getattr(resolved_base, option) for option in grid}
        members = [base]
        points: list[tuple[dict[str, Any], str]] = []
        for assignment in _points(mode, grid):
            changed = {o: v for o, v in assignment.items() if v != base_values[o]}
            options = {**base_options, **assignment}
            where = f"{key}.grid" + (f".{next(iter(assignment))}" if len(assignment) == 1 else "")
            try:
                resolved = resolved_options(router, options, max_steps, where)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in sweep '{name}', point {short_point(assignment)})") from None
            identity = _identity(router, resolved)
            variant = known.get(identity)
            if variant is None:
                variant = "-".join([base, *(f"{o}{format_value(v)}" for o, v in changed.items())])
                check(
                    len(variant) <= MAX_NAME_CHARS,
                    f"{key}.grid",
                    variant,
                    f"generated variant name longer than {MAX_NAME_CHARS} characters",
                )
                origin = f"{short_point(changed)} (sweep '{name}')"
                # Names are exact (format_value), but an option named like another plus digits could still
                # collide: options c and c1 give c10 for c=10 and for c1=0.
                check(
                    variant not in origins,
                    f"{key}.grid",
                    variant,
                    f"the generated variant name stands for two different points, {origins.get(variant)} and "
                    f"{origin}; sweep these options in separate studies",
                )
                check(
                    variant not in every and variant not in result.variants,
                    f"{key}.grid",
                    variant,
                    f"generated variant name for {origin} is taken by a variant with other options",
                )
                result.variants[variant] = {"name": router, **options}
                origins[variant] = origin
                known[identity] = variant
            if variant not in members:
                members.append(variant)
            points.append((assignment, variant))
        result.members[name] = members
        result.design += _design_rows(name, base, router, mode, grid, base_values, points, router_cls)
    return result


def short_point(assignment: dict[str, Any]) -> str:
    return ", ".join(f"{o}={format_value(v)}" for o, v in assignment.items())


def _design_rows(sweep, base, router, mode, grid, base_values, points, router_cls) -> list[dict[str, Any]]:
    """One row per (option, value) curve point; the base is on every one-at-a-time curve at its value."""
    terms = getattr(router_cls, "option_terms", {})
    rows = []
    for option in grid:
        if mode == "one_at_a_time":
            curve = [(a[option], v) for a, v in points if option in a]
            if all(value != base_values[option] for value, _ in curve):
                curve.append((base_values[option], base))
            labelled = [(value, variant, "") for value, variant in curve]
        else:
            labelled = [(a[option], v, short_point({o: x for o, x in a.items() if o != option})) for a, v in points]
        for value, variant, fixed in sorted(labelled, key=lambda row: (row[2], _sort_key(row[0]))):
            rows.append(
                {
                    "sweep": sweep,
                    "base": base,
                    "router": router,
                    "option": option,
                    "value": value,
                    "variant": variant,
                    "term": terms.get(option),
                    "fixed": fixed,
                }
            )
    return rows


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))
