"""The LightningModule that trains a plain classifier through a task stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lifelong.data.streams import stream_of
from lifelong.errors import NonFiniteLossError
from lifelong.methods.base import ContinualMethod, log_now

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


class ContinualClassifier(L.LightningModule):
    """Wraps an ``nn.Module`` classifier for a task stream (see :class:`lifelong.data.TaskStream`).

    * Training: cross-entropy plus the penalty of every :class:`~lifelong.methods.ContinualMethod` among the
      trainer's callbacks (logged as ``train/loss`` and ``train/<method>_penalty``).
    * Evaluation: at the end of each task, the accuracy on every task's test set (one validation loader per
      task) fills row ``task`` of :attr:`accuracy_matrix`, a buffer, so checkpoints carry it. Logged as
      ``val/acc/task_<j>`` (1-based) and ``val/avg_acc_seen``.

    Args:
        net: the classifier, ``net(x) -> (B, num_classes)`` logits.
        optimizer: ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``).
        num_tasks: the stream's number of tasks (the size of the accuracy matrix).
        num_classes: outputs of ``net``.
        reset_optimizer: clear the optimizer's state (e.g. Adam's moments) at the start of each task, as in
            Hsu et al. (2018), so a task does not start with momentum from the previous one.
    """

    takes_task = True  # forward(x, task); see lifelong.methods.fisher.call_model
    accuracy_matrix: Tensor

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        num_tasks: int,
        num_classes: int,
        reset_optimizer: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.net = net
        self.optimizer_factory = optimizer
        self.num_tasks = num_tasks
        self.reset_optimizer = reset_optimizer
        self.val_acc: list[MulticlassAccuracy] = nn.ModuleList(  # type: ignore[assignment]
            MulticlassAccuracy(num_classes, average="micro") for _ in range(num_tasks)
        )
        self.register_buffer("accuracy_matrix", torch.full((num_tasks, num_tasks), float("nan")))
        self._methods: list[ContinualMethod] = []

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` around every hook call, about 44 times per training step; going
        # through nn.Module.__setattr__ (which checks parameters, buffers and submodules) cost ~6% of a small
        # network's epoch on a CPU. It is a plain string, so the plain object setter is equivalent.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @override
    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        return self.net(x)  # (B, C); one head shared by all tasks

    @override
    def on_fit_start(self) -> None:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        self._methods = [cb for cb in callbacks if isinstance(cb, ContinualMethod)]

    @override
    def on_train_epoch_start(self) -> None:
        dm = stream_of(self.trainer)
        epoch = self.current_epoch
        if self.reset_optimizer and epoch > 0 and dm.is_task_end(epoch - 1):
            for opt in self.trainer.optimizers:
                opt.state.clear()  # optimizers re-create their state lazily at the next step

    @override
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, task = batch
        loss = F.cross_entropy(self.forward(x, task), y)  # forward, not __call__: no module hooks to run here
        if not torch.isfinite(loss):  # stop before a NaN reaches the weights (and any checkpoint)
            raise self._non_finite(loss, batch_idx)
        log = log_now(self.trainer)
        if log:
            self.log("train/loss", loss, prog_bar=True)
        for method in self._methods:
            penalty = method.penalty(self)
            if penalty is not None:
                if log:
                    self.log(f"train/{method.name}_penalty", penalty)
                loss = loss + penalty
        return loss

    def _non_finite(self, loss: Tensor, batch_idx: int) -> NonFiniteLossError:
        dm = stream_of(self.trainer)
        epoch = self.current_epoch
        ckpt = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        return NonFiniteLossError(
            f"the training loss is {loss.item()} at task {dm.task_of_epoch(epoch) + 1}/{dm.num_tasks} "
            f"(epoch {epoch % dm.epochs_per_task + 1}/{dm.epochs_per_task} of the task, batch {batch_idx}, "
            f"global step {self.global_step}). Training stopped before this step changed the weights"
            + (f"; the checkpoints written so far are intact in {ckpt}" if ckpt else "")
            + ". Lower the learning rate (optimizer.lr) or the method's strength (e.g. method.ewc_lambda)."
        )

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, task = batch
        self.val_acc[dataloader_idx].update(self(x, task).argmax(-1), y)

    @override
    def on_validation_epoch_end(self) -> None:
        dm = stream_of(self.trainer)
        task = dm.task_of_epoch(self.current_epoch)
        row = torch.stack([metric.compute() for metric in self.val_acc])  # synced across ranks
        for metric in self.val_acc:
            metric.reset()
        self.accuracy_matrix[task] = row.to(self.accuracy_matrix)
        # the values are already synced across ranks (torchmetrics); sync_dist only silences Lightning's warning,
        # at the cost of one tiny all-reduce per task
        for j, acc in enumerate(row):
            self.log(f"val/acc/task_{j + 1}", acc, sync_dist=True)
        self.log("val/avg_acc_seen", row[: task + 1].mean(), prog_bar=True, sync_dist=True)
        self.log("task", float(task + 1), sync_dist=True)

    @override
    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory(self.parameters())

    def completed_rows(self) -> Tensor:
        """The rows of the accuracy matrix filled so far (one per finished task)."""
        filled = ~self.accuracy_matrix.isnan().all(dim=1)
        return self.accuracy_matrix[filled]
