"""Tensor-resident task data and the loader that batches it by indexing.

A task's images stay one uint8 tensor (on the training device when it fits); a batch is an index into it,
and per-task transforms (normalisation, a pixel permutation) apply to the whole batch at once. This is
what makes an epoch cost about as much as the arithmetic of the network: no PIL image, no per-sample
Python call, no per-batch host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch

from lifelong.seeding import generator as seeded


class Batch(NamedTuple):
    """One batch of a stream: inputs, labels, each sample's task and, where asked for, its row.

    Attributes:
        x: ``(B, ...)`` the network's inputs.
        y: ``(B,)`` labels, in the scenario's label space.
        task: ``(B,)`` each sample's task.
        rows: ``(B,)`` each sample's row in the stream's base images (its identity: what DER stores, what DWA
            looks its complexity up by), or ``None`` unless a method declared it needs them
            (`lifelong.methods.ContinualMethod.needs_rows`).
    """

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor
    rows: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        x, y, task, rows = (t if t is None or t.device == device else t.to(device) for t in self)
        assert x is not None and y is not None and task is not None
        return Batch(x, y, task, rows)


class BatchTransform(Protocol):
    """Turns a uint8 image batch into the network's input, given each sample's task."""

    def __call__(self, images: torch.Tensor, tasks: torch.Tensor, task: int | None) -> torch.Tensor:
        """``images`` (B, C, H, W) uint8, ``tasks`` (B,), ``task`` set when all samples share one task."""
        ...


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (x, generator) -> x, for training batches


@dataclass(frozen=True)
class TaskData:
    """Samples of one or more tasks, as rows of shared base tensors (no copy per task).

    Attributes:
        images: ``(N, C, H, W)`` uint8 base images, shared between tasks that use the same images.
        labels: ``(N,)`` int64 labels of the base images.
        rows: ``(M,)`` int64 indices into ``images``: the samples of this data.
        tasks: ``(M,)`` int64 task id of each sample.
        task: the single task id when all samples belong to one task, else ``None``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    tasks: torch.Tensor
    task: int | None

    @classmethod
    def whole(cls, images: torch.Tensor, labels: torch.Tensor, task: int) -> TaskData:
        n = labels.numel()
        return cls(images, labels, torch.arange(n), torch.full((n,), task, dtype=torch.long), task)

    def __len__(self) -> int:
        return self.rows.numel()

    def subset(self, num_samples: int, generator: torch.Generator) -> TaskData:
        """A random subset of ``num_samples`` samples (all of them if there are fewer)."""
        if num_samples >= len(self):
            return self
        pick = torch.randperm(len(self), generator=generator)[:num_samples].sort().values
        return replace(self, rows=self.rows[pick], tasks=self.tasks[pick])

    def split(self, fraction: float, generator: torch.Generator) -> tuple[TaskData, TaskData]:
        """Hold out ``fraction`` of every class, at random: ``(rest, held_out)``, disjoint, each in row order.

        Class-stratified: each class keeps its share in both parts. A class of ``n`` samples gives
        ``round(fraction * n)`` of them to the held-out part, at least one and at most ``n - 1`` (a class with
        one sample stays whole in the rest).
        """
        labels = self.labels.index_select(0, self.rows)
        perm = torch.randperm(len(self), generator=generator)
        grouped = perm[torch.sort(labels[perm], stable=True).indices]  # by class, random within each class
        cls = labels[grouped]
        counts = torch.bincount(cls)
        take = (counts.double() * fraction).round().long().clamp(min=1).minimum(counts - 1).clamp(min=0)
        rank = torch.arange(len(grouped)) - (counts.cumsum(0) - counts)[cls]  # position within the class
        held = rank < take[cls]
        part = [grouped[~held].sort().values, grouped[held].sort().values]
        rest, out = (replace(self, rows=self.rows[i], tasks=self.tasks[i]) for i in part)
        return rest, out

    @staticmethod
    def concat(parts: list[TaskData]) -> TaskData:
        """All samples of ``parts``; they must share their base tensors (as the tasks of one stream do)."""
        base = parts[0]
        if any(p.images is not base.images or p.labels is not base.labels for p in parts):
            raise ValueError("TaskData.concat needs parts that share their base images and labels")
        tasks = {p.task for p in parts}
        return replace(
            base,
            rows=torch.cat([p.rows for p in parts]),
            tasks=torch.cat([p.tasks for p in parts]),
            task=tasks.pop() if len(tasks) == 1 else None,
        )

    def to(self, device: torch.device | str) -> TaskData:
        return replace(
            self,
            images=self.images.to(device),
            labels=self.labels.to(device),
            rows=self.rows.to(device),
            tasks=self.tasks.to(device),
        )


class TensorBatchLoader:
    """Batches of a `TaskData`, made by indexing tensors on their device.

    An iterable with ``len``, which is all Lightning needs from a loader. It shards itself across DDP ranks
    (so the trainer is built with ``use_distributed_sampler=False``), the way ``DistributedSampler`` does:
    every rank draws the same seeded order and takes every ``world_size``-th sample. For training
    (``pad=True``) the order is padded to a multiple of ``world_size`` so all ranks take the same number of
    steps; for evaluation and the Fisher nothing is padded, so sums over ranks count each sample once.

    Args:
        data: the samples.
        batch_size: samples per batch.
        transform: uint8 batch -> network input.
        shuffle: reshuffle every epoch, with a generator seeded by ``(seed, epoch)``.
        seed: the shuffle's seed.
        epoch: the epoch of the first iteration; each further iteration counts one more epoch.
        drop_last: drop a last, incomplete batch.
        rank: this process's rank.
        world_size: the number of processes.
        pad: pad the order to a multiple of ``world_size`` (training).
        targets: ``(T, K)`` map from each task's base label to the label the network is trained on (the
            scenario's label space, see [`TaskStream`][lifelong.data.streams.TaskStream]); ``None`` keeps the
            base labels.
        augment: a random augmentation of the transformed batch (training), drawn from a generator on the
            data's device seeded by ``(seed, epoch, rank)``.
        with_rows: fill each batch's ``rows`` (each sample's row in the base tensors): the sample's identity,
            for methods that keep per-sample values (DWA's complexity scores).
    """

    def __init__(
        self,
        data: TaskData,
        batch_size: int,
        transform: BatchTransform,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
        targets: torch.Tensor | None = None,
        augment: Augment | None = None,
        with_rows: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.targets = targets
        self.augment = augment
        self.with_rows = with_rows

    def _num_samples(self) -> int:
        n, w = len(self.data), self.world_size
        if self.pad:
            return -(-n // w)
        return len(range(self.rank, n, w))

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            g = seeded(self.seed, "shuffle", epoch=self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.pad:
                total = self._num_samples() * self.world_size
                order = torch.cat([order, order[: total - n]])
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[Batch]:
        data = self.data
        device = data.rows.device
        order = self._order().to(device)  # one small copy per epoch, none per batch
        generator = None
        if self.augment is not None:
            generator = seeded(self.seed, "augment", epoch=self.epoch, rank=self.rank, device=device)
        self.epoch += 1
        rows, tasks = data.rows[order], data.tasks[order]
        targets = self.targets
        for idx, t in zip(rows.split(self.batch_size)[: len(self)], tasks.split(self.batch_size), strict=False):
            x = self.transform(data.images.index_select(0, idx), t, data.task)
            if generator is not None:
                x = self.augment(x, generator)  # type: ignore[misc]
            y = data.labels.index_select(0, idx)
            if targets is not None:
                y = targets[data.task].index_select(0, y) if data.task is not None else targets[t, y]
            yield Batch(x, y, t, idx if self.with_rows else None)
