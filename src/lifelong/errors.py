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


class WriteError(LifelongError, OSError):
    """The operating system refused a write of the run (no space left, an I/O error, a read-only folder).

    Attributes:
        path: the file that could not be written.
        reason: the operating system's words (``"No space left on device"``).
    """

    def __init__(self, path: object, reason: str, errno: int | None = None) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(errno, reason, self.path)

    def __str__(self) -> str:
        return f"could not write {self.path}: {self.reason}"
