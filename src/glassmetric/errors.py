"""Errors that glassmetric raises on bad input.

Every message names the file, key or value at fault, so the command line can print it on one
line instead of a traceback.
"""


class GlassmetricError(Exception):
    """Base class: an error the user can fix from its message alone."""


class ConfigError(GlassmetricError, ValueError):
    """A configuration key is unknown, or its value has the wrong type or range."""


class DataError(GlassmetricError):
    """A data set file is missing, unreadable or malformed."""


class WeightsError(GlassmetricError):
    """Pretrained weights were asked for but cannot be found or do not fit the model."""


class CheckpointError(GlassmetricError):
    """A checkpoint is missing, truncated or does not fit the model."""


class IndexFileError(GlassmetricError):
    """A saved gallery index is missing, malformed or does not fit the gallery."""
