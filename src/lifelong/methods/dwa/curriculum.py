"""DWA's curriculum: each training sample's complexity, and the samples an epoch of a task trains on."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lifelong.data.complexity import entropy_complexity
from lifelong.data.streams import TaskStream
from lifelong.data.tensors import TaskData


class Curriculum:
    r"""The complexity $\zeta$ of every training sample of a task, and the curriculum built on it.

    With ``enabled``, epoch $e$ of a task trains only on the task's samples with
    $\zeta \le \min(1, s + (1 - s)\,e / E_c)$ (``start`` is $s$, ``epochs`` $E_c$). The
    complexity is used with the curriculum off too: it weights DWA's embedding loss and picks its anchors.

    Args:
        enabled: train each epoch on the samples under the rising threshold.
        start: the threshold at a task's first epoch.
        epochs: the epochs over which it reaches 1.
    """

    def __init__(self, enabled: bool, start: float, epochs: int) -> None:
        self.enabled = bool(enabled)
        self.start = float(start)
        self.epochs = int(epochs)
        self.position: dict[str, Any] = {}  # where it stands: task, epoch, threshold, samples (in the checkpoints)
        self._table: dict[int, Tensor] = {}  # task -> (N_base,) complexity of the task's rows

    def threshold(self, epoch_in_task: int) -> float:
        """The complexity threshold at an epoch of a task (0-based)."""
        rise = (1 - self.start) * epoch_in_task / self.epochs
        return min(1.0, self.start + rise)

    def complexity(self, stream: TaskStream, task: int) -> Tensor:
        """The complexity of ``task``'s training samples, indexed by their rows: ``(N_base,)``.

        Computed once per task on what the network sees (a permuted task's permuted images), min-max
        normalised over the task's training set, and the same on every rank.
        """
        if task not in self._table:
            data = stream.train_data(task)
            images = data.images.index_select(0, data.rows)
            pixels = getattr(stream.transform, "pixels", None)
            if pixels is not None:
                images = pixels(images, data.tasks, data.task)
            table = torch.full((data.images.shape[0],), float("nan"), device=data.rows.device)
            table[data.rows] = entropy_complexity(images).to(table.device)
            self._table = {task: table}  # one task's at a time
        return self._table[task]

    def select(self, stream: TaskStream, data: TaskData, task: int, epoch_in_task: int) -> TaskData:
        """The epoch's training samples: those with complexity under the threshold (all of them when off)."""
        if not self.enabled:
            return data
        threshold = self.threshold(epoch_in_task)
        zeta = self.complexity(stream, task)[data.rows]
        keep = (zeta <= threshold).nonzero().squeeze(1)
        self.position = {
            "task": task,
            "epoch_in_task": epoch_in_task,
            "threshold": threshold,
            "samples": int(keep.numel()),
            "of": len(data),
        }
        return TaskData(data.images, data.labels, data.rows[keep], data.tasks[keep], data.task)
