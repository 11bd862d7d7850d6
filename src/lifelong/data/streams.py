"""Task streams: LightningDataModules that yield one task after another within a single ``fit``.

The whole stream is one ``trainer.fit``. The stream owns its clock (`TaskStream.step`): for every training step it says
which task is trained and whether a task starts or ends there, and the module raises the task events from it
([`lifelong.data.schedule`][lifelong.data.schedule]). This base class's clock is ``epochs_per_task`` epochs per task:
the trainer rebuilds the train loader every epoch for the epoch's task, so Lightning's own checkpointing restores epoch,
optimizer and callback state together. `TaskStream.eval_loaders` gives one loader per task (seen and unseen): the
evaluation at each task's end fills a row of the accuracy matrix.

Scenarios (van de Ven & Tolias, 2019; Hsu et al., 2018). Each task has its own *local* classes
``0..K_t-1`` (a split task's two digits, a permuted task's ten); the scenario decides which output of the
network a local class is trained on:

* ``task``: every task has its own head, outputs ``offset_t .. offset_t + K_t - 1``; the task identity is
  given in training and at test, and only the task's head competes (multi-head);
* ``domain``: one shared head of ``K`` outputs, local class ``k`` is output ``k`` in every task; no task
  identity at test;
* ``class``: one head over all classes, local class ``k`` of task ``t`` is output ``offset_t + k``; the
  outputs of the classes seen so far compete, with no task identity at test.

The stream maps labels (`TaskStream.targets`); the heads live in the LightningModule
([`lifelong.models.ContinualClassifier`][lifelong.models.module.ContinualClassifier]), which takes
`TaskStream.task_classes`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lifelong.data.arguments import check_arguments
from lifelong.data.boundaries import Boundaries, fingerprint
from lifelong.data.schedule import Step, StreamNeeds
from lifelong.data.tensors import Augment, Batch, BatchTransform, TaskData, TensorBatchLoader
from lifelong.data.transforms import channel_mean_std
from lifelong.errors import ResumeError
from lifelong.seeding import generator


class TaskStream(L.LightningDataModule):
    """Base class of task streams.

    Subclasses implement `_build` (load data, fill ``_train``/``_test`` with one `TaskData` per
    task and set ``transform``) and may extend `describe` and the state dict.

    Args:
        num_tasks: number of tasks in the stream.
        epochs_per_task: training epochs on each task.
        batch_size: training batch size.
        eval_batch_size: batch size for evaluation and for methods' importance estimates.
        seed: seeds everything random about the stream (its tasks and the shuffling), through local
            generators only.
        root: data folder, searched first (see [`lifelong.data.sources`][lifelong.data.sources]).
        download: allow torchvision to download missing files into ``root``.
        cumulative: train task ``t`` on the union of tasks ``0..t`` (what the ``joint`` baseline declares it needs).
        max_train_samples: keep at most this many training samples per task (a seeded random subset), for
            quick runs; ``None`` keeps all.
        max_test_samples: the same for each task's test set.
        scenario: ``"task"``, ``"domain"`` or ``"class"`` (see the module docstring); ``None`` for the
            stream's default.
        standardize: standardise pixels by the training set's per-channel mean and std (default); ``False``
            keeps them in [0, 1], black = 0, as Kirkpatrick et al. (2017) and van de Ven et al. feed permuted
            MNIST. On a permuted stream this matters for EWC: with black at 0 the weights from a task's
            always-black pixels get no gradient from it and stay free for other tasks.
        val_fraction: hold out this fraction of each task's training data as its validation set (seeded by
            ``seed`` and the task, class-stratified, after ``max_train_samples``), in ``[0, 1)``. With a
            validation set, every task end evaluates validation and test separately, and validation is what
            a sweep should select on. ``0`` (the class's default) trains on all of it; ``conf/dataset``
            sets 0.1 for runs from the command line.
        online: the online setting: every training sample is seen once (``epochs_per_task`` must be 1); use
            small batches (``batch_size=10``).
        task_sizes: the training samples each task keeps (a seeded subset, after the validation split), for
            tasks of different lengths; ``None`` keeps them all.
        boundary: how tasks meet: ``"sharp"``, ``"blurry"`` or ``"fuzzy"``
            ([`lifelong.data.boundaries`][lifelong.data.boundaries]).
        blur: blurry: the share of each task's samples moved into other tasks.
        blur_into: blurry: ``"others"`` or ``"neighbours"``.
        ramp_width: fuzzy: the samples of the ramp around each boundary.
    """

    scenarios: tuple[str, ...] = ("task", "domain", "class")
    default_scenario: str = "domain"
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
        scenario: str | None = None,
        standardize: bool = True,
        val_fraction: float = 0.0,
        online: bool = False,
        task_sizes: list[int] | None = None,
        boundary: str = "sharp",
        blur: float = 0.1,
        blur_into: str = "others",
        ramp_width: int = 1000,
    ) -> None:
        super().__init__()
        self.boundary = Boundaries(boundary, blur, blur_into, ramp_width)
        self.online, self.task_sizes = bool(online), None if task_sizes is None else [int(n) for n in task_sizes]
        scenario = scenario or self.default_scenario
        check_arguments(
            type(self).__name__, self.scenarios, scenario, num_tasks=num_tasks, epochs_per_task=epochs_per_task,
            batch_size=batch_size, eval_batch_size=eval_batch_size, max_train_samples=max_train_samples,
            max_test_samples=max_test_samples, standardize=standardize, val_fraction=val_fraction, online=online,
            task_sizes=task_sizes,
        )  # fmt: skip
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
        self.scenario = scenario
        self.standardize = standardize
        self.val_fraction = float(val_fraction)
        self.transform: BatchTransform | None = None
        self.augment: Augment | None = None  # a random augmentation of training batches
        self.targets: torch.Tensor | None = None  # (T, K) base label -> output; None: the base labels
        self.num_classes = 0  # outputs of the network (all heads together)
        self.task_classes: list[list[int]] = []  # outputs of each task's classes
        self._local: torch.Tensor | None = None  # (T, K) base label -> local class of the task, -1 if none
        self._train: list[TaskData] = []
        self._test: list[TaskData] = []
        self._val: list[TaskData] = []  # empty without a validation split
        self._segments: list[TaskData] = []  # what each task trains on (its samples, or a blurry/fuzzy segment)
        self._device = torch.device("cpu")
        self.needs = StreamNeeds()  # what the run's methods declared (serve()); read by the training loader

    # ---- the stream's clock ------------------------------------------------------------------------
    @property
    def max_epochs(self) -> int:
        """The epochs of the whole stream: the trainer's ``max_epochs``."""
        return self.num_tasks * self.epochs_per_task

    @property
    def epochs_per_checkpoint(self) -> int:
        """Every how many epochs a task ends (the cadence of the per-task checkpoints)."""
        return self.epochs_per_task

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during ``epoch`` (0-based); for a stream with several tasks in an epoch, its last."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def epoch_in_task(self, epoch: int) -> tuple[int, int]:
        """``(e, of)``: ``epoch`` is the task's epoch ``e`` (0-based) of ``of``."""
        return epoch % self.epochs_per_task, self.epochs_per_task

    def step(self, epoch: int, batch: int, num_batches: int) -> Step:
        """The clock: where batch ``batch`` (0-based) of the ``num_batches`` of ``epoch`` falls in the stream.

        Here a task is ``epochs_per_task`` whole epochs: it starts at the first batch of its first epoch and ends
        at the last batch of its last. A stream whose boundaries fall elsewhere overrides this (and
        `train_dataloader`, to serve each step's task).
        """
        e, of = self.epoch_in_task(epoch)
        return Step(
            task=self.task_of_epoch(epoch),
            epoch_in_task=e,
            starts_task=batch == 0 and e == 0,
            ends_task=batch == num_batches - 1 and e == of - 1,
        )

    def serve(self, needs: StreamNeeds) -> None:
        """Serve what the run's methods declared they need ([`stream_needs`][lifelong.methods.base.stream_needs])."""
        self.needs = needs

    # ---- data --------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Load the data; fill ``_train``/``_test``, ``_local``, ``transform`` and ``input_shape``."""
        raise NotImplementedError

    def _pixel_stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) to standardise by: the images' own, or (0, 1) with ``standardize=False``."""
        if self.standardize:
            return channel_mean_std(images)
        channels = images.shape[1]
        return torch.zeros(channels), torch.ones(channels)

    def _resolve_labels(self) -> None:
        """The scenario's outputs: `targets`, `num_classes` and `task_classes`."""
        assert self._local is not None
        local = self._local[: self.num_tasks]
        sizes = [int(row.max()) + 1 for row in local]
        if self.scenario == "domain":
            if len(set(sizes)) != 1:
                raise ValueError(
                    f"dataset.scenario=domain needs the same number of classes in every task, got {sizes}; "
                    "use dataset.scenario=task or class"
                )
            targets = local.clone()
            self.task_classes = [list(range(sizes[0])) for _ in sizes]
        else:
            offsets = [sum(sizes[:t]) for t in range(len(sizes))]
            targets = torch.where(local >= 0, local + torch.tensor(offsets).unsqueeze(1), -1)
            self.task_classes = [list(range(o, o + k)) for o, k in zip(offsets, sizes, strict=True)]
        self.num_classes = max(c[-1] for c in self.task_classes) + 1
        identity = torch.arange(local.shape[1]).expand_as(targets)
        self.targets = None if torch.equal(targets, identity) else targets

    def prepare_data(self) -> None:
        """Runs on one process per node: locate, decompress or download the files once."""
        self._prepare_files()

    def _prepare_files(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self._train:
            self._build()
            self._resolve_labels()
            self._limit()
        if self.trainer is not None:
            self._place(self.trainer.strategy.root_device)
            if self.trainer.world_size > 1 and self._val:
                self._check_same_split_on_every_rank()

    def _check_same_split_on_every_rank(self) -> None:
        """The split is drawn from the seed alone, so every rank holds out the same samples; checked, not assumed
        (a rank that validated on another rank's training data would leak it into the results)."""
        assert self.trainer is not None
        mine = _val_fingerprint(self._val)
        theirs = self.trainer.strategy.broadcast(mine, src=0)
        if mine != theirs:
            raise ValueError(
                f"rank {self.trainer.global_rank} holds out another validation split than rank 0 ({mine} vs "
                f"{theirs}): give every process the same dataset options and seed"
            )

    def _limit(self) -> None:
        """Apply ``max_train_samples`` / ``max_test_samples`` (seeded; the same rows for every task), then hold
        out ``val_fraction`` of each task's training samples (seeded by the seed and the task: the same split on
        every rank and in every process that rebuilds the stream, such as a resumed run)."""
        for tasks, limit, purpose in (
            (self._train, self.max_train_samples, "train_subset"),
            (self._test, self.max_test_samples, "test_subset"),
        ):
            if limit is not None:
                for i, d in enumerate(tasks):
                    tasks[i] = d.subset(int(limit), generator(self.seed, purpose))
        self._val = []
        if self.val_fraction > 0:
            for t, d in enumerate(self._train):
                self._train[t], held_out = d.split(self.val_fraction, generator(self.seed, "val_split", task=t))
                if len(held_out) == 0 or len(self._train[t]) == 0:
                    raise ValueError(
                        f"dataset.val_fraction={self.val_fraction} leaves task {t + 1} with {len(self._train[t])} "
                        f"training and {len(held_out)} validation samples; raise max_train_samples or change "
                        "val_fraction"
                    )
                self._val.append(held_out)
        if self.task_sizes is not None:
            self._train = [
                d.subset(n, generator(self.seed, "task_sizes", task=t))
                for t, (d, n) in enumerate(zip(self._train, self.task_sizes, strict=True))
            ]
        self._segments = self.boundary.segments(self._train, self.seed)

    @property
    def has_validation(self) -> bool:
        """Whether the stream holds out validation data (``val_fraction > 0``)."""
        return self.val_fraction > 0

    def to(self, device: torch.device | str) -> TaskStream:
        """Hold the stream's data on ``device`` (the trainer does this at setup)."""
        self._place(torch.device(device))
        return self

    def _place(self, device: torch.device) -> None:
        """Move every task's tensors to ``device`` once, keeping shared bases shared."""
        if device == self._device:
            return
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        for tasks in (self._train, self._val, self._test, self._segments):
            for i, d in enumerate(tasks):
                tasks[i] = TaskData(move(d.images), move(d.labels), move(d.rows), move(d.tasks), d.task)
        to = getattr(self.transform, "to", None)
        if to is not None:
            to(device)
        if self.targets is not None:
            self.targets = self.targets.to(device)
        self._device = device

    def train_data(self, task: int) -> TaskData:
        """What ``task`` trains on (methods estimate importances on it): its samples, or its blurry/fuzzy segment."""
        return self._segments[task]

    def test_data(self, task: int) -> TaskData:
        return self._test[task]

    def val_data(self, task: int) -> TaskData:
        """The validation samples of ``task``: held out of its training data (needs ``val_fraction > 0``)."""
        if not self._val:
            raise ValueError("this stream has no validation data: set dataset.val_fraction > 0")
        return self._val[task]

    def replay_batch(self, rows: torch.Tensor, tasks: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        """A training batch of stored samples: ``rows`` of the training images, with their tasks.

        What replay methods use: a buffer holds these indices, not copies of images, and every batch is
        made as the stream's own are (with the training augmentation when a ``generator`` is given).
        """
        data = self._train[0]  # every task's rows index the same training images
        x = self.transform(data.images.index_select(0, rows), tasks, None)  # type: ignore[misc]
        if self.augment is not None and generator is not None:
            x = self.augment(x, generator)
        y = data.labels.index_select(0, rows)
        if self.targets is not None:
            y = self.targets[tasks, y]
        return Batch(x, y, tasks, rows)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def loader(
        self, data: TaskData, *, train: bool, epoch: int = 0, rows: bool = False, shuffle: bool | None = None
    ) -> TensorBatchLoader:
        """A loader over ``data``: shuffled (unless ``shuffle=False``) and padded across ranks for training, in
        order otherwise. With ``rows``, batches carry each sample's row in the base tensors (`Batch.rows`)."""
        assert self.transform is not None, "call setup() first"
        rank, world = self._rank()
        return TensorBatchLoader(
            data,
            self.batch_size if train else self.eval_batch_size,
            self.transform,
            shuffle=train if shuffle is None else shuffle,
            seed=self.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            pad=train,
            targets=self.targets,
            augment=self.augment if train else None,
            with_rows=rows,
        )

    def train_dataloader(self) -> TensorBatchLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        task = self.task_of_epoch(epoch)
        needs = self.needs
        cumulative = self.cumulative or needs.cumulative
        data = TaskData.concat(self._segments[: task + 1]) if cumulative else self._segments[task]
        if needs.training_data is not None:
            data = needs.training_data(self, data, task, self.epoch_in_task(epoch)[0])
        ordered = self.boundary.kind == "fuzzy" and not cumulative  # a ramp is an order: not reshuffled
        return self.loader(data, train=True, epoch=epoch, rows=needs.rows, shuffle=not ordered)

    def eval_loaders(self) -> list[TensorBatchLoader]:
        """What each task end evaluates: every task's validation set (if any), then every task's test set.

        One pass at each task end fills a row of both accuracy matrices (see
        [`lifelong.models.ContinualClassifier`][lifelong.models.module.ContinualClassifier]). Not Lightning's
        ``val_dataloader``: the evaluation runs where the stream's clock ends a task, which may be inside an epoch, not
        on Lightning's schedule.
        """
        return [self.loader(d, train=False) for d in (*self._val, *self._test)]

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The stream's batches are made on the training device already: skip Lightning's generic move."""
        if isinstance(batch, Batch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- reproducibility ---------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What defines this stream, for ``metrics.json``: enough to rebuild and to check it."""
        return {
            "class": type(self).__name__,
            "num_tasks": self.num_tasks,
            "scenario": self.scenario,
            "task_classes": self.task_classes,
            "seed": self.seed,
            "max_train_samples": self.max_train_samples,
            "max_test_samples": self.max_test_samples,
            "standardize": self.standardize,
            "train_sizes": [len(d) for d in self._train],
            "test_sizes": [len(d) for d in self._test],
            **({"val_fraction": self.val_fraction, **_val_fingerprint(self._val)} if self.val_fraction > 0 else {}),
            **({"online": True} if self.online else {}),
            **({"task_sizes": self.task_sizes} if self.task_sizes is not None else {}),
            **self.boundary.describe(),
            **(
                {"segment_sizes": [len(d) for d in self._segments], "segment_sha1": fingerprint(self._segments)}
                if self.boundary.mixes
                else {}
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"describe": self.describe()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint on a different stream (other seed, tasks or permutations)."""
        self.check_state(state_dict)

    def check_state(self, state_dict: dict[str, Any]) -> None:
        """Raise `ResumeError` unless ``state_dict`` (a checkpoint's) was written for this stream."""
        saved = state_dict.get("describe")
        # a field the checkpoint lacks was added to describe() later, with the earlier behaviour as default
        current = {k: v for k, v in self.describe().items() if saved is None or k in saved}
        if saved is not None and self._train and saved != current:
            raise ResumeError(
                "the checkpoint was written for a different task stream:\n"
                f"  checkpoint: {saved}\n  this run:   {self.describe()}\n"
                "Resume with the same dataset options and seed as the original run."
            )


def _val_fingerprint(val: list[TaskData]) -> dict[str, Any]:
    """The validation split's sizes and a short fingerprint of its rows: a resumed run must hold out the same."""
    digest = hashlib.sha1()
    for d in val:
        digest.update(d.rows.cpu().numpy().tobytes())
    return {"val_sizes": [len(d) for d in val], "val_sha1": digest.hexdigest()[:12]}


def stream_of(trainer: L.Trainer) -> TaskStream:
    """The trainer's datamodule, checked to be a `TaskStream` (methods and the module need one)."""
    dm = getattr(trainer, "datamodule", None)
    if not isinstance(dm, TaskStream):
        raise TypeError(
            f"lifelong needs a lifelong.data.TaskStream datamodule, got {type(dm).__name__}: "
            "pass datamodule=<a TaskStream> to trainer.fit"
        )
    return dm
