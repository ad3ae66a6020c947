"""DataError, the one exception of the data path (gtmoe.errors): a problem the user can fix."""

from gtmoe.errors import DataError  # noqa: F401
