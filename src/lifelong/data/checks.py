"""Checks of a dataset's files and of what was read from them, before anything trains on it.

torchvision's classes read what they are given: an MNIST folder whose training labels are the test set's
label file (10,000 labels for 60,000 images) loads without a word, and a stream trained on it reports a
number as if it were a result. Every source is checked here when it is loaded, and a failed check raises
[`CorruptDataError`][lifelong.errors.CorruptDataError] with one message that names the file and what to do:

- IDX files (MNIST, Fashion-MNIST), from their headers before torchvision reads them: the magic number, the
  number of dimensions (an images file is 3-D, a labels file 1-D), a file cut short or longer than its header
  says, and the image and label counts of a split;
- every split, once read (`check_split`): as many labels as images, labels inside the class range,
  every class with at least one image, images of 1 or 3 channels and of a usable size, the test split's
  images of the training split's shape (`check_same_shape`);
- image folders, as listed: a class folder without images (`check_class_folders`); an image that cannot be decoded is
  named by the reader ([`lifelong.data.sources.load_image_folder`][lifelong.data.image_files.load_image_folder]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lifelong.errors import CorruptDataError

MIN_SIDE = 4  # the smallest image side a stream accepts (the crop augmentation pads by 4)
_FIX = (
    "Replace it with a fresh copy of the dataset's file (or delete it and let torchvision download it), then run again"
)


@dataclass(frozen=True)
class SplitFiles:
    """Where one split of a dataset was read from, as messages name it.

    Attributes:
        dataset: the dataset's name (``"MNIST"``, ``"image_folder:digits"``).
        split: ``"training"`` or ``"test"``.
        images: the file or folder of its images.
        labels: the file or folder its labels come from (the images' own for one-file formats).
    """

    dataset: str
    split: str
    images: str
    labels: str

    def where(self) -> str:
        return self.images if self.images == self.labels else f"{self.images} and {self.labels}"


# ---- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------------
_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use


def idx_dims(path: Path, ndim: int, what: str) -> tuple[int, ...]:
    """The dimensions an IDX file's header announces, after checking it against the file's size.

    Args:
        path: the file.
        ndim: the dimensions expected (3 for images, 1 for labels).
        what: ``"images"`` or ``"labels"``, for the message.

    Raises:
        CorruptDataError: not an IDX file of unsigned bytes, another number of dimensions, or a size that
            differs from the header's.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * 3)
    if len(head) < 4 or head[:2] != b"\x00\x00":
        raise CorruptDataError(
            f"{path} is not an IDX file (its first bytes are {head[:4].hex() or 'missing'}, an IDX file starts "
            f"with 0000 and its type). {_FIX}"
        )
    kind, nd = head[2], head[3]
    if kind != _UBYTE:
        raise CorruptDataError(f"{path} holds IDX values of type 0x{kind:02x}, not unsigned bytes (0x08). {_FIX}")
    if nd != ndim:
        other = "an images" if nd == 3 else "a labels" if nd == 1 else f"a {nd}-D"
        raise CorruptDataError(
            f"{path} is {other} file (IDX of {nd} dimension{'s' if nd != 1 else ''}) where the {what} file "
            f"(IDX of {ndim}) belongs: the files are mixed up. Put each under its own name, then run again"
        )
    if len(head) < 4 + 4 * nd:
        raise CorruptDataError(f"{path} is cut short inside its header ({size} bytes). {_FIX}")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    expected = 4 + 4 * nd + math.prod(dims)
    if size != expected:
        shape = " x ".join(f"{d:,}" for d in dims)
        state = "is cut short" if size < expected else f"holds {size - expected:,} bytes more than its header says"
        raise CorruptDataError(
            f"{path} {state}: its header announces {shape} {what} ({expected:,} bytes with the header), the file "
            f"holds {size:,} bytes. {_FIX}"
        )
    return dims


def check_idx_split(images: Path, labels: Path, dataset: str, split: str) -> None:
    """The headers of one split's two IDX files, and their counts against each other."""
    n_images = idx_dims(images, 3, "images")[0]
    n_labels = idx_dims(labels, 1, "labels")[0]
    if n_images != n_labels:
        raise CorruptDataError(
            f"{dataset}'s {split} labels do not match its images: {labels} holds {n_labels:,} labels, {images} "
            f"holds {n_images:,} images (is one of them the other split's file?). Replace the wrong one with the "
            "dataset's own file (or delete both and let torchvision download them), then run again"
        )


# ---- any split, once read ------------------------------------------------------------------------------------
def check_split(images: torch.Tensor, labels: torch.Tensor, num_classes: int, files: SplitFiles) -> None:
    """What a stream needs of one split: ``images`` ``(N, C, H, W)``, ``labels`` ``(N,)`` in ``[0, num_classes)``.

    Raises:
        CorruptDataError: naming the file, for the first of: counts that differ, no samples, images that are
            not 1- or 3-channel or smaller than `MIN_SIDE`, labels outside the class range, a class
            with no image.
    """
    what = f"{files.dataset}'s {files.split} split"
    if images.shape[0] != labels.numel():
        raise CorruptDataError(
            f"{what} has {images.shape[0]:,} images but {labels.numel():,} labels ({files.where()}): the files "
            f"disagree. {_FIX}"
        )
    if labels.numel() == 0:
        raise CorruptDataError(f"{what} holds no samples ({files.where()}). {_FIX}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise CorruptDataError(
            f"{what} holds images of shape {tuple(images.shape[1:])} ({files.images}); a stream takes images of "
            f"1 (grey) or 3 (RGB) channels. Convert them (e.g. to RGB) and run again"
        )
    if min(images.shape[2:]) < MIN_SIDE:
        raise CorruptDataError(
            f"{what} holds images of {images.shape[2]} x {images.shape[3]} pixels ({files.images}); a stream needs "
            f"at least {MIN_SIDE} x {MIN_SIDE}. Check the files, or read them at a larger size (dataset.image_size)"
        )
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        bad = labels[outside]
        examples = ", ".join(str(v) for v in bad.unique()[:5].tolist())
        raise CorruptDataError(
            f"{what} has {_count(int(outside.sum()), 'label')} outside its class range [0, {num_classes}) "
            f"(e.g. {examples}) in {files.labels}. {_FIX}"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if empty:
        listed = ", ".join(str(c) for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
        raise CorruptDataError(
            f"{what} has no image of class{'es' if len(empty) > 1 else ''} {listed} (of {num_classes}) in "
            f"{files.labels}: a task of {'those classes' if len(empty) > 1 else 'that class'} would have nothing "
            f"to learn or test. {_FIX}"
        )


def check_same_shape(train: torch.Tensor, test: torch.Tensor, test_files: SplitFiles) -> None:
    """The test images of an array dataset must have the training images' shape (the stream's input)."""
    if tuple(train.shape[1:]) != tuple(test.shape[1:]):
        c, h, w = train.shape[1:]
        tc, th, tw = test.shape[1:]
        raise CorruptDataError(
            f"{test_files.dataset}'s test images ({test_files.images}) are {tc} x {th} x {tw} (channels x height "
            f"x width), its training images {c} x {h} x {w}: one network cannot take both. {_FIX}"
        )


# ---- image folders --------------------------------------------------------------------------------------------
def check_class_folders(
    folder: Path, classes: Sequence[str], counts: Sequence[int], extensions: tuple[str, ...]
) -> None:
    """Every class folder of an ImageFolder dataset holds at least one image file (``counts``: images per class,
    as torchvision's ``ImageFolder(..., allow_empty=True)`` found them, so the folder is walked once)."""
    if not classes:
        raise CorruptDataError(
            f"the image folder {folder} holds no class folders: put one folder of images per class in it "
            f"({folder}/<class>/*.png)"
        )
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        shown = ", ".join(str(folder / c) for c in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise CorruptDataError(
            f"{len(empty)} class folder{'s' if len(empty) > 1 else ''} of {folder} hold{'' if len(empty) > 1 else 's'} "
            f"no image ({shown}; images end in {', '.join(extensions)}): add images, or remove the folder "
            f"(a class with no image cannot be learnt or tested)"
        )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
