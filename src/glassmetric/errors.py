"""Errors that glassmetric raises on bad input.

Every message names the file, key or value at fault, so the command line can print it on one
line instead of a traceback.
"""

import re

#: how torch's DataLoader re-raises a worker's exception: "Caught X in DataLoader worker
#: process N.\nOriginal Traceback (most recent call last): ...\nmodule.X: message"
_WORKER_RERAISE = re.compile(r"\ACaught \w+ (?P<where>in DataLoader worker process \d+)\.\nOriginal Traceback")


class GlassmetricError(Exception):
    """Base class: an error the user can fix from its message alone.

    When a DataLoader worker raises one, torch re-raises it in the main process as the same
    class with the worker's whole traceback as message; that message is cut back here to the
    original one line (plus where it happened), so the command line still prints one line.
    """

    def __init__(self, message: object = "", *args: object):
        if isinstance(message, str) and (m := _WORKER_RERAISE.match(message)):
            last = message.rstrip().splitlines()[-1]
            original = last.split(": ", 1)[1] if ": " in last else last
            message = f"{original} ({m['where']})"
        super().__init__(message, *args)


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


class NonFiniteError(GlassmetricError):
    """Training met a NaN or infinite loss or gradient (``trainer.on_nonfinite: stop``)."""


class OutputError(GlassmetricError):
    """An output file or folder cannot be written, or is in use by another run."""


class MissingDependencyError(GlassmetricError, ImportError):
    """An optional dependency is needed but not installed; the message names the extra to install."""
