"""Where image datasets come from: local folders first, torchvision's download last.

torchvision's dataset classes read the standard files; we only decide *which folder* they read from, so
an offline machine that already has the files works, and one that has none gets an error that lists every
folder searched and says how to provide the files.

Search order for a dataset (first hit wins):

1. ``root`` (``dataset.root`` in the config),
2. every folder in the environment variable ``LIFELONG_DATA_DIR`` (``os.pathsep``-separated),
3. known system locations (Debian's ``/usr/share/datasets``, whose ``dataset-fashion-mnist`` package ships
   the four Fashion-MNIST IDX ``.gz`` files),

each in the layout torchvision's class expects (see `SOURCES`: ``<dir>/MNIST/raw/``,
``<dir>/USPS/usps.bz2``, ``<dir>/cifar-10-batches-py/``, ``<dir>/SVHN/train_32x32.mat``,
``<dir>/gtsrb/GTSRB/Training/``, ...),

then, if ``download`` is true, torchvision's own download into ``root``.

Any dataset on disk in torchvision's ``ImageFolder`` layout (one folder per class) is a source too, named
``image_folder:PATH`` (see [`lifelong.data.image_files`][lifelong.data.image_files]): notMNIST and FaceScrub come that
way, and so does a user's own data. Datasets stored as one image file per sample (GTSRB, image folders) are read once at
a fixed size (32 x 32 unless the stream asks for another).
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import pickle
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import PIL.Image
import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from lifelong.data.checks import SplitFiles, check_idx_split, check_same_shape, check_split
from lifelong.data.image_files import (
    DEFAULT_FILE_SIZE,
    IMAGE_FOLDER,
    ImageSplit,
    _class_names,
    _has_split_folders,
    find_image_folder,
    load_image_folder,
    read_files,
)
from lifelong.errors import CorruptDataError, DataNotFoundError, WriteError
from lifelong.files import write_error

log = logging.getLogger(__name__)

ENV_VAR = "LIFELONG_DATA_DIR"
SYSTEM_DIRS = (Path("/usr/share/datasets"),)


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
        split_kw: how the class selects a split: ``"train"`` (``train=True/False``) or ``"split"`` (SVHN,
            GTSRB).
        num_classes: the number of classes.

    A class without a ``data`` array (GTSRB: one image file per sample, of any size) is read through its own
    ``__getitem__`` at a fixed size (see `load_image_dataset`).
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
    "gtsrb": Source(
        datasets.GTSRB,
        "",
        ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"),
        split_kw="split",
        num_classes=43,
    ),
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
    return all((root / f).exists() for f in src.files)


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
        except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # the .gz itself
            tmp.unlink(missing_ok=True)
            raise CorruptDataError(f"cannot decompress {src / (name + '.gz')}: {err}") from err
        except OSError as err:  # the copy
            tmp.unlink(missing_ok=True)
            if err.errno in _READ_ONLY:
                raise  # a read-only data folder: the caller decompresses into the cache instead
            raise write_error(err, target) from None  # a full disk, an I/O error
        tmp.replace(target)  # atomic: a half-written file is never taken for a good one


def _as_split(ds: datasets.VisionDataset, size: tuple[int, int] | None = None) -> ImageSplit:
    """The images of a torchvision dataset as ``(N, C, H, W)`` uint8, and its labels as int64.

    A dataset held in memory (``ds.data``) is taken as it is; one that reads an image file per sample is read
    through its own ``__getitem__`` (PIL, RGB), resized to ``size`` (bilinear, antialiased).
    """
    if not hasattr(ds, "data"):
        return read_files(ds, size or DEFAULT_FILE_SIZE)
    images = torch.as_tensor(np.asarray(ds.data))
    if images.ndim == 3:  # (N, H, W): grey
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):  # (N, H, W, C): CIFAR
        images = images.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels  # SVHN
    return ImageSplit(images.to(torch.uint8).contiguous(), torch.as_tensor(np.asarray(labels)).long().reshape(-1))


def _split_files(src: Source, root: Path, train: bool) -> SplitFiles:
    """Where ``src``'s class reads a split from below its ``root``, as messages name it."""
    name, split = src.cls.__name__, "training" if train else "test"
    cls: Any = src.cls
    if issubclass(cls, datasets.MNIST):
        raw = root / name / "raw"
        prefix = "train" if train else "t10k"
        images, labels = (str(raw / f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        return SplitFiles(name, split, images, labels)
    if issubclass(cls, datasets.CIFAR10):
        batches = [f for f, _ in (cls.train_list if train else cls.test_list)]
        where = str(root / cls.base_folder / (batches[0] if len(batches) == 1 else f"{{{','.join(batches)}}}"))
        return SplitFiles(name, split, where, where)
    if cls in (datasets.SVHN, datasets.USPS):  # split_list: {split: [url, file name, md5]}
        where = str(root / cls.split_list["train" if train else "test"][1])
        return SplitFiles(name, split, where, where)
    if cls is datasets.GTSRB:
        base = root / "gtsrb"
        if train:
            folder = base / "GTSRB" / "Training"
            return SplitFiles(name, split, str(folder), f"the class folders of {folder}")
        return SplitFiles(name, split, str(base / "GTSRB" / "Final_Test" / "Images"), str(base / "GT-final_test.csv"))
    return SplitFiles(name, split, str(root), str(root))


def _damaged_files(src: Source, root: Path) -> list[str]:
    """The files of a checksummed format (CIFAR, SVHN) that fail torchvision's MD5."""
    cls: Any = src.cls
    if issubclass(cls, datasets.CIFAR10):
        folder = root / cls.base_folder
        pairs = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    elif cls is datasets.SVHN:
        folder = root
        pairs = [(f, md5) for _, f, md5 in (cls.split_list[s] for s in ("train", "test"))]
    else:
        return []
    return [str(folder / f) for f, md5 in pairs if (folder / f).is_file() and not check_integrity(str(folder / f), md5)]


def _batch_counts(src: Source, root: Path, train: bool) -> str | None:
    """The first CIFAR batch whose images and labels differ in number, as a message (diagnosis only)."""
    cls: Any = src.cls
    if not issubclass(cls, datasets.CIFAR10):
        return None
    for f, _ in cls.train_list if train else cls.test_list:
        with open(root / cls.base_folder / f, "rb") as fin:
            entry = pickle.load(fin, encoding="latin1")
        n_images, n_labels = len(entry["data"]), len(entry.get("labels", entry.get("fine_labels", [])))
        if n_images != n_labels:
            return f"{root / cls.base_folder / f} holds {n_images:,} images but {n_labels:,} labels"
    return None


def _load(src: Source, root: Path, size: tuple[int, int] | None = None) -> tuple[ImageSplit, ImageSplit]:
    """Both splits of ``src`` from ``root``, each checked ([`lifelong.data.checks`][lifelong.data.checks]) before it is
    used."""
    files = [_split_files(src, root, train) for train in (True, False)]
    if issubclass(src.cls, datasets.MNIST):  # their headers first: torchvision reads any IDX file it is given
        for f in files:
            check_idx_split(Path(f.images), Path(f.labels), f.dataset, f.split)
    try:
        splits = [_as_split(src.dataset(root, train), size) for train in (True, False)]
    except CorruptDataError:
        raise
    except (RuntimeError, ValueError, AssertionError, OSError, EOFError, KeyError, PIL.UnidentifiedImageError) as err:
        damaged = _damaged_files(src, root)
        if damaged:
            raise CorruptDataError(
                f"{src.cls.__name__}: {', '.join(damaged)} fail{'s' if len(damaged) == 1 else ''} torchvision's MD5 "
                "check: the file is damaged or not the original. Replace it with a fresh copy (or delete it and let "
                "torchvision download it), then run again"
            ) from None
        where = ", ".join(str(root / f) for f in src.files[:2]) + (", ..." if len(src.files) > 2 else "")
        raise CorruptDataError(
            f"{src.cls.__name__} files ({where}) could not be read ({err}). "
            "Delete them and provide fresh copies (or let torchvision download them)."
        ) from err
    for split, f, train in zip(splits, files, (True, False), strict=True):
        if len(split.images) != len(split.labels):
            found = _batch_counts(src, root, train)
            if found:
                raise CorruptDataError(
                    f"{src.cls.__name__}'s {f.split} split: {found}. Replace it with a fresh copy of the dataset's "
                    "file (or delete it and let torchvision download it), then run again"
                )
        check_split(split.images, split.labels, src.num_classes, f)
    check_same_shape(splits[0].images, splits[1].images, files[1])
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
        except OSError as err:
            if isinstance(err, WriteError):
                raise
            if err.errno in _READ_ONLY and i < len(targets) - 1:
                continue  # the next folder
            raise write_error(err, target / cls_dir / "raw") from None
    raise AssertionError("unreachable")


_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # a folder we may not write: try the next one


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lifelong" / "data"


_HINTS = {
    "fashion_mnist": " (on Debian: apt-get install dataset-fashion-mnist)",
    "mnist": " (the four IDX files, or their .gz)",
}


def find_image_dataset(name: str, root: str | os.PathLike[str] | None = "data", download: bool = True) -> Path:
    """The folder from which torchvision's class for ``name`` loads: found, decompressed or downloaded.

    Args:
        name: one of `SOURCES` (``"mnist"``, ``"fashion_mnist"``, ``"usps"``, ``"cifar10"``,
            ``"cifar100"``, ``"svhn"``).
        root: the configured data folder; searched first, and where downloads and decompressed copies go.
        download: whether to let torchvision download the files when no local copy is found.

    Raises:
        DataNotFoundError: no local copy, and the download is off or failed; the message lists the folders
            searched and how to provide the files.
    """
    if name.startswith(IMAGE_FOLDER):
        return find_image_folder(name[len(IMAGE_FOLDER) :], search_dirs(root))
    if name not in SOURCES:
        raise ValueError(f"unknown image dataset {name!r}; known: {sorted(SOURCES)} and {IMAGE_FOLDER}PATH")
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
    name: str,
    root: str | os.PathLike[str] | None = "data",
    download: bool = True,
    size: Sequence[int] | None = None,
) -> tuple[ImageSplit, ImageSplit]:
    """Load the train and test split of ``name`` as uint8 tensors (see `find_image_dataset`).

    Args:
        name: one of `SOURCES`, or ``image_folder:PATH``.
        root: see `find_image_dataset`.
        download: see `find_image_dataset`.
        size: ``(H, W)`` at which datasets of one file per image (GTSRB, image folders) are read; default
            32 x 32. Datasets held in arrays keep their size.

    Raises:
        DataNotFoundError: see `find_image_dataset`.
        CorruptDataError: files were found but cannot be read.
    """
    hw = (int(size[0]), int(size[1])) if size is not None else None
    if name.startswith(IMAGE_FOLDER):
        return load_image_folder(find_image_dataset(name, root, download), hw)
    return _load(SOURCES[name], find_image_dataset(name, root, download), hw)


def num_classes_of(name: str, root: str | os.PathLike[str] | None = "data") -> int:
    """The number of classes of a source (an image folder's: its class folders)."""
    if name.startswith(IMAGE_FOLDER):
        folder = find_image_dataset(name, root, download=False)
        return len(_class_names(folder / "train" if _has_split_folders(folder) else folder))
    return SOURCES[name].num_classes
