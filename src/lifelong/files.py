"""Writing result files so that a reader, or a crash, never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed to disk and renamed over ``path``.

    The rename is atomic on POSIX and Windows: readers see the old file or the new one, never a part, and a
    crash or an exception leaves the old file (or none) and no temporary one behind.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)


def save_atomic(path: str | Path, save: Callable[[IO[bytes]], None]) -> None:
    """Call ``save(binary_file)`` (e.g. ``lambda f: fig.savefig(f, format="png")``) and put the result at ``path``
    atomically."""
    with atomic_open(path, "wb") as f:
        save(f)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
