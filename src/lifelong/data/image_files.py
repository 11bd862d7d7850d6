"""Image data stored one file per image: reading such a dataset at one size, and image folders (torchvision's
``ImageFolder`` layout, one folder of images per class), the ``image_folder:PATH`` sources."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL
import PIL.Image
import torch
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from lifelong.data.checks import SplitFiles, check_class_folders, check_split
from lifelong.errors import CorruptDataError, DataNotFoundError

log = logging.getLogger(__name__)

IMAGE_FOLDER = "image_folder:"  # the prefix of a source in torchvision's ImageFolder layout: image_folder:PATH
DEFAULT_FILE_SIZE = (32, 32)  # the size at which one-file-per-image datasets are read, unless a stream asks


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


def read_files(ds: datasets.VisionDataset, size: tuple[int, int]) -> ImageSplit:
    """Every image of a one-file-per-image dataset (``samples``: ``(path, label)`` pairs), read at ``size``.

    An image that cannot be decoded is named; images of other sizes are resized, and the log says so once.
    """
    sizes: set[tuple[int, int]] = set()

    def note_size(img: PIL.Image.Image) -> PIL.Image.Image:
        sizes.add(img.size)
        return img

    ds.transform = transforms.Compose([note_size, transforms.Resize(size, antialias=True), transforms.PILToTensor()])
    samples: list[tuple[str, int]] = getattr(ds, "samples", None) or getattr(ds, "_samples", [])
    if len(ds) == 0:
        return ImageSplit(torch.zeros(0, 3, *size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    pairs = []
    for i in range(len(ds)):
        try:
            pairs.append(ds[i])
        except (OSError, ValueError, PIL.UnidentifiedImageError) as err:
            path = samples[i][0] if i < len(samples) else f"sample {i}"
            reason = "not an image file PIL can decode" if isinstance(err, PIL.UnidentifiedImageError) else str(err)
            raise CorruptDataError(
                f"the image {path} cannot be read ({type(err).__name__}: {reason.splitlines()[0] if reason else ''}): "
                "replace it with a good copy, or delete it, then run again"
            ) from None
    images = torch.stack([img for img, _ in pairs])
    if sizes != {(size[1], size[0])}:  # PIL sizes are (W, H)
        ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
        where = os.path.commonpath([p for p, _ in samples]) if samples else type(ds).__name__
        log.info(
            f"{where}: {len(pairs)} images of {len(sizes)} size{'s' if len(sizes) > 1 else ''} "
            f"({min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} pixels) read at {size[1]} x {size[0]} (bilinear, antialiased)"
        )
    return ImageSplit(images.contiguous(), torch.tensor([int(label) for _, label in pairs], dtype=torch.long))


IMAGE_FOLDER_TEST_FRACTION = 0.2  # held out per class when a folder has no train/ and test/ split of its own


def _has_split_folders(folder: Path) -> bool:
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _class_names(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def find_image_folder(path: str, dirs: Sequence[Path]) -> Path:
    """The folder of an ``image_folder:PATH`` source: ``PATH`` if absolute, else the first ``<dir>/PATH`` of
    the data folders ``dirs`` ([`lifelong.data.sources.search_dirs`][lifelong.data.sources.search_dirs]) that holds
    class folders (or ``train/`` and ``test/``).

    Raises:
        DataNotFoundError: no such folder; the message lists the folders searched and the layout expected.
    """
    if not path:
        raise ValueError(f"{IMAGE_FOLDER} needs a folder: {IMAGE_FOLDER}PATH (absolute, or below the data folders)")
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [d / given for d in dirs]
    for folder in candidates:
        if folder.is_dir() and (_has_split_folders(folder) or _class_names(folder)):
            return folder
    lines = "\n  ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"the image folder {path!r} was not found in any of these places:\n  {lines}\n"
        "Provide it in torchvision's ImageFolder layout, one folder of images per class (PATH/<class>/*.png), "
        "or with its own split (PATH/train/<class>/..., PATH/test/<class>/...), and pass an absolute path, "
        "or a path relative to dataset.root or a folder of $LIFELONG_DATA_DIR."
    )


def load_image_folder(folder: Path, size: tuple[int, int] | None = None) -> tuple[ImageSplit, ImageSplit]:
    """The train and test split of an image folder, read by torchvision's ``ImageFolder`` (PIL, RGB) at ``size``.

    With ``train/`` and ``test/`` subfolders those are the splits (their classes must be the same); otherwise a
    fixed ``IMAGE_FOLDER_TEST_FRACTION`` of each class (a seeded choice that does not depend on the run's
    seed, so every run tests on the same images) is the test split.
    """
    hw = size or DEFAULT_FILE_SIZE
    parts = [folder / "train", folder / "test"] if _has_split_folders(folder) else [folder]
    read = []
    for part in parts:
        classes = _class_names(part)
        if not classes:
            check_class_folders(part, classes, [], IMG_EXTENSIONS)
        try:
            ds = datasets.ImageFolder(str(part), allow_empty=True)  # empty classes: named below, with their paths
        except OSError as err:
            raise CorruptDataError(f"the image folder {folder} could not be read ({err})") from err
        counts = torch.bincount(torch.as_tensor(ds.targets, dtype=torch.long), minlength=len(ds.classes))
        check_class_folders(part, ds.classes, counts.tolist(), IMG_EXTENSIONS)
        read.append(ds)
    if len(read) == 2 and read[0].classes != read[1].classes:
        raise CorruptDataError(
            f"{folder}: train/ and test/ hold different class folders ({read[0].classes[:5]}... against "
            f"{read[1].classes[:5]}...); give both the same classes"
        )
    splits = [read_files(ds, hw) for ds in read]
    for split, part, name in zip(splits, parts, ("training", "test"), strict=False):
        files = SplitFiles(f"the image folder {folder}", name, str(part), f"the class folders of {part}")
        check_split(split.images, split.labels, len(read[0].classes), files)
    if len(splits) == 2:
        return splits[0], splits[1]
    whole = splits[0]
    g = torch.Generator().manual_seed(0)
    test_rows = []
    for c in whole.labels.unique():
        rows = (whole.labels == c).nonzero().squeeze(1)
        k = round(IMAGE_FOLDER_TEST_FRACTION * len(rows))
        test_rows.append(rows[torch.randperm(len(rows), generator=g)[:k]])
    is_test = torch.zeros(len(whole), dtype=torch.bool)
    is_test[torch.cat(test_rows)] = True
    pick = [is_test.logical_not().nonzero().squeeze(1), is_test.nonzero().squeeze(1)]
    train, test = (ImageSplit(whole.images[p], whole.labels[p]) for p in pick)
    if len(train) == 0 or len(test) == 0:
        raise CorruptDataError(f"the image folder {folder} holds too few images to split into train and test")
    return train, test
