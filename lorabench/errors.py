"""Errors a user can fix. The CLI prints their message (no traceback) and exits non-zero."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the valid choices."""


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file (and line or column)."""


class ModelSourceError(RuntimeError):
    """A model cannot be loaded from any of its sources; the message says how to fix it."""
