"""Configuration errors: one exception and one check that names the key and a bounded repr of the value.

Dependency-free, so every layer (config, routers, study, sweeps) can raise the same one-line error
without importing the others.
"""

from __future__ import annotations

import re
import reprlib
import typing
from typing import Any

from gtmoe.errors import ConfigError  # noqa: F401  (re-exported: the error every check raises)

MAX_VALUE_CHARS = 80  # an error message shows at most this much of a value
_VALUE_REPR = reprlib.Repr()  # bounded: never walks a whole (possibly huge or shared) nested value
_VALUE_REPR.maxstring = _VALUE_REPR.maxother = MAX_VALUE_CHARS
_VALUE_REPR.maxlevel = 3
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxdict = _VALUE_REPR.maxset = 8


def short_repr(value: Any) -> str:
    """repr(value) cut to MAX_VALUE_CHARS characters (with '...'), without formatting all of a large value."""
    text = _VALUE_REPR.repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def fail(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{key}' = {short_repr(value)}: {why}")


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming `key` and `value` unless `ok`."""
    if not ok:
        fail(key, value, why)


# Study, variant and sweep names: they become directories, rule names and file names. Matched with fullmatch
# (`$` alone would also accept a trailing newline); <= 64 characters keeps paths far below file-system limits.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


MAX_LISTED = 300  # characters of names an error lists in full; beyond, the closest ones (errors stay one short line)


def known_names(names: typing.Sequence[str], given: Any) -> str:
    """The names an error offers for an unknown `given`: all of them when short, else the closest few (difflib)
    or the first ones, and how many there are."""
    import difflib

    listed = ", ".join(names)
    if len(listed) <= MAX_LISTED:
        return listed
    shown = difflib.get_close_matches(str(given), list(names), n=4, cutoff=0.5) or list(names[:8])
    return f"{', '.join(shown)}, … ({len(names)} in all)"


def check_name(value: Any, key: str) -> None:
    """Raise a ConfigError naming `key` unless `value` is a NAME."""
    check(
        isinstance(value, str) and bool(NAME.fullmatch(value)),
        key,
        value,
        "must start with a letter, contain only letters, digits and '_', and be at most 64 characters",
    )


def positive_int(text: str) -> int:
    """argparse type of a count (threads, steps, sequence length): an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {short_repr(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {value}")
    return value
