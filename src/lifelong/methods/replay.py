"""Experience replay (e.g. Chaudhry et al., 2019): a small memory of past samples, mixed into every step."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lifelong.data.streams import stream_of
from lifelong.data.tensors import Batch
from lifelong.methods.base import ContinualMethod

POLICIES = ("reservoir", "class_balanced")


class ReplayBuffer:
    """A fixed-size memory of samples, held as identities: rows of the stream's training images and tasks.

    Policies:

    * ``reservoir`` (Vitter's algorithm R): after ``n`` samples have been offered, every one of them is in
      the buffer with probability ``size / n``, whatever the task it came from;
    * ``class_balanced``: the buffer is split equally between the classes seen so far (a class is a task's
      label: permuted tasks' "3"s are separate classes), each holding a uniform random subset of its samples.

    Args:
        size: the number of samples held.
        policy: ``"reservoir"`` or ``"class_balanced"``.
    """

    def __init__(self, size: int, policy: str = "reservoir") -> None:
        if size < 1:
            raise ValueError(f"the replay buffer size must be at least 1, got {size}")
        if policy not in POLICIES:
            raise ValueError(f"the replay policy must be one of {list(POLICIES)}, got {policy!r}")
        self.size = int(size)
        self.policy = policy
        self.rows = torch.zeros(0, dtype=torch.long)
        self.tasks = torch.zeros(0, dtype=torch.long)
        self.classes = torch.zeros(0, dtype=torch.long)
        self.seen = 0  # samples offered so far

    def __len__(self) -> int:
        return int(self.rows.numel())

    def add(self, rows: Tensor, tasks: Tensor, classes: Tensor, generator: torch.Generator) -> None:
        """Offer samples, in the given order (``rows``, ``tasks`` and class keys ``classes``, each ``(n,)``)."""
        rows, tasks, classes = rows.cpu(), tasks.cpu(), classes.cpu()
        if self.policy == "reservoir":
            self._reservoir(rows, tasks, classes, generator)
        else:
            self._balanced(rows, tasks, classes, generator)
        self.seen += int(rows.numel())

    def _reservoir(self, rows: Tensor, tasks: Tensor, classes: Tensor, generator: torch.Generator) -> None:
        n = rows.numel()
        index = self.seen + torch.arange(n)  # each sample's position in the stream of offered samples
        drawn = (torch.rand(n, generator=generator, dtype=torch.float64) * (index + 1)).long()  # in [0, index]
        slot = torch.where(index < self.size, index, drawn)
        keep = slot < self.size
        slot, k = slot[keep], torch.arange(n)[keep]
        # samples are offered one after another: where several land in one slot, the last one stays
        last = torch.full((self.size,), -1, dtype=torch.long).scatter_reduce(0, slot, k, reduce="amax")
        filled = min(self.size, self.seen + n)
        grow = torch.zeros(filled - len(self), dtype=torch.long)
        source = last[:filled]
        written = source >= 0
        for name, new in (("rows", rows), ("tasks", tasks), ("classes", classes)):
            buf = torch.cat([getattr(self, name), grow])
            buf[written] = new[source[written]]
            setattr(self, name, buf)

    def _balanced(self, rows: Tensor, tasks: Tensor, classes: Tensor, generator: torch.Generator) -> None:
        order = torch.randperm(rows.numel(), generator=generator)
        rows, tasks, classes = rows[order], tasks[order], classes[order]
        keys = torch.cat([self.classes, classes]).unique().tolist()
        quota = {key: self.size // len(keys) + (i < self.size % len(keys)) for i, key in enumerate(keys)}
        parts = []
        for key in keys:
            for source in ((self.rows, self.tasks, self.classes), (rows, tasks, classes)):
                pick = (source[2] == key).nonzero().squeeze(1)[: quota[key]]
                quota[key] -= pick.numel()
                parts.append(tuple(t[pick] for t in source))
        self.rows, self.tasks, self.classes = (torch.cat([p[i] for p in parts]) for i in range(3))

    def to(self, device: torch.device) -> ReplayBuffer:
        self.rows, self.tasks, self.classes = (t.to(device) for t in (self.rows, self.tasks, self.classes))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows.cpu(),
            "tasks": self.tasks.cpu(),
            "classes": self.classes.cpu(),
            "seen": self.seen,
            "size": self.size,
            "policy": self.policy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.tasks, self.classes = state["rows"], state["tasks"], state["classes"]
        self.seen = int(state["seen"])


class ExperienceReplay(ContinualMethod):
    """Experience replay: every training step adds the loss on a batch drawn from a memory of past tasks.

    At the end of each task (but the last) the task's training samples are offered to a
    :class:`ReplayBuffer` in a seeded random order; while later tasks train, every step draws
    ``replay_batch_size`` stored samples (uniformly, with replacement) and adds ``replay_weight`` times their
    cross-entropy, through the scenario's heads (each sample's own head in the task scenario, the classes
    seen so far in the class scenario). The memory holds indices into the stream's tensor-resident data, so
    it costs 16 bytes a sample, and replayed batches are built exactly as the stream's own.

    With ``method=er`` it is the plain replay baseline; with ``replay=reservoir`` (or ``class_balanced``) it
    runs beside any other method, e.g. ``method=ewc replay=reservoir``: the known answer to the class scenario.

    Under DDP the buffer is the same on every rank (it is filled from the whole task, with the same seed);
    each rank draws its own replay batch, as each trains on its own shard.

    Args:
        buffer_size: samples held in memory.
        policy: ``"reservoir"`` or ``"class_balanced"``.
        replay_batch_size: samples replayed per step; ``None`` for the stream's batch size.
        replay_weight: the weight of the replayed loss (1: as if the two batches were one, each half weighted
            as a batch of its own).
    """

    name = "er"

    def __init__(
        self,
        buffer_size: int = 1000,
        policy: str = "reservoir",
        replay_batch_size: int | None = None,
        replay_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be a positive number or null, got {replay_batch_size}")
        if not replay_weight >= 0:
            raise ValueError(f"replay_weight must be >= 0, got {replay_weight}")
        self.buffer = ReplayBuffer(buffer_size, policy)
        self.replay_batch_size = replay_batch_size
        self.replay_weight = float(replay_weight)
        self._generator: torch.Generator | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.buffer.to(pl_module.device)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = stream_of(trainer)
        self._generator = torch.Generator(device=pl_module.device)
        self._generator.manual_seed(
            ((dm.seed * 1_000_003 + trainer.current_epoch) * 1009 + trainer.global_rank) * 7 + 3
        )

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = stream_of(trainer)
        epoch = trainer.current_epoch
        task = dm.task_of_epoch(epoch)
        if not dm.is_task_end(epoch) or task == dm.num_tasks - 1:
            return
        data = dm.train_data(task)
        classes = data.tasks * (int(data.labels.max()) + 1) + data.labels[data.rows]  # (task, label) pairs
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(dm.seed * 65_537 + task))
        rows, tasks, classes = (t.cpu()[order] for t in (data.rows, data.tasks, classes))
        self.buffer.add(rows, tasks, classes, torch.Generator().manual_seed(dm.seed * 31_337 + task))
        self.buffer.to(pl_module.device)

    @override
    def penalty(self, pl_module: L.LightningModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        if len(self.buffer) == 0 or self.replay_weight == 0:
            return None
        assert self._generator is not None
        dm = stream_of(pl_module.trainer)
        n = self.replay_batch_size or batch[0].shape[0]
        pick = torch.randint(len(self.buffer), (n,), device=self.buffer.rows.device, generator=self._generator)
        x, y, task = dm.replay_batch(self.buffer.rows[pick], self.buffer.tasks[pick], self._generator)
        return self.replay_weight * F.cross_entropy(pl_module(x, task), y)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])
