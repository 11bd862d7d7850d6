"""The task streams: permuted, rotated, split (class-incremental splits of one dataset) and dataset sequences.

Every stream draws its randomness (permutations, angles, class orders) from local generators seeded by the
stream's ``seed``, records it in `describe` (``metrics.json``) and in its state dict (checkpoints),
and refuses to resume a checkpoint of a different stream.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch

from lifelong.data.sources import (
    IMAGE_FOLDER,
    SOURCES,
    ImageSplit,
    find_image_dataset,
    load_image_dataset,
    num_classes_of,
)
from lifelong.data.streams import TaskStream
from lifelong.data.tensors import TaskData
from lifelong.data.transforms import ImagePipeline, RandomCropFlip, resize_images
from lifelong.errors import DataNotFoundError

log = logging.getLogger(__name__)


def _check_source(name: str, image_folders: bool = False) -> None:
    if image_folders and name.startswith(IMAGE_FOLDER):
        if not name[len(IMAGE_FOLDER) :]:
            raise ValueError(f"{IMAGE_FOLDER} needs a folder: {IMAGE_FOLDER}PATH (absolute, or below dataset.root)")
        return
    if name not in SOURCES:
        extra = f" and {IMAGE_FOLDER}PATH" if image_folders else f" ({IMAGE_FOLDER}PATH works in dataset.datasets)"
        raise ValueError(f"unknown dataset source {name!r}; known: {sorted(SOURCES)}{extra}")


def _same_classes_every_task(num_tasks: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes).expand(num_tasks, num_classes).clone()


class _OneSourceStream(TaskStream):
    """A stream whose every task is drawn from one dataset (standardised by its training set's statistics)."""

    def __init__(self, source: str = "mnist", **kwargs: Any) -> None:
        _check_source(source)
        self.source = source
        super().__init__(**kwargs)

    def _prepare_files(self) -> None:
        find_image_dataset(self.source, self.root, self.download)

    def _load(self) -> tuple[ImageSplit, ImageSplit, torch.Tensor, torch.Tensor]:
        train, test = load_image_dataset(self.source, self.root, self.download)
        self.input_shape = tuple(train.images.shape[1:])
        mean, std = self._pixel_stats(train.images)
        return train, test, mean.expand(self.num_tasks, -1), std.expand(self.num_tasks, -1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source}


class PermutedStream(_OneSourceStream):
    """Permuted MNIST / Fashion-MNIST (Goodfellow et al., 2013; Kirkpatrick et al., 2017).

    Every task is the full dataset with its own fixed pixel permutation, drawn from a local generator seeded
    by ``seed``: the same seed gives the same permutations on any machine. Ten classes per task; by default
    the domain scenario (one shared head), in which EWC was introduced.

    Args:
        source: ``"mnist"`` or ``"fashion_mnist"`` (any source works).
        first_task_unpermuted: make task 0 the original images (identity permutation).
        **kwargs: see `TaskStream`.
    """

    def __init__(self, source: str = "mnist", first_task_unpermuted: bool = False, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.first_task_unpermuted = first_task_unpermuted
        self.perms: torch.Tensor | None = None

    def _build(self) -> None:
        train, test, mean, std = self._load()
        h, w = train.images.shape[2:]
        g = torch.Generator().manual_seed(self.seed)
        perms = torch.stack([torch.randperm(h * w, generator=g) for _ in range(self.num_tasks)])
        if self.first_task_unpermuted:
            perms[0] = torch.arange(h * w)
        self.perms = perms
        self.transform = ImagePipeline(mean, std, perms=perms)
        self._local = _same_classes_every_task(self.num_tasks, SOURCES[self.source].num_classes)
        self._train = [TaskData.whole(train.images, train.labels, t) for t in range(self.num_tasks)]
        self._test = [TaskData.whole(test.images, test.labels, t) for t in range(self.num_tasks)]

    def describe(self) -> dict[str, Any]:
        assert self.perms is not None
        return {
            **super().describe(),
            "first_task_unpermuted": self.first_task_unpermuted,
            # a short fingerprint per permutation; the full permutations are in the checkpoint
            "permutation_sha1": [hashlib.sha1(p.numpy().tobytes()).hexdigest()[:12] for p in self.perms.cpu()],
        }

    def state_dict(self) -> dict[str, Any]:
        assert self.perms is not None
        return {**super().state_dict(), "permutations": self.perms.cpu()}


class RotatedStream(_OneSourceStream):
    """Rotated MNIST (Lopez-Paz & Ranzato, 2017): every task is the full dataset rotated by its own angle.

    Rotations are applied to whole batches on the device (bilinear, black outside the image).

    Args:
        source: the dataset (default ``"mnist"``).
        angles: one angle in degrees per task (counter-clockwise), or ``None`` to draw them uniformly from
            ``[0, max_angle)`` with a local generator seeded by ``seed``.
        max_angle: the range of drawn angles.
        **kwargs: see `TaskStream`.
    """

    def __init__(
        self,
        source: str = "mnist",
        angles: Sequence[float] | None = None,
        max_angle: float = 180.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        if angles is not None and len(angles) < self.num_tasks:
            raise ValueError(
                f"dataset.angles lists {len(angles)} angles for {self.num_tasks} tasks: give one per task "
                "(or angles=null to draw them from the seed)"
            )
        if not max_angle > 0:
            raise ValueError(f"dataset.max_angle must be > 0, got {max_angle}")
        if angles is not None:
            self.angles = torch.tensor([float(a) for a in angles[: self.num_tasks]], dtype=torch.float64)
        else:
            g = torch.Generator().manual_seed(self.seed)
            self.angles = torch.rand(self.num_tasks, generator=g, dtype=torch.float64) * float(max_angle)
        self.max_angle = float(max_angle)

    def _build(self) -> None:
        train, test, mean, std = self._load()
        self.transform = ImagePipeline(mean, std, angles=self.angles, image_size=train.images.shape[2:])
        self._local = _same_classes_every_task(self.num_tasks, SOURCES[self.source].num_classes)
        self._train = [TaskData.whole(train.images, train.labels, t) for t in range(self.num_tasks)]
        self._test = [TaskData.whole(test.images, test.labels, t) for t in range(self.num_tasks)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "angles": [round(a, 6) for a in self.angles.tolist()]}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "angles": self.angles.clone()}


class SplitStream(_OneSourceStream):
    """Split MNIST / Fashion-MNIST / CIFAR-10 / CIFAR-100 (Zenke et al., 2017): the classes of one dataset
    divided into tasks of ``classes_per_task`` classes each.

    Task ``t`` holds the classes ``class_order[t*k : (t+1)*k]``; its local class ``i`` is
    ``class_order[t*k + i]``. By default the task scenario (one head per task).

    Args:
        source: the dataset (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``, ...).
        classes_per_task: classes in each task.
        num_tasks: the number of tasks; ``None`` for all classes (``num_classes // classes_per_task``).
        class_order: ``None`` for the natural order (0-1, 2-3, ...), ``"random"`` for a permutation drawn from
            ``seed``, or an explicit list of classes.
        augment: random crops (4-pixel padding) and horizontal flips of training batches, the usual
            CIFAR augmentation.
        **kwargs: see `TaskStream`.
    """

    default_scenario = "task"

    def __init__(
        self,
        source: str = "mnist",
        classes_per_task: int = 2,
        num_tasks: int | None = None,
        class_order: str | Sequence[int] | None = None,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_source(source)
        total = SOURCES[source].num_classes
        if not 1 <= classes_per_task <= total:
            raise ValueError(f"dataset.classes_per_task must be in [1, {total}] for {source}, got {classes_per_task}")
        if num_tasks is None:
            num_tasks = total // classes_per_task
        if num_tasks * classes_per_task > total:
            raise ValueError(
                f"{num_tasks} tasks of {classes_per_task} classes need {num_tasks * classes_per_task} classes; "
                f"{source} has {total}. Lower dataset.num_tasks or dataset.classes_per_task"
            )
        super().__init__(source, num_tasks=num_tasks, **kwargs)
        self.classes_per_task = int(classes_per_task)
        self.class_order = self._order(class_order, total)
        self.augment = RandomCropFlip(4) if augment else None

    def _order(self, class_order: str | Sequence[int] | None, total: int) -> list[int]:
        needed = self.num_tasks * self.classes_per_task
        if class_order is None:
            return list(range(total))
        if isinstance(class_order, str):
            if class_order != "random":
                raise ValueError(f"dataset.class_order must be null, 'random' or a list, got {class_order!r}")
            return torch.randperm(total, generator=torch.Generator().manual_seed(self.seed)).tolist()
        order = [int(c) for c in class_order]
        if len(set(order)) != len(order) or not all(0 <= c < total for c in order) or len(order) < needed:
            raise ValueError(
                f"dataset.class_order must list at least {needed} distinct classes in [0, {total}), got {order}"
            )
        return order

    def _build(self) -> None:
        train, test, mean, std = self._load()
        self.transform = ImagePipeline(mean, std)
        k, total = self.classes_per_task, SOURCES[self.source].num_classes
        local = torch.full((self.num_tasks, total), -1, dtype=torch.long)
        for t in range(self.num_tasks):
            for i, c in enumerate(self.class_order[t * k : (t + 1) * k]):
                local[t, c] = i
        self._local = local
        self._train = [self._task(train, t) for t in range(self.num_tasks)]
        self._test = [self._task(test, t) for t in range(self.num_tasks)]

    def _task(self, split: ImageSplit, t: int) -> TaskData:
        assert self._local is not None
        rows = (self._local[t].index_select(0, split.labels) >= 0).nonzero().squeeze(1)
        return TaskData(split.images, split.labels, rows, torch.full_like(rows, t), t)

    def describe(self) -> dict[str, Any]:
        k = self.classes_per_task
        return {
            **super().describe(),
            "classes_per_task": k,
            "task_labels": [self.class_order[t * k : (t + 1) * k] for t in range(self.num_tasks)],
            "augment": self.augment is not None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "class_order": list(self.class_order)}


class SequenceStream(TaskStream):
    """A sequence of datasets, one task each: MNIST then USPS, or the HAT/DWA "mixture" of FaceScrub, MNIST,
    CIFAR-100, notMNIST, SVHN, CIFAR-10, traffic signs and Fashion-MNIST (Serra et al., 2018).

    All images are resized (bilinear, antialiased) to one ``image_size`` and channel count when the stream is
    built, and each task is standardised by its own dataset's statistics. Every task keeps all its classes
    (local class = the dataset's label); by default the task scenario (one head per dataset).

    Args:
        datasets: the sources in order, e.g. ``["mnist", "usps"]``; a source may appear more than once, and
            ``image_folder:PATH`` names a dataset in torchvision's ImageFolder layout (one folder per class).
        num_tasks: ``None`` for one task per dataset, or fewer to use the first ones.
        image_size: ``[H, W]`` of every task; ``None`` for the first dataset's size.
        channels: 1 or 3; ``None`` for the most channels of any dataset (grey images are repeated).
        reverse: run the sequence in reverse order (e.g. USPS then MNIST).
        shuffle: shuffle the order by ``seed``, as HAT's and DWA's mixture does; ``seed=0`` keeps the order
            given (the listed order is the published seed-0 one), any other seed draws a permutation.
        augment: random crops and flips of training batches (for natural images).
        **kwargs: see `TaskStream`.
    """

    default_scenario = "task"

    def __init__(
        self,
        datasets: Sequence[str] = ("mnist", "usps"),
        num_tasks: int | None = None,
        image_size: Sequence[int] | None = None,
        channels: int | None = None,
        reverse: bool = False,
        shuffle: bool = False,
        augment: bool = False,
        **kwargs: Any,
    ) -> None:
        names = [str(d) for d in datasets]
        if not names:
            raise ValueError("dataset.datasets must list at least one dataset")
        for name in names:
            _check_source(name, image_folders=True)
        if reverse:
            names = names[::-1]
        seed = int(kwargs.get("seed", 0))
        if shuffle and seed != 0:
            names = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
        if num_tasks is None:
            num_tasks = len(names)
        if num_tasks > len(names):
            raise ValueError(f"dataset.num_tasks={num_tasks} but dataset.datasets lists only {len(names)}: {names}")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1, 3 or null, got {channels}")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 4):
            raise ValueError(f"dataset.image_size must be [H, W] with H, W >= 4, got {list(image_size)}")
        super().__init__(num_tasks=num_tasks, **kwargs)
        self.datasets = names[:num_tasks]
        self.reverse = reverse
        self.shuffle = shuffle
        self.image_size = [int(s) for s in image_size] if image_size is not None else None
        self.channels = channels
        self.augment = RandomCropFlip(4) if augment else None

    def _prepare_files(self) -> None:
        """Locate every dataset; when some are missing, one error names all of them."""
        missing: list[tuple[str, DataNotFoundError]] = []
        for name in dict.fromkeys(self.datasets):
            try:
                find_image_dataset(name, self.root, self.download)
            except DataNotFoundError as err:
                missing.append((name, err))
        if len(missing) == 1:
            raise missing[0][1]
        if missing:
            details = "\n\n".join(f"{name}: {err}" for name, err in missing)
            raise DataNotFoundError(
                f"{len(missing)} of the {len(dict.fromkeys(self.datasets))} datasets of this sequence are missing: "
                f"{', '.join(name for name, _ in missing)}.\n\n{details}"
            )

    def _build(self) -> None:
        size = self.image_size or None  # one-file-per-image datasets are read at the stream's size directly
        loaded = {
            name: load_image_dataset(name, self.root, self.download, size) for name in dict.fromkeys(self.datasets)
        }
        first = loaded[self.datasets[0]][0].images
        size = self.image_size or list(first.shape[2:])
        channels = self.channels or max(split[0].images.shape[1] for split in loaded.values())
        self.image_size, self.channels = size, channels
        self.input_shape = (channels, *size)
        train_parts, test_parts, means, stds = [], [], [], []
        for name in dict.fromkeys(self.datasets):
            c, h, w = loaded[name][0].images.shape[1:]
            if (c, h, w) != (channels, *size):
                log.info(f"{name}: {c} x {h} x {w} images converted to the stream's {channels} x {size[0]} x {size[1]}")
        for name in self.datasets:
            train, test = loaded[name]
            train = ImageSplit(resize_images(train.images, size, channels), train.labels)
            test = ImageSplit(resize_images(test.images, size, channels), test.labels)
            mean, std = self._pixel_stats(train.images)
            train_parts.append(train)
            test_parts.append(test)
            means.append(mean)
            stds.append(std)
        self.transform = ImagePipeline(torch.stack(means), torch.stack(stds))
        classes = {name: num_classes_of(name, self.root) for name in loaded}
        local = torch.full((self.num_tasks, max(classes.values())), -1, dtype=torch.long)
        for t, name in enumerate(self.datasets):
            local[t, : classes[name]] = torch.arange(classes[name])
        self._local = local
        self._train = _concat_tasks(train_parts)
        self._test = _concat_tasks(test_parts)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "datasets": self.datasets,
            "shuffle": self.shuffle,
            "image_size": self.image_size,
            "channels": self.channels,
            "augment": self.augment is not None,
        }


def _concat_tasks(parts: list[ImageSplit]) -> list[TaskData]:
    """One task per part, as rows of one shared base tensor (so the joint baseline can mix them)."""
    images = torch.cat([p.images for p in parts])
    labels = torch.cat([p.labels for p in parts])
    tasks, start = [], 0
    for t, part in enumerate(parts):
        rows = torch.arange(start, start + len(part))
        tasks.append(TaskData(images, labels, rows, torch.full_like(rows, t), t))
        start += len(part)
    return tasks
