"""GDumb (Prabhu, Torr & Dokania, ECCV 2020): a greedy class-balanced memory, and a network trained on it alone."""

from __future__ import annotations

import copy
import random
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lifelong.data.streams import stream_of
from lifelong.methods.base import ContinualMethod, ContinualModule, gathered, module_of
from lifelong.seeding import generator, seed_for


class GDumb(ContinualMethod):
    """GDumb: the stream trains nothing; a memory samples it, and the network is trained from scratch on the memory
    alone whenever it is evaluated (at each task end).

    **Memory** (the paper's Algorithm 1, the greedy sampler): a sample is stored while the memory has room; once it
    is full, a sample of class ``y`` is stored only if ``y`` holds fewer than ``k / |classes seen|`` samples, in place
    of a random sample of the class holding most. (The official code shortcuts this to the first ``k / |classes|``
    samples of each class, knowing the classes in advance.) It never uses a task boundary. The memory holds each
    sample's row in the stream's images (an index), and is updated on the host lazily, at the next evaluation, from
    the batches kept on the device meanwhile: the same memory as sample by sample, without a host sync per step.

    **Training** (the official code's, ``drimpossible/GDumb`` ``src/main.py``): the network re-initialised (the same
    seeded initialisation every time), ``epochs`` passes over the memory in batches of ``batch_size``, SGD with
    momentum 0.9 and weight decay ``weight_decay``, gradient norm clipped at ``clip``; one warm-up pass at
    ``lr / 10``, one at ``lr``, then cosine annealing with warm restarts (``T_0=1``, ``T_mult=2``) down to
    ``min_lr``. Its cross-entropy goes through the scenario's heads. The official code reports the best test accuracy
    over the passes (it selects on test); here the network after the last pass is evaluated.

    Under DDP every rank offers every rank's samples, gathered in rank order, so the memory is the same on all of
    them; each rank trains the same network on it, and rank 0's weights are broadcast after training.

    Args:
        buffer_size: samples in memory (``k``).
        epochs: passes over the memory at each training (the paper: 128 for MNIST, 256 for CIFAR).
        batch_size: the memory's batch size (16).
        lr: the learning rate after the warm-up pass (0.05).
        min_lr: the cosine schedule's floor (0.0005).
        weight_decay: SGD's weight decay (1e-6).
        clip: the gradient norm's clipping threshold (10).
    """

    name = "gdumb"
    needs_rows = True  # a stored sample is its row in the stream's images
    trains_on_stream = False

    def __init__(
        self,
        buffer_size: int = 500,
        epochs: int = 128,
        batch_size: int = 16,
        lr: float = 0.05,
        min_lr: float = 0.0005,
        weight_decay: float = 1e-6,
        clip: float = 10.0,
    ) -> None:
        for key, value in (("buffer_size", buffer_size), ("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or int(value) < 1:
                raise ValueError(f"method.{key} must be at least 1, got {value!r}")
        if not 0 < min_lr <= lr:
            raise ValueError(f"method.lr and method.min_lr must satisfy 0 < min_lr <= lr, got {min_lr} and {lr}")
        if not weight_decay >= 0 or not clip > 0:
            raise ValueError(f"method.weight_decay must be >= 0 and method.clip > 0, got {weight_decay} and {clip}")
        self.buffer_size, self.epochs, self.batch_size = int(buffer_size), int(epochs), int(batch_size)
        self.lr, self.min_lr, self.weight_decay, self.clip = float(lr), float(min_lr), float(weight_decay), float(clip)
        self.rows: list[int] = []  # the memory: each sample's row, task and class
        self.tasks: list[int] = []
        self.classes: list[int] = []
        self.seen: set[int] = set()  # the classes the stream has shown
        self.trainings = 0  # times the network was trained on the memory
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # batches offered, still on the device
        self._rng: random.Random | None = None  # which sample a full memory drops
        self._counts: dict[int, int] = {}  # samples held per class

    # ---- the memory ---------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch.rows is None:
            raise RuntimeError("method=gdumb needs training batches with their rows (needs_rows)")
        rows, tasks, classes = gathered(trainer, pl_module, batch.rows, batch.task, batch.y)  # every rank's samples
        self._pending.append((rows, tasks, classes))

    def _offer_pending(self) -> None:
        """Offer the batches kept since the last call to the memory, sample by sample, in the stream's order."""
        for rows, tasks, classes in self._pending:
            for r, t, c in zip(rows.tolist(), tasks.tolist(), classes.tolist(), strict=True):
                self._offer(r, t, c)
        self._pending.clear()

    def _offer(self, row: int, task: int, cls: int) -> None:
        self.seen.add(cls)
        counts = self._counts
        if len(self.rows) >= self.buffer_size:
            if counts.get(cls, 0) >= self.buffer_size / len(self.seen):
                return
            largest = max(counts, key=lambda c: (counts[c], -c))  # the class holding most (the lowest label of equals)
            assert self._rng is not None
            drop = self._rng.choice([i for i, c in enumerate(self.classes) if c == largest])
            for field in (self.rows, self.tasks, self.classes):
                field.pop(drop)
            counts[largest] -= 1
        self.rows.append(row)
        self.tasks.append(task)
        self.classes.append(cls)
        counts[cls] = counts.get(cls, 0) + 1

    # ---- the network ----------------------------------------------------------------------------------
    @override
    def before_evaluation(self, trainer: L.Trainer, module: ContinualModule) -> None:
        """Train the network from scratch on the memory (a fresh copy, trained on this process alone, then loaded
        into the module's network)."""
        dm = module.stream
        self._offer_pending()
        if not self.rows:
            return
        device = module.device
        net = copy.deepcopy(module.net)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # a seeded, fresh network
            torch.manual_seed(seed_for(dm.seed, "gdumb_init"))
            for m in net.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset) and m is not net:
                    reset()
        net.train()
        takes_task = getattr(net, "takes_task", False)
        rows = torch.tensor(self.rows, device=device)
        tasks = torch.tensor(self.tasks, device=device)
        optimizer = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=1, T_mult=2, eta_min=self.min_lr)
        g = generator(dm.seed, "gdumb_order", epoch=self.trainings, device=device)
        with torch.enable_grad():
            for epoch in range(self.epochs):
                if epoch <= 1:  # one warm-up pass at a tenth of the rate, then the rate
                    for group in optimizer.param_groups:
                        group["lr"] = self.lr * (0.1 if epoch == 0 else 1.0)
                else:
                    schedule.step()
                order = torch.randperm(len(rows), generator=g, device=device)
                for pick in order.split(self.batch_size):
                    batch = dm.replay_batch(rows[pick], tasks[pick], g)
                    outputs = net(batch.x, batch.task) if takes_task else net(batch.x)
                    loss = F.cross_entropy(module.heads(outputs, batch.task), batch.y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(net.parameters(), self.clip)
                    optimizer.step()
        state = {k: v.detach() for k, v in net.state_dict().items()}
        if trainer.world_size > 1:  # the same memory and seeds give the same network; rank 0's, to the bit
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in state.items()}, src=0)
        module.net.load_state_dict(state)
        self.trainings += 1

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module_of(pl_module)
        if self._rng is None:  # not restored from a checkpoint
            self._rng = random.Random(seed_for(stream_of(trainer).seed, "memory_fill"))

    @override
    def state_dict(self) -> dict[str, Any]:
        self._offer_pending()
        return {
            "rows": torch.tensor(self.rows, dtype=torch.long),
            "tasks": torch.tensor(self.tasks, dtype=torch.long),
            "classes": torch.tensor(self.classes, dtype=torch.long),
            "seen": sorted(self.seen),
            "trainings": self.trainings,
            "rng": None if self._rng is None else self._rng.getstate(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows, self.tasks = state_dict["rows"].tolist(), state_dict["tasks"].tolist()
        self.classes, self.seen = state_dict["classes"].tolist(), set(state_dict["seen"])
        self._counts = {}
        for c in self.classes:
            self._counts[c] = self._counts.get(c, 0) + 1
        self.trainings = int(state_dict["trainings"])
        self._pending.clear()
        self._rng = None
        if state_dict["rng"] is not None:
            self._rng = random.Random()
            self._rng.setstate(state_dict["rng"])
