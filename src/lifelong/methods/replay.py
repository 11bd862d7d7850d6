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
from lifelong.methods.base import ContinualMethod, ContinualModule
from lifelong.seeding import generator

POLICIES = ("reservoir", "class_balanced")


class ReplayBuffer:
    """A fixed-size memory of samples, held as identities: rows of the stream's training images and tasks.

    Each stored sample is its ``rows`` (a row of the stream's base images), ``tasks`` and class key
    ``classes`` (a task's label: permuted tasks' "3"s are separate classes), plus any per-sample values a
    method stores with it (e.g. DER's logits), all as tensors on the buffer's device. A memory of thousands of
    samples is a few hundred kilobytes, so checkpoints carry it at no noticeable cost.

    Policies (how `add` keeps samples):

    * ``reservoir`` (Vitter's algorithm R): after ``n`` samples have been offered, every one of them is in
      the buffer with probability ``size / n``, whatever the task it came from. Vectorised, and without a
      host synchronisation, so it can take every training batch on a GPU;
    * ``class_balanced``: the buffer is split equally between the classes seen so far, each holding a
      uniform random subset of its samples.

    `append` instead adds samples as they are while there is room (a per-task quota, as GEM and A-GEM
    fill their memory).

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
        self.device = torch.device("cpu")
        empty = torch.zeros(0, dtype=torch.long)
        self.fields: dict[str, Tensor] = {"rows": empty, "tasks": empty, "classes": empty}
        self.seen = 0  # samples offered so far

    @property
    def rows(self) -> Tensor:
        return self.fields["rows"]

    @property
    def tasks(self) -> Tensor:
        return self.fields["tasks"]

    @property
    def classes(self) -> Tensor:
        return self.fields["classes"]

    def __len__(self) -> int:
        return int(self.fields["rows"].shape[0])

    def _incoming(self, rows: Tensor, tasks: Tensor, classes: Tensor, values: dict[str, Tensor]) -> dict[str, Tensor]:
        new = {"rows": rows, "tasks": tasks, "classes": classes, **values}
        if set(new) != set(self.fields) and len(self) > 0:
            raise ValueError(f"the buffer stores {sorted(self.fields)}, got {sorted(new)}")
        return {k: v.to(self.device) for k, v in new.items()}

    def add(self, rows: Tensor, tasks: Tensor, classes: Tensor, generator: torch.Generator, **values: Tensor) -> None:
        """Offer samples, in the given order: ``rows``, ``tasks`` and class keys ``classes`` (each ``(n,)``),
        and per-sample ``values`` stored with them (each ``(n, ...)``). ``generator`` draws the choices."""
        new = self._incoming(rows, tasks, classes, values)
        if self.policy == "reservoir":
            self._reservoir(new, generator)
        else:
            self._balanced(new, generator)
        self.seen += int(rows.shape[0])

    def append(self, rows: Tensor, tasks: Tensor, classes: Tensor, **values: Tensor) -> None:
        """Keep the given samples as they are, as many as there is room for (no sample is replaced)."""
        new = self._incoming(rows, tasks, classes, values)
        room = self.size - len(self)
        for name, value in new.items():
            old = self.fields.get(name, value[:0])
            self.fields[name] = torch.cat([old, value[:room]])
        self.seen += int(rows.shape[0])

    def _reservoir(self, new: dict[str, Tensor], generator: torch.Generator) -> None:
        n = new["rows"].shape[0]
        if n == 0:
            return
        device = self.device
        index = self.seen + torch.arange(n, device=device)  # each sample's position in the stream of offered ones
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).to(device)
        drawn = (u * (index + 1)).long()  # in [0, index]
        slot = torch.where(index < self.size, index, drawn).clamp(max=self.size)  # slot `size`: not kept
        # samples are offered one after another: where several land in one slot, the last one stays
        last = torch.full((self.size + 1,), -1, dtype=torch.long, device=device)
        last = last.scatter_reduce(0, slot, torch.arange(n, device=device), reduce="amax")
        filled = min(self.size, self.seen + n)
        source = last[:filled]
        written = source >= 0
        for name, value in new.items():
            old = self.fields.get(name, value[:0])
            grown = torch.cat([old, value.new_zeros((filled - old.shape[0], *value.shape[1:]))])
            keep = written.view(-1, *([1] * (value.dim() - 1)))
            self.fields[name] = torch.where(keep, value[source.clamp(min=0)], grown)

    def _balanced(self, new: dict[str, Tensor], generator: torch.Generator) -> None:
        # at a task's end only: on the CPU, where the per-class bookkeeping is cheap
        device = self.device
        order = torch.randperm(new["rows"].shape[0], generator=generator)
        new = {k: v.cpu()[order] for k, v in new.items()}
        old = {k: v.cpu() for k, v in self.fields.items()} if len(self) else {}
        keys = torch.cat([old.get("classes", new["classes"][:0]), new["classes"]]).unique().tolist()
        quota = {key: self.size // len(keys) + (i < self.size % len(keys)) for i, key in enumerate(keys)}
        parts: dict[str, list[Tensor]] = {name: [] for name in new}
        for key in keys:
            for source in (old, new):
                if not source:
                    continue
                pick = (source["classes"] == key).nonzero().squeeze(1)[: quota[key]]
                quota[key] -= pick.numel()
                for name in parts:
                    parts[name].append(source[name][pick])
        self.fields = {name: torch.cat(p).to(device) for name, p in parts.items()}

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Indices of ``min(n, len(self))`` distinct stored samples, drawn uniformly (on the buffer's device)."""
        return torch.randperm(len(self), generator=generator, device=generator.device)[:n].to(self.device)

    def to(self, device: torch.device | str) -> ReplayBuffer:
        self.device = torch.device(device)
        self.fields = {k: v.to(self.device) for k, v in self.fields.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            **{k: v.cpu() for k, v in self.fields.items()},
            "seen": self.seen,
            "size": self.size,
            "policy": self.policy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fields = {k: v.to(self.device) for k, v in state.items() if isinstance(v, Tensor)}
        self.seen = int(state["seen"])


class MemoryMethod(ContinualMethod):
    """A method with a `ReplayBuffer` (``self.buffer``): kept on the training device, carried by checkpoints,
    and sampled with local generators seeded by the stream's seed, the epoch and (for draws each rank makes on
    its own) the rank - so a resumed run draws what the uninterrupted one did."""

    buffer: ReplayBuffer

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.buffer.to(pl_module.device)

    @staticmethod
    def epoch_generator(
        trainer: L.Trainer, device: torch.device, purpose: str, per_rank: bool = True
    ) -> torch.Generator:
        """A generator on ``device`` for this epoch's ``purpose`` (:mod:`lifelong.seeding`); ``per_rank=False``: the
        same on every rank."""
        seed, epoch = stream_of(trainer).seed, trainer.current_epoch
        rank = trainer.global_rank if per_rank else 0
        return generator(seed, purpose, epoch=epoch, rank=rank, device=device)

    @staticmethod
    def task_order(seed: int, task: int, n: int) -> Tensor:
        """A permutation of a task's ``n`` training samples, seeded by the stream and the task: the same on every
        rank and after resume."""
        return torch.randperm(n, generator=generator(seed, "memory_order", task=task))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])


class ExperienceReplay(MemoryMethod):
    """Experience replay: every training step adds the loss on a batch drawn from a memory of past tasks.

    At the end of each task (but the last) the task's training samples are offered to a
    `ReplayBuffer` in a seeded random order; while later tasks train, every step draws
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
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._generator = self.epoch_generator(trainer, pl_module.device, "replay")

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """The finished task's samples are offered to the memory (not the last task's: nothing replays them)."""
        if last:
            return
        dm = module.stream
        data = dm.train_data(task)
        classes = data.tasks * (int(data.labels.max()) + 1) + data.labels[data.rows]  # (task, label) pairs
        order = self.task_order(dm.seed, task, len(data))
        rows, tasks, classes = (t.cpu()[order] for t in (data.rows, data.tasks, classes))
        self.buffer.add(rows, tasks, classes, generator(dm.seed, "memory_fill", task=task))
        self.buffer.to(module.device)

    @override
    def penalty(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        if len(self.buffer) == 0 or self.replay_weight == 0:
            return None
        assert self._generator is not None
        n = self.replay_batch_size or batch.x.shape[0]
        pick = torch.randint(len(self.buffer), (n,), device=self.buffer.rows.device, generator=self._generator)
        replayed = module.stream.replay_batch(self.buffer.rows[pick], self.buffer.tasks[pick], self._generator)
        return self.replay_weight * F.cross_entropy(module(replayed.x, replayed.task), replayed.y)
