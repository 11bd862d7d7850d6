"""Errors that mean "the user's input is wrong", reported by train.py as one clear message, no traceback."""


class LifelongError(Exception):
    """Base class: a problem with the configuration, the data or a checkpoint, not a bug."""


class DataNotFoundError(LifelongError, FileNotFoundError):
    """A dataset's files are in none of the searched folders and could not be downloaded."""


class CorruptDataError(LifelongError, RuntimeError):
    """A dataset's files exist but cannot be read."""


class ResumeError(LifelongError, RuntimeError):
    """A checkpoint does not belong to this run (another stream, another method state)."""


class NonFiniteLossError(LifelongError, FloatingPointError):
    """The training loss became NaN or infinite."""


class ConfigError(LifelongError, ValueError):
    """A configuration value that its part does not accept (a wrong type, an unknown key, out of range)."""


class RunFolderError(LifelongError, RuntimeError):
    """The output folder already holds results this run would overwrite, or a finished run asked to resume."""
