"""Errors a user can act on.

Anything raised as an `EcvlError` is a problem with the user's data, model or files, and its
message names the file, key or value at fault; the CLI prints it on one line and exits non-zero
without a traceback. Any other exception is a bug.
"""


class EcvlError(Exception):
    """Base class for user-facing errors."""


class DataError(EcvlError):
    """Bad or inconsistent input data (files, labels, class names, shards, caches)."""


class ModelError(EcvlError):
    """A model name, config or checkpoint that cannot be used."""


class TrainingError(EcvlError):
    """Training cannot go on (non-finite loss, inconsistent resume state)."""


class DeviceError(EcvlError):
    """A device that this machine or this launch cannot provide (no CUDA, a missing GPU)."""
