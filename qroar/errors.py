"""Errors a user can cause. Each message says what went wrong and what to do next.

The app and the CLI catch QroarError and show its message; anything else is a bug.
"""


class QroarError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ModelError(QroarError):
    """The model cannot be loaded or is not supported (missing, not RoPE, pickle, remote code)."""


class ConfigError(QroarError):
    """A setting is out of range or does not fit the model (bits, group size, bands, lengths, scales)."""


class DataError(QroarError):
    """The corpus cannot be read or is too short for what was asked."""


class ScalesFileError(QroarError):
    """A scales file is malformed, from another model, or from an unknown schema version."""


class OutOfMemory(QroarError):
    """A run did not fit in memory; memory was freed and the message says what would fit."""


class Cancelled(QroarError):
    """The user cancelled a running job."""
