"""Where image datasets come from: local folders first, torchvision's download last.

torchvision's dataset classes read the standard files; we only decide *which folder* they read from, so
an offline machine that already has the files works, and one that has none gets an error that lists every
folder searched and says how to provide the files.

Search order for a dataset (first hit wins):

1. ``root`` (``dataset.root`` in the config),
2. every folder in the environment variable ``LIFELONG_DATA_DIR`` (``os.pathsep``-separated),
3. known system locations (Debian's ``/usr/share/datasets``, whose ``dataset-fashion-mnist`` package ships
   the four Fashion-MNIST IDX ``.gz`` files),

then, if ``download`` is true, torchvision's own download into ``root``.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

from lifelong.errors import CorruptDataError, DataNotFoundError

ENV_VAR = "LIFELONG_DATA_DIR"
SYSTEM_DIRS = (Path("/usr/share/datasets"),)


@dataclass(frozen=True)
class ImageSplit:
    """One split of an image dataset, held as tensors (no PIL anywhere).

    Attributes:
        images: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass(frozen=True)
class _IdxSource:
    """A torchvision MNIST-family class and the folder names its files may sit in."""

    cls: type[datasets.MNIST]
    system_subdirs: tuple[str, ...]  # folder names used by system packages (e.g. Debian's)


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

SOURCES: dict[str, _IdxSource] = {
    "mnist": _IdxSource(datasets.MNIST, ("mnist",)),
    "fashion_mnist": _IdxSource(datasets.FashionMNIST, ("fashion-mnist", "fashion_mnist")),
}


def search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched for data, in order (see the module docstring)."""
    dirs: list[Path] = []
    if root:
        dirs.append(Path(root).expanduser())
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()).expanduser())
    dirs.extend(SYSTEM_DIRS)
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def _has_raw(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _IDX_FILES)


def _has_gz(folder: Path) -> bool:
    return all((folder / f"{name}.gz").is_file() for name in _IDX_FILES)


def _gunzip_into(src: Path, raw_folder: Path) -> None:
    """Decompress the four IDX ``.gz`` files of ``src`` into torchvision's ``raw`` layout."""
    raw_folder.mkdir(parents=True, exist_ok=True)
    for name in _IDX_FILES:
        target = raw_folder / name
        if target.is_file():
            continue
        tmp = target.with_suffix(".tmp")
        try:
            with gzip.open(src / f"{name}.gz", "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except (OSError, EOFError) as err:
            tmp.unlink(missing_ok=True)
            raise CorruptDataError(f"cannot decompress {src / (name + '.gz')}: {err}") from err
        tmp.replace(target)  # atomic: a half-written file is never taken for a good one


def _load_idx(cls: type[datasets.MNIST], root: Path) -> tuple[ImageSplit, ImageSplit]:
    try:
        splits = [cls(str(root), train=train, download=False) for train in (True, False)]
    except (RuntimeError, ValueError, AssertionError, OSError) as err:
        raise CorruptDataError(
            f"{cls.__name__} files under {root / cls.__name__ / 'raw'} could not be read ({err}). "
            "Delete them and provide fresh copies (or let torchvision download them)."
        ) from err
    out = []
    for ds in splits:
        images = ds.data
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (N, 1, H, W)
        out.append(ImageSplit(images.contiguous(), ds.targets.long()))
    return out[0], out[1]


def _locate(name: str, root: str | os.PathLike[str] | None) -> tuple[Path | None, list[str]]:
    """Find a folder from which ``name`` loads; returns it and a description of what was searched."""
    src = SOURCES[name]
    cls_dir = src.cls.__name__
    searched: list[str] = []
    for d in search_dirs(root):
        raw = d / cls_dir / "raw"
        searched.append(str(raw))
        if _has_raw(raw):
            return d, searched
        # Debian's layout: the four .gz files in /usr/share/datasets/<name>/.
        for sub in (*src.system_subdirs, cls_dir):
            folder = d / sub
            searched.append(f"{folder} (*.gz)")
            if _has_gz(folder) or _has_gz(raw):
                gz = folder if _has_gz(folder) else raw
                return _gunzip_somewhere(gz, root, cls_dir), searched
    return None, searched


def _gunzip_somewhere(gz: Path, root: str | os.PathLike[str] | None, cls_dir: str) -> Path:
    """Decompress into ``root`` if it is writable, else into the user's cache; returns the folder used."""
    targets = [Path(root).expanduser()] if root else []
    targets.append(_default_cache())
    for i, target in enumerate(targets):
        try:
            _gunzip_into(gz, target / cls_dir / "raw")
            return target
        except PermissionError:
            if i == len(targets) - 1:
                raise
    raise AssertionError("unreachable")


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lifelong" / "data"


def find_image_dataset(name: str, root: str | os.PathLike[str] | None = "data", download: bool = True) -> Path:
    """The folder from which torchvision's class for ``name`` loads: found, decompressed or downloaded.

    Args:
        name: one of :data:`SOURCES` (``"mnist"``, ``"fashion_mnist"``).
        root: the configured data folder; searched first, and where downloads and decompressed copies go.
        download: whether to let torchvision download the files when no local copy is found.

    Raises:
        DataNotFoundError: no local copy, and the download is off or failed; the message lists the folders
            searched and how to provide the files.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown image dataset {name!r}; known: {sorted(SOURCES)}")
    cls = SOURCES[name].cls
    found, searched = _locate(name, root)
    if found is not None:
        return found
    error: Exception | None = None
    if download and root:
        try:
            cls(str(Path(root).expanduser()), train=True, download=True)  # fetches both splits
            return Path(root).expanduser()
        except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError...)
            error = err
    lines = "\n  ".join(searched)
    first_line = str(error).strip().splitlines()[0] if error and str(error).strip() else ""
    reason = f"the download failed ({type(error).__name__}: {first_line})" if error else "download is off"
    raise DataNotFoundError(
        f"{cls.__name__} was not found in any of these folders:\n  {lines}\nand {reason}.\n"
        f"Put the four IDX files ({', '.join(_IDX_FILES)}, or their .gz) in <DIR>/{cls.__name__}/raw/ and "
        f"pass dataset.root=<DIR>, or set {ENV_VAR}=<DIR>"
        + (" (on Debian: apt-get install dataset-fashion-mnist)." if name == "fashion_mnist" else ".")
    )


def load_image_dataset(
    name: str, root: str | os.PathLike[str] | None = "data", download: bool = True
) -> tuple[ImageSplit, ImageSplit]:
    """Load the train and test split of ``name`` as uint8 tensors (see :func:`find_image_dataset`).

    Raises:
        DataNotFoundError: see :func:`find_image_dataset`.
        CorruptDataError: files were found but cannot be read.
    """
    return _load_idx(SOURCES[name].cls, find_image_dataset(name, root, download))
