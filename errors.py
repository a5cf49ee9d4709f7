"""The project's error classes. The CLI turns each into a one-line message and an exit status.

`ConfigError`, `DataError` and `ModelError` are bad input (a flag, a data file, a saved model),
`WriteError` an output that cannot be written: exit status 2. `TrainingError` means training
could not go on (e.g. a non-finite loss): 3. `Interrupted`: training stopped on SIGINT/SIGTERM
after saving a checkpoint: 128 + the signal.
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


class WriteError(DeepcfError, OSError):
    """An output could not be written (disk full, no permission, a path in the way); the message
    names the path. Earlier outputs and the newest complete checkpoint are left as they were."""


class TrainingError(DeepcfError, RuntimeError):
    """Training cannot go on (e.g. the loss is not finite)."""


class Interrupted(DeepcfError):
    """Training stopped on a signal (Ctrl-C, SIGTERM) with its checkpoint saved; says how to resume.

    Attributes:
      signum: the signal's number (the CLI exits with 128 + signum: 130, 143).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
