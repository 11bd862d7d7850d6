"""Where image datasets come from: local folders first, torchvision's download last.

torchvision's dataset classes read the standard files; we only decide *which folder* they read from, so
an offline machine that already has the files works, and one that has none gets an error that lists every
folder searched and says how to provide the files.

Search order for a dataset (first hit wins):

1. ``root`` (``dataset.root`` in the config),
2. every folder in the environment variable ``LIFELONG_DATA_DIR`` (``os.pathsep``-separated),
3. known system locations (Debian's ``/usr/share/datasets``, whose ``dataset-fashion-mnist`` package ships
   the four Fashion-MNIST IDX ``.gz`` files),

each in the layout torchvision's class expects (see :data:`SOURCES`: ``<dir>/MNIST/raw/``,
``<dir>/USPS/usps.bz2``, ``<dir>/cifar-10-batches-py/``, ``<dir>/SVHN/train_32x32.mat``, ...),

then, if ``download`` is true, torchvision's own download into ``root``.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
class Source:
    """One torchvision dataset class, and where its files sit below a data folder ``<dir>``.

    Attributes:
        cls: the torchvision class that reads (and downloads) the files.
        subdir: the class's ``root`` relative to ``<dir>`` (``""``: ``<dir>`` itself). MNIST's class reads
            ``<root>/MNIST/raw/``, so its ``root`` is ``<dir>``; USPS reads ``<root>/usps.bz2``, and the
            usual layout is ``<dir>/USPS/usps.bz2``.
        files: what must exist below the class's ``root`` for it to load without downloading.
        system_subdirs: folders of system packages that hold the IDX ``.gz`` files (Debian's layout).
        split_kw: how the class selects a split: ``"train"`` (``train=True/False``) or ``"split"`` (SVHN).
        num_classes: the number of classes.
    """

    cls: type[datasets.VisionDataset]
    subdir: str
    files: tuple[str, ...]
    system_subdirs: tuple[str, ...] = ()
    split_kw: str = "train"
    num_classes: int = 10

    def dataset(self, root: Path, train: bool, download: bool = False) -> datasets.VisionDataset:
        split: dict[str, object] = (
            {"train": train} if self.split_kw == "train" else {"split": "train" if train else "test"}
        )
        return self.cls(str(root), download=download, **split)


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx(cls: type[datasets.MNIST], system_subdirs: tuple[str, ...]) -> Source:
    return Source(cls, "", tuple(f"{cls.__name__}/raw/{f}" for f in _IDX_FILES), system_subdirs)


SOURCES: dict[str, Source] = {
    "mnist": _idx(datasets.MNIST, ("mnist",)),
    "fashion_mnist": _idx(datasets.FashionMNIST, ("fashion-mnist", "fashion_mnist")),
    "usps": Source(datasets.USPS, "USPS", ("usps.bz2", "usps.t.bz2")),
    "cifar10": Source(
        datasets.CIFAR10,
        "",
        tuple(
            f"cifar-10-batches-py/{f}"
            for f in ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))
        ),
    ),
    "cifar100": Source(
        datasets.CIFAR100, "", tuple(f"cifar-100-python/{f}" for f in ("meta", "train", "test")), num_classes=100
    ),
    "svhn": Source(datasets.SVHN, "SVHN", ("train_32x32.mat", "test_32x32.mat"), split_kw="split"),
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


def _has_files(root: Path, src: Source) -> bool:
    return all((root / f).is_file() for f in src.files)


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


def _as_split(ds: datasets.VisionDataset) -> ImageSplit:
    """The images of a torchvision dataset as ``(N, C, H, W)`` uint8, and its labels as int64."""
    images = torch.as_tensor(np.asarray(ds.data))
    if images.ndim == 3:  # (N, H, W): grey
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # (N, H, W, C): CIFAR
        images = images.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels  # SVHN
    return ImageSplit(images.to(torch.uint8).contiguous(), torch.as_tensor(np.asarray(labels)).long())


def _load(src: Source, root: Path) -> tuple[ImageSplit, ImageSplit]:
    try:
        splits = [_as_split(src.dataset(root, train)) for train in (True, False)]
    except (RuntimeError, ValueError, AssertionError, OSError, EOFError, KeyError) as err:
        files = ", ".join(str(root / f) for f in src.files[:2]) + (", ..." if len(src.files) > 2 else "")
        raise CorruptDataError(
            f"{src.cls.__name__} files ({files}) could not be read ({err}). "
            "Delete them and provide fresh copies (or let torchvision download them)."
        ) from err
    for split in splits:
        if len(split) == 0 or split.labels.min() < 0:
            raise CorruptDataError(f"{src.cls.__name__} under {root} holds no samples or negative labels")
    return splits[0], splits[1]


def _locate(name: str, root: str | os.PathLike[str] | None) -> tuple[Path | None, list[str]]:
    """Find the ``root`` from which ``name``'s class loads; returns it and a description of what was searched."""
    src = SOURCES[name]
    searched: list[str] = []
    for d in search_dirs(root):
        base = d / src.subdir if src.subdir else d
        searched.append(str(base / src.files[0]).rsplit("/", 1)[0] + "/")
        if _has_files(base, src):
            return base, searched
        if not src.system_subdirs:
            continue
        # Debian's layout: the four .gz files in /usr/share/datasets/<name>/.
        cls_dir = src.cls.__name__
        raw = d / cls_dir / "raw"
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


_HINTS = {
    "fashion_mnist": " (on Debian: apt-get install dataset-fashion-mnist)",
    "mnist": " (the four IDX files, or their .gz)",
}


def find_image_dataset(name: str, root: str | os.PathLike[str] | None = "data", download: bool = True) -> Path:
    """The folder from which torchvision's class for ``name`` loads: found, decompressed or downloaded.

    Args:
        name: one of :data:`SOURCES` (``"mnist"``, ``"fashion_mnist"``, ``"usps"``, ``"cifar10"``,
            ``"cifar100"``, ``"svhn"``).
        root: the configured data folder; searched first, and where downloads and decompressed copies go.
        download: whether to let torchvision download the files when no local copy is found.

    Raises:
        DataNotFoundError: no local copy, and the download is off or failed; the message lists the folders
            searched and how to provide the files.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown image dataset {name!r}; known: {sorted(SOURCES)}")
    src = SOURCES[name]
    found, searched = _locate(name, root)
    if found is not None:
        return found
    error: Exception | None = None
    if download and root:
        target = Path(root).expanduser() / src.subdir if src.subdir else Path(root).expanduser()
        try:
            for train in (True, False):
                src.dataset(target, train, download=True)
            return target
        except Exception as err:  # network errors come in many types (URLError, HTTPError, OSError...)
            error = err
    lines = "\n  ".join(searched)
    first_line = str(error).strip().splitlines()[0] if error and str(error).strip() else ""
    reason = f"the download failed ({type(error).__name__}: {first_line})" if error else "download is off"
    layout = "<DIR>/" + (f"{src.subdir}/" if src.subdir else "")
    raise DataNotFoundError(
        f"{src.cls.__name__} was not found in any of these folders:\n  {lines}\nand {reason}.\n"
        f"Put {', '.join(src.files)} in {layout}{_HINTS.get(name, '')} "
        f"and pass dataset.root=<DIR>, or set {ENV_VAR}=<DIR>."
    )


def load_image_dataset(
    name: str, root: str | os.PathLike[str] | None = "data", download: bool = True
) -> tuple[ImageSplit, ImageSplit]:
    """Load the train and test split of ``name`` as uint8 tensors (see :func:`find_image_dataset`).

    Raises:
        DataNotFoundError: see :func:`find_image_dataset`.
        CorruptDataError: files were found but cannot be read.
    """
    return _load(SOURCES[name], find_image_dataset(name, root, download))
