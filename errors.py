"""The project's error classes. The CLI turns each into a one-line message and an exit status.

`ConfigError`, `DataError` and `ModelError` are bad input (a flag, a data file, a saved model):
exit status 2. `TrainingError` means training could not go on (e.g. a non-finite loss): 3.
"""

from __future__ import annotations


class DeepcfError(Exception):
    """Base class of the errors below."""


class ConfigError(DeepcfError, ValueError):
    """A setting is out of range or does not fit the task; the message names the flag."""


class DataError(DeepcfError, ValueError):
    """Bad input data; the message starts with `path:line:` (or `path:`)."""


class ModelError(DeepcfError, ValueError):
    """A saved model or checkpoint cannot be used; the message names the path."""


class TrainingError(DeepcfError, RuntimeError):
    """Training cannot go on (e.g. the loss is not finite)."""
