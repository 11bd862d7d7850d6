"""Task streams: LightningDataModules that yield one task after another within a single ``fit``.

The whole stream is one ``trainer.fit`` of ``num_tasks * epochs_per_task`` epochs. The trainer reloads the
train loader every ``epochs_per_task`` epochs and this module derives the current task from the epoch, so
Lightning's own checkpointing restores epoch, optimizer and callback state together. Validation returns one
loader per task (seen and unseen): its results after each task are the rows of the accuracy matrix.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lifelong.data.sources import find_image_dataset, load_image_dataset
from lifelong.data.tensors import BatchTransform, TaskData, TensorBatchLoader
from lifelong.errors import ResumeError


class TaskStream(L.LightningDataModule):
    """Base class of task streams.

    Subclasses implement :meth:`_build` (load data, fill ``_train``/``_test`` with one :class:`TaskData` per
    task and set ``transform``) and may extend :meth:`describe` and the state dict.

    Args:
        num_tasks: number of tasks in the stream.
        epochs_per_task: training epochs on each task.
        batch_size: training batch size.
        eval_batch_size: batch size for evaluation and for methods' importance estimates.
        seed: seeds everything random about the stream (its tasks and the shuffling), through local
            generators only.
        root: data folder, searched first (see :mod:`lifelong.data.sources`).
        download: allow torchvision to download missing files into ``root``.
        cumulative: train task ``t`` on the union of tasks ``0..t`` (the ``joint`` baseline).
        max_train_samples: keep at most this many training samples per task (a seeded random subset), for
            quick runs; ``None`` keeps all.
        max_test_samples: the same for each task's test set.
    """

    num_classes: int = 10
    input_shape: tuple[int, ...] = ()

    def __init__(
        self,
        num_tasks: int,
        epochs_per_task: int = 1,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        seed: int = 0,
        root: str | None = "data",
        download: bool = True,
        cumulative: bool = False,
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_tasks", num_tasks),
            ("epochs_per_task", epochs_per_task),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if int(value) < 1:
                raise ValueError(f"dataset.{name} must be at least 1, got {value}")
        for name, limit in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
            if limit is not None and int(limit) < 1:
                raise ValueError(f"dataset.{name} must be a positive number or null, got {limit}")
        self.num_tasks = int(num_tasks)
        self.epochs_per_task = int(epochs_per_task)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = int(seed)
        self.root = root
        self.download = download
        self.cumulative = cumulative
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.transform: BatchTransform | None = None
        self._train: list[TaskData] = []
        self._test: list[TaskData] = []
        self._device = torch.device("cpu")

    # ---- the stream's clock ------------------------------------------------------------------------
    @property
    def max_epochs(self) -> int:
        return self.num_tasks * self.epochs_per_task

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during ``epoch`` (0-based)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def is_task_end(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last epoch of its task (a task boundary follows it)."""
        return (epoch + 1) % self.epochs_per_task == 0

    # ---- data --------------------------------------------------------------------------------------
    def _build(self) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Runs on one process per node: locate, decompress or download the files once."""
        self._prepare_files()

    def _prepare_files(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self._train:
            self._build()
            self._limit()
        if self.trainer is not None:
            self._place(self.trainer.strategy.root_device)

    def _limit(self) -> None:
        """Apply ``max_train_samples`` / ``max_test_samples`` (seeded; the same rows for every task)."""
        for tasks, limit, salt in ((self._train, self.max_train_samples, 1), (self._test, self.max_test_samples, 2)):
            if limit is not None:
                for i, d in enumerate(tasks):
                    tasks[i] = d.subset(int(limit), torch.Generator().manual_seed(self.seed * 31 + salt))

    def _place(self, device: torch.device) -> None:
        """Move every task's tensors to ``device`` once, keeping shared bases shared."""
        if device == self._device:
            return
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        for tasks in (self._train, self._test):
            for i, d in enumerate(tasks):
                tasks[i] = TaskData(move(d.images), move(d.labels), move(d.rows), move(d.tasks), d.task)
        self._place_transform(device)
        self._device = device

    def _place_transform(self, device: torch.device) -> None:
        """Move the transform's tensors (if any) to ``device``."""

    def train_data(self, task: int) -> TaskData:
        """The training samples of ``task`` (what methods estimate importances on)."""
        return self._train[task]

    def test_data(self, task: int) -> TaskData:
        return self._test[task]

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def loader(self, data: TaskData, *, train: bool, epoch: int = 0) -> TensorBatchLoader:
        """A loader over ``data``: shuffled and padded across ranks for training, in order otherwise."""
        assert self.transform is not None, "call setup() first"
        rank, world = self._rank()
        return TensorBatchLoader(
            data,
            self.batch_size if train else self.eval_batch_size,
            self.transform,
            shuffle=train,
            seed=self.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            pad=train,
        )

    def train_dataloader(self) -> TensorBatchLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        task = self.task_of_epoch(epoch)
        data = TaskData.concat(self._train[: task + 1]) if self.cumulative else self._train[task]
        return self.loader(data, train=True, epoch=epoch)

    def val_dataloader(self) -> list[TensorBatchLoader]:
        return [self.loader(d, train=False) for d in self._test]

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The stream's batches are made on the training device already: skip Lightning's generic move."""
        if isinstance(batch, tuple) and all(isinstance(t, torch.Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- reproducibility ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What defines this stream, for ``metrics.json``: enough to rebuild and to check it."""
        return {
            "class": type(self).__name__,
            "num_tasks": self.num_tasks,
            "seed": self.seed,
            "max_train_samples": self.max_train_samples,
            "max_test_samples": self.max_test_samples,
            "train_sizes": [len(d) for d in self._train],
            "test_sizes": [len(d) for d in self._test],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"describe": self.describe()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint on a different stream (other seed, tasks or permutations)."""
        saved = state_dict.get("describe")
        if saved is not None and self._train and saved != self.describe():
            raise ResumeError(
                "the checkpoint was written for a different task stream:\n"
                f"  checkpoint: {saved}\n  this run:   {self.describe()}\n"
                "Resume with the same dataset options and seed as the original run."
            )


def _pixel_mean_std(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixels, in [0, 1] units, from their histogram (no float copy)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    var = (counts * (values - mean) ** 2).sum() / (counts.sum() - 1)
    return mean.item(), var.sqrt().item()


def stream_of(trainer: L.Trainer) -> TaskStream:
    """The trainer's datamodule, checked to be a :class:`TaskStream` (methods and the module need one)."""
    dm = getattr(trainer, "datamodule", None)
    if not isinstance(dm, TaskStream):
        raise TypeError(
            f"lifelong needs a lifelong.data.TaskStream datamodule, got {type(dm).__name__}: "
            "pass datamodule=<a TaskStream> to trainer.fit"
        )
    return dm


class _NormalizePermute:
    """Scale uint8 pixels to standardised floats, then permute pixels by task. Shapes: (B, C, H, W)."""

    def __init__(self, mean: float, std: float, perms: torch.Tensor) -> None:
        self.scale = 1.0 / (255.0 * std)
        self.shift = mean / std
        self.perms = perms  # (T, H*W) int64

    def __call__(self, images: torch.Tensor, tasks: torch.Tensor, task: int | None) -> torch.Tensor:
        b, c, h, w = images.shape
        x = images.reshape(b, c, h * w)
        # permute the uint8 pixels (a quarter of the bytes of floats), then scale
        if task is not None:
            x = x.index_select(2, self.perms[task])
        else:  # a batch of several tasks (the joint baseline): one permutation per sample
            x = x.gather(2, self.perms[tasks].unsqueeze(1).expand(b, c, h * w))
        return x.float().mul_(self.scale).sub_(self.shift).view(b, c, h, w)


class PermutedStream(TaskStream):
    """Permuted MNIST / Fashion-MNIST (Goodfellow et al., 2013; Kirkpatrick et al., 2017).

    Every task is the full dataset with its own fixed pixel permutation, drawn from a local generator seeded
    by ``seed``: the same seed gives the same permutations on any machine. Ten classes, one shared output
    (the domain-incremental setting in which EWC was introduced).

    Args:
        source: ``"mnist"`` or ``"fashion_mnist"``.
        first_task_unpermuted: make task 0 the original images (identity permutation).
        **kwargs: see :class:`TaskStream`.
    """

    def __init__(self, source: str = "mnist", first_task_unpermuted: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.first_task_unpermuted = first_task_unpermuted
        self.perms: torch.Tensor | None = None

    def _prepare_files(self) -> None:
        find_image_dataset(self.source, self.root, self.download)

    def _build(self) -> None:
        train, test = load_image_dataset(self.source, self.root, self.download)
        _, c, h, w = train.images.shape
        self.input_shape = (c, h, w)
        self.num_classes = int(train.labels.max()) + 1
        g = torch.Generator().manual_seed(self.seed)
        perms = torch.stack([torch.randperm(h * w, generator=g) for _ in range(self.num_tasks)])
        if self.first_task_unpermuted:
            perms[0] = torch.arange(h * w)
        self.perms = perms
        mean, std = _pixel_mean_std(train.images)
        self.transform = _NormalizePermute(mean, std, perms)
        self._train = [TaskData.whole(train.images, train.labels, t) for t in range(self.num_tasks)]
        self._test = [TaskData.whole(test.images, test.labels, t) for t in range(self.num_tasks)]

    def _place_transform(self, device: torch.device) -> None:
        assert isinstance(self.transform, _NormalizePermute)
        self.transform.perms = self.transform.perms.to(device)

    def describe(self) -> dict[str, Any]:
        assert self.perms is not None
        return {
            **super().describe(),
            "source": self.source,
            "first_task_unpermuted": self.first_task_unpermuted,
            # a short fingerprint per permutation; the full permutations are in the checkpoint
            "permutation_sha1": [hashlib.sha1(p.numpy().tobytes()).hexdigest()[:12] for p in self.perms.cpu()],
        }

    def state_dict(self) -> dict[str, Any]:
        assert self.perms is not None
        return {**super().state_dict(), "permutations": self.perms.cpu()}
