"""User-facing errors.

Anything the user can fix (a wrong path, name, shape or config value) raises `DefocusError` with a message
that says what was wrong, where, and what is valid. The CLI prints these without a traceback.
"""


class DefocusError(Exception):
    """An error caused by user input, with a message meant for the user."""


class ConfigError(DefocusError, ValueError):
    """A bad recipe, config key, model name or argument value."""


class InputShapeError(DefocusError, ValueError):
    """An input tensor whose shape does not match what the model expects."""


class DataError(DefocusError):
    """Missing or unreadable data (files, shards, columns)."""
