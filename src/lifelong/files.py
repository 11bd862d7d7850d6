"""Writing a run's files so that a reader, a crash or a full disk never leaves half of one.

Every file lifelong writes goes through `atomic_open` (results) or `AtomicCheckpointIO`
(checkpoints): the bytes go to a temporary file beside the target, which replaces the target only once it is
complete and on disk. A write the operating system refuses (no space left, an I/O error, a folder that became
read-only) raises [`WriteError`][lifelong.errors.WriteError] naming the file, and leaves the previous version of
the file, and every other file, as it was: the run can be resumed from its last checkpoint once the cause is
fixed. `write_error` names the file of any other ``OSError`` (a logger's own writes).
"""

from __future__ import annotations

import errno as errnos
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from lifelong.errors import WriteError


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed to disk and renamed over ``path``.

    The rename is atomic on POSIX and Windows: readers see the old file or the new one, never a part, and a
    crash or an exception leaves the old file (or none) and no temporary one behind.

    Raises:
        WriteError: the operating system refused the write (the message names ``path``).
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(err, target) from None
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise write_error(err, target) from None
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files `atomic_open` left in ``folder`` (not below it) when its process was
    killed mid-write (``.NAME.XXXXXXXX.tmp``, never taken for a result or checkpoint); returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_atomic(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)


def save_atomic(path: str | Path, save: Callable[[IO[bytes]], None]) -> None:
    """Call ``save(binary_file)`` (e.g. ``lambda f: fig.savefig(f, format="png")``) and put the result at ``path``
    atomically."""
    with atomic_open(path, "wb") as f:
        save(f)


# How SQLite (MLflow's local store) words a refused write; it raises its own error type, not an OSError
_STORE_REFUSALS = ("database or disk is full", "disk I/O error", "attempt to write a readonly database")


def refused_write(err: BaseException) -> bool:
    """Whether ``err`` is the operating system refusing a write: an ``OSError``, or a store's words for one."""
    return isinstance(err, OSError) or any(words in str(err) for words in _STORE_REFUSALS)


def write_error(err: BaseException, path: str | Path | None = None) -> WriteError:
    """``err`` (a `refused_write`) as a `WriteError` naming ``path`` (default: the file it names)."""
    if isinstance(err, WriteError):
        return err
    filename = getattr(err, "filename", None)
    where = path if path is not None else (filename or "a file of the run")
    reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    code = getattr(err, "errno", None)
    if code in (errnos.ENOSPC, errnos.EDQUOT) or "disk is full" in reason:
        reason += " (free some space, or write the run elsewhere)"
    return WriteError(where, reason, code if isinstance(code, int) else None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written atomically in the checkpoint's own folder.

    Lightning's own writer stages a checkpoint in the system's temporary folder and moves it into place; across
    two filesystems that move is a copy over the old file, so a disk that fills up during it leaves a cut
    ``last.ckpt`` where an intact one was (and a small ``/tmp`` refuses checkpoints the run folder has room for).
    Here the file is serialised in memory, as Lightning does, then written beside its target and renamed over
    it (`atomic_open`): a refused write leaves the previous checkpoint intact and raises
    [`WriteError`][lifelong.errors.WriteError] naming the file.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(err, target.parent) from None
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_open(target, "wb") as f:
            f.write(buffer.getbuffer())

    @override
    def remove_checkpoint(self, path: Any) -> None:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as err:
            raise write_error(err, path) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
