"""The one error type of gtmoe and analysis: a problem the user can fix, in one line that names it.

Standard library only, so every layer (config, data, runs, analysis) raises the same family without
importing the others. The command lines turn a GtmoeError into one `error:` line and exit status 2
(1 for a non-finite loss); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class GtmoeError(Exception):
    """A problem the user can fix; the message names the key or file and how to recover."""


class ConfigError(GtmoeError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(GtmoeError):
    """A data problem (corpus, tokenizer, shards); the message names the file or key and how to rebuild it."""


class RunError(GtmoeError):
    """A run directory or checkpoint problem; the message names the file and the fix."""


class NonFiniteLossError(GtmoeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


class ManifestMismatch(GtmoeError):
    """A file is missing or differs from its manifest entry; the message names the file and its manifest."""


class OutputError(GtmoeError):
    """An output file could not be written (full disk, permissions); the message names it and the fix."""
