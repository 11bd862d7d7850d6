"""When a quadratic method consolidates without task boundaries: on a loss plateau, or every K steps.

Aljundi, Kelchtermans & Tuytelaars (CVPR 2019, "Task-free continual learning"; ``kkelchte/task_free_continual_learning``
``method.py``) consolidate when the loss has come down and settled after having risen: a window of recent losses
whose mean is below a threshold and whose variance is below another, after a *peak* (a window mean above the last
plateau's mean plus its standard deviation) since the last consolidation. Here an observation is the mean training
loss over ``plateau_steps`` steps (one host read per ``plateau_steps`` steps, averaged over the DDP ranks so that
every rank decides alike), and the window holds the last ``plateau_window`` observations; their code's values
(window 5, mean < 0.2, variance < 0.1) are the defaults. The importance is then estimated on the most recent
``recent_samples`` training samples (theirs: a hard buffer of 30), gathered from every rank.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lifelong.data.streams import TaskStream
from lifelong.data.tensors import TaskData
from lifelong.methods.base import gathered

TRIGGERS = ("task_end", "every", "plateau")


class ConsolidationTrigger:
    """Decides, step by step, whether a task-free method consolidates now (see the module docstring).

    Args:
        kind: ``"task_end"`` (at each task end: the method needs boundaries), ``"every"`` or ``"plateau"``.
        every: ``every``: consolidate after every this many training steps.
        plateau_steps: ``plateau``: the observation's length in steps.
        plateau_window: ``plateau``: the window's length in observations.
        plateau_mean: ``plateau``: the threshold of the window's mean.
        plateau_var: ``plateau``: the threshold of the window's (population) variance.
        recent_samples: the most recent training samples the importance is estimated on.
    """

    def __init__(
        self,
        kind: str = "task_end",
        every: int = 1000,
        plateau_steps: int = 10,
        plateau_window: int = 5,
        plateau_mean: float = 0.2,
        plateau_var: float = 0.1,
        recent_samples: int = 1000,
    ) -> None:
        if kind not in TRIGGERS:
            raise ValueError(f"method.consolidate must be one of {list(TRIGGERS)}, got {kind!r}")
        for key, value in (
            ("consolidate_every", every),
            ("plateau_steps", plateau_steps),
            ("plateau_window", plateau_window),
            ("recent_samples", recent_samples),
        ):
            if isinstance(value, bool) or int(value) < 1:
                raise ValueError(f"method.{key} must be at least 1, got {value!r}")
        if not plateau_mean > 0 or not plateau_var > 0:
            raise ValueError(f"method.plateau_mean and plateau_var must be > 0, got {plateau_mean}, {plateau_var}")
        self.kind, self.every = kind, int(every)
        self.plateau_steps, self.plateau_window = int(plateau_steps), int(plateau_window)
        self.plateau_mean, self.plateau_var = float(plateau_mean), float(plateau_var)
        self.recent_samples = int(recent_samples)
        self.fired: list[dict[str, Any]] = []  # each consolidation: its step and why
        self._window: list[float] = []
        self._last = (0.0, 0.0)  # the last plateau's window mean and variance
        self._peak = True  # a peak since the last plateau (the first plateau needs none)
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0
        self._rows: Tensor | None = None  # the ring of recent samples: rows and tasks
        self._tasks: Tensor | None = None
        self._filled = 0
        self._next = 0

    @property
    def task_free(self) -> bool:
        return self.kind != "task_end"

    def observe(self, trainer: L.Trainer, rows: Tensor, tasks: Tensor, loss: Tensor) -> str | None:
        """Record one training step (its samples and loss); the reason to consolidate now, or ``None``."""
        self._remember(rows, tasks)
        step = trainer.global_step
        if self.kind == "every":
            return f"every {self.every} steps" if step % self.every == 0 else None
        self._loss_sum = loss.detach().float() + (0 if self._loss_sum is None else self._loss_sum)
        self._loss_steps += 1
        if self._loss_steps < self.plateau_steps:
            return None
        mean = self._loss_sum / self._loss_steps
        if trainer.world_size > 1:
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        self._loss_sum, self._loss_steps = None, 0
        self._window = [*self._window, float(mean)][-self.plateau_window :]  # one host read per plateau_steps
        if len(self._window) < self.plateau_window:
            return None
        m, var = statistics.fmean(self._window), statistics.pvariance(self._window)
        if not self._peak and m > self._last[0] + math.sqrt(self._last[1]):
            self._peak = True
        if self._peak and m < self.plateau_mean and var < self.plateau_var:
            self._last, self._peak = (m, var), False
            return f"plateau (window mean {m:.4f}, variance {var:.2e})"
        return None

    def _remember(self, rows: Tensor, tasks: Tensor) -> None:
        n = self.recent_samples
        if self._rows is None or self._rows.device != rows.device:
            self._rows = torch.zeros(n, dtype=torch.long, device=rows.device)
            self._tasks = torch.zeros(n, dtype=torch.long, device=rows.device)
        assert self._tasks is not None
        k = min(len(rows), n)
        at = (torch.arange(k, device=rows.device) + self._next) % n  # positions computed from host counters
        self._rows[at], self._tasks[at] = rows[-k:], tasks[-k:]
        self._next = (self._next + k) % n
        self._filled = min(n, self._filled + k)

    def recent(self, trainer: L.Trainer, pl_module: L.LightningModule, stream: TaskStream) -> TaskData:
        """The recent samples of every rank, oldest first: what the importance is estimated on."""
        assert self._rows is not None and self._tasks is not None
        order = (torch.arange(self._filled, device=self._rows.device) + self._next - self._filled) % self.recent_samples
        rows, tasks = gathered(trainer, pl_module, self._rows[order], self._tasks[order])
        base = stream.train_data(0)  # every task's rows index the same base images
        return TaskData(base.images, base.labels, rows, tasks, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fired": list(self.fired),
            "window": list(self._window),
            "last": self._last,
            "peak": self._peak,
            "loss_sum": None if self._loss_sum is None else self._loss_sum.cpu(),
            "loss_steps": self._loss_steps,
            "rows": None if self._rows is None else self._rows.cpu(),
            "tasks": None if self._tasks is None else self._tasks.cpu(),
            "filled": self._filled,
            "next": self._next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired, self._window = list(state["fired"]), list(state["window"])
        self._last, self._peak = tuple(state["last"]), bool(state["peak"])
        self._loss_sum, self._loss_steps = state["loss_sum"], int(state["loss_steps"])
        self._rows, self._tasks = state["rows"], state["tasks"]
        self._filled, self._next = int(state["filled"]), int(state["next"])

    def to(self, device: torch.device) -> None:
        for name in ("_rows", "_tasks", "_loss_sum"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
