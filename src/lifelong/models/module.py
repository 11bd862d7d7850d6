"""The LightningModule that trains a plain classifier through a task stream."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import Self, override

from lifelong.data.schedule import Step
from lifelong.data.streams import TaskStream, stream_of
from lifelong.data.tensors import Batch
from lifelong.errors import NonFiniteLossError
from lifelong.methods.base import BOUNDARIES, ContinualMethod, check_boundaries, log_now, stream_needs
from lifelong.models.watch import LossWatch

log = logging.getLogger(__name__)

SCENARIOS = ("task", "domain", "class")
OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


class ContinualClassifier(L.LightningModule):
    """Wraps an ``nn.Module`` classifier for a task stream (see
    [`lifelong.data.TaskStream`][lifelong.data.streams.TaskStream]).

    * Heads, by scenario (see [`lifelong.data.streams`][lifelong.data.streams]): ``net`` has one output per class of all
      heads together. In the ``task`` scenario each sample's logits outside its task's head are masked out (to the
      dtype's lowest value, so softmax gives them probability 0 and no gradient reaches them); in the ``class`` scenario
      the logits are cut to the classes seen so far (the tasks up to the current one), or, with ``class_outputs="all"``,
      all outputs are trained and ranked from the first task on (the convention of Mammoth, Buzzega et al.'s code); in
      the ``domain`` scenario the one head is used as it is. Methods see these logits through ``forward(x, task)``, and
      need not know the scenario.
    * Training: cross-entropy plus the penalty of every [`ContinualMethod`][lifelong.methods.base.ContinualMethod] among
      the trainer's callbacks (logged as ``train/loss`` and ``train/<method>_penalty``).
    * Task events: at every training step the stream's clock
      ([`lifelong.data.TaskStream.step`][lifelong.data.streams.TaskStream.step]) says which task is trained and whether
      a task starts or ends there; the module raises each event once, to every method (``on_task_start`` before a task's
      first step, ``on_task_end`` after its last), clears the optimizer's state at a task's start (``reset_optimizer``)
      and evaluates at its end. A boundary may fall at any step, inside an epoch too.
    * Evaluation: at the end of each task the module measures every task's test set and, with ``validation``, every
      task's validation set ([`lifelong.data.TaskStream.eval_loaders`][lifelong.data.streams.TaskStream.eval_loaders]:
      validation sets first). They fill row ``task`` of `accuracy_matrix` (test) and `val_accuracy_matrix`, buffers, so
      checkpoints carry them. Logged as ``test/acc/task_<j>`` (1-based) and ``test/avg_acc_seen``, and as ``val/...``
      for validation, which the progress bar shows when there is some. Before the first task, the untrained network is
      measured once the same way (`initial_accuracy`, `val_initial_accuracy`): the reference of forward transfer. In the
      ``class`` scenario the same evaluation also fills `task_aware_accuracy_matrix` (and its validation twin): each
      sample ranked among its own task's classes only, the Task-IL accuracy that class-incremental papers report beside
      Class-IL from the same run.

    Args:
        net: the classifier, ``net(x) -> (B, num_classes)`` logits.
        optimizer: ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.Adam, lr=1e-3)``).
        num_tasks: the stream's number of tasks (the size of the accuracy matrix).
        num_classes: outputs of ``net``.
        scenario: ``"task"``, ``"domain"`` or ``"class"``.
        task_classes: the outputs of each task's classes (``TaskStream.task_classes``); ``None`` for every
            task using all outputs.
        reset_optimizer: clear the optimizer's state (e.g. Adam's moments) at the start of each task, as in
            Hsu et al. (2018), so a task does not start with momentum from the previous one.
        validation: the stream's evaluation loaders include each task's validation set, before the test sets
            (``TaskStream.has_validation``).
        class_outputs: the class scenario's head: ``"seen"`` (the outputs of the classes seen so far, the
            default: a class's output is trained from its task on) or ``"all"`` (every output from the first
            task on, so the cross-entropy pushes the classes still to come down).
        boundaries: ``"given"`` (the default): the methods get the task events and the optimizer's state is
            cleared at each task start; ``"hidden"``: neither (task-free learning); the evaluation at each task
            end, which belongs to the scenario, runs either way. Methods that need the events are refused.
    """

    takes_task = True  # forward(x, task); see lifelong.methods.fisher.call_model
    accuracy_matrix: Tensor
    val_accuracy_matrix: Tensor
    initial_accuracy: Tensor
    val_initial_accuracy: Tensor
    task_mask: Tensor
    task_aware_accuracy_matrix: Tensor
    val_task_aware_accuracy_matrix: Tensor

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        num_tasks: int,
        num_classes: int,
        reset_optimizer: bool = True,
        scenario: str = "domain",
        task_classes: Sequence[Sequence[int]] | None = None,
        validation: bool = False,
        class_outputs: str = "seen",
        boundaries: str = "given",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {list(SCENARIOS)}, got {scenario!r}")
        if class_outputs not in CLASS_OUTPUTS:
            raise ValueError(f"class_outputs must be one of {list(CLASS_OUTPUTS)}, got {class_outputs!r}")
        everything = [list(range(num_classes))] * num_tasks
        classes = [list(c) for c in task_classes] if task_classes is not None else everything
        if len(classes) != num_tasks or any(not c or min(c) < 0 or max(c) >= num_classes for c in classes):
            raise ValueError(f"task_classes must list outputs in [0, {num_classes}) for each of {num_tasks} tasks")
        self.net = net
        self.optimizer_factory = optimizer
        self.num_tasks = num_tasks
        self.num_classes = num_classes
        self.reset_optimizer = reset_optimizer
        self.scenario = scenario
        self.class_outputs = class_outputs
        if boundaries not in BOUNDARIES:
            raise ValueError(f"boundaries must be one of {list(BOUNDARIES)}, got {boundaries!r}")
        self.boundaries = boundaries
        self.task_classes = classes
        self.current_task = 0  # the task being trained (set by the stream's clock); the class scenario's heads
        mask = torch.zeros(num_tasks, num_classes, dtype=torch.bool)
        for t, c in enumerate(classes):
            mask[t, c] = True
        self.register_buffer("task_mask", mask, persistent=False)  # (T, C): each task's head
        # how many outputs the classes of tasks 0..t span (outputs are in task order): the class scenario's head
        self.seen_outputs = [max(max(c) for c in classes[: t + 1]) + 1 for t in range(num_tasks)]
        self.validation = validation
        # one accuracy per evaluation loader: [validation sets,] test sets; the class scenario's task-aware twins
        loaders = num_tasks * (2 if validation else 1)
        self.eval_acc: list[MulticlassAccuracy] = nn.ModuleList(  # type: ignore[assignment]
            MulticlassAccuracy(num_classes, average="micro") for _ in range(loaders)
        )
        self.task_aware_acc: list[MulticlassAccuracy] = nn.ModuleList(  # type: ignore[assignment]
            MulticlassAccuracy(num_classes, average="micro") for _ in range(loaders if scenario == "class" else 0)
        )
        for name, shape in RESULT_BUFFERS.items():  # NaN until measured
            self.register_buffer(name, torch.full(shape(num_tasks), float("nan")))
        self._methods: list[ContinualMethod] = []
        self._loss_method: ContinualMethod | None = None  # the method whose loss replaces the cross-entropy
        self._loss_watch = LossWatch()
        self._step: Step | None = None  # where the current training step falls in the stream
        self._trains = True  # some method trains the network on the stream's batches

    @classmethod
    def for_stream(cls, net: nn.Module, optimizer: OptimizerFactory, stream: TaskStream, **kwargs: Any) -> Self:
        """The module for ``stream`` (set up): its number of tasks, outputs, scenario and heads."""
        return cls(
            net,
            optimizer,
            num_tasks=stream.num_tasks,
            num_classes=stream.num_classes,
            scenario=stream.scenario,
            task_classes=stream.task_classes,
            validation=stream.has_validation,
            **kwargs,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` around every hook call, about 44 times per training step; going
        # through nn.Module.__setattr__ (which checks parameters, buffers and submodules) cost ~6% of a small
        # network's epoch on a CPU. It is a plain string, so the plain object setter is equivalent.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def stream(self) -> TaskStream:
        """The stream being trained: the trainer's datamodule."""
        return stream_of(self.trainer)

    @property
    def stream_step(self) -> Step | None:
        """Where the current training step falls in the stream (set before each step by the stream's clock)."""
        return self._step

    def log_event(self, values: Mapping[str, float | Tensor]) -> None:
        """Write ``values`` to the loggers at this step, as they are (not Lightning's per-step or per-epoch
        reduction: a task event may fall at any step). The values must already agree across ranks."""
        trainer = self.trainer
        metrics = {k: float(v) for k, v in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """Logits of ``x`` ``(B, ...)`` whose samples belong to the tasks ``task`` ``(B,)``: see the heads above."""
        return self.heads(self.outputs(x, task), task)

    def outputs(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """The network's raw outputs, every head's: ``(B, num_classes)``."""
        if getattr(self.net, "takes_task", False):  # a network that depends on the task (HAT's masks)
            return self.net(x, task)
        return self.net(x)

    def heads(self, logits: Tensor, task: Tensor | None) -> Tensor:
        """The scenario's logits from the raw outputs (see the class docstring)."""
        if self.scenario == "task":
            if task is None:
                raise ValueError("the task scenario needs each sample's task: forward(x, task)")
            mask = self.task_mask.index_select(0, task)  # (B, C)
            return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        if self.scenario == "class" and self.class_outputs == "seen":
            return logits[:, : self.seen_outputs[self.current_task]]
        return logits

    def predict(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """The class scores evaluation ranks: a method's own (`ContinualMethod.scores`, e.g. iCaRL's nearest
        mean of exemplars) where one gives them, else the logits of `forward`."""
        for method in self._methods:
            scores = method.scores(self, x, task)
            if scores is not None:
                return scores
        return self(x, task)

    @override
    def on_fit_start(self) -> None:
        """The run's methods, and what they need from the stream (refused here if two need incompatible things)."""
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        self._methods = [cb for cb in callbacks if isinstance(cb, ContinualMethod)]
        check_boundaries(self._methods, self.stream, self.boundaries, self.class_outputs)
        self.stream.serve(stream_needs(self._methods))
        self._trains = any(m.trains_on_stream for m in self._methods) or not self._methods
        if not self._trains:  # on purpose: Lightning's warning that a step returned None would repeat it
            warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")
        base = ContinualMethod.classification_loss
        replacing = [m for m in self._methods if type(m).classification_loss is not base]
        self._loss_method = replacing[0] if replacing else None  # chosen once, not looked up every step

    @override
    def on_train_start(self) -> None:
        """A fresh stream (not a resumed one) measures the untrained network first: forward transfer's reference."""
        if self.trainer.global_step > 0 or not self.initial_accuracy.isnan().all():
            return
        self._measure_all()
        val, test, _ = self._computed_rows()
        self.initial_accuracy.copy_(test)
        if val is not None:
            self.val_initial_accuracy.copy_(val)

    # ---- the stream's task events ----------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Ask the stream's clock where this step falls; at a task's first step, raise ``on_task_start``."""
        trainer = self.trainer
        step = self.stream.step(trainer.current_epoch, batch_idx, int(trainer.num_training_batches))
        self._step = step
        self.current_task = step.task
        if step.starts_task and self.boundaries == "given":
            if self.reset_optimizer and step.task > 0:
                for opt in trainer.optimizers:
                    opt.state.clear()  # optimizers re-create their state lazily at the next step
            for method in self._methods:
                method.on_task_start(trainer, self, step.task)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """After a task's last step: raise ``on_task_end`` (methods consolidate, select exemplars...), then
        evaluate every task: a row of the accuracy matrix. (Every callback's own ``on_train_batch_end``, such as
        DER's memory update, ran before this.)"""
        step = self._step
        if step is None or not step.ends_task:
            return
        trainer = self.trainer
        for method in self._methods if self.boundaries == "given" else ():
            method.on_task_end(trainer, self, step.task, last=step.task == self.num_tasks - 1)
        for method in self._methods:
            method.before_evaluation(trainer, self)
        self._evaluate(step.task)

    @override
    def on_train_epoch_end(self) -> None:
        self._raise_if_non_finite()
        # the per-task checkpoints are named by it (ModelCheckpoint reads the values logged by then)
        self.log("task", float(len(self.completed_rows())), logger=False, sync_dist=True)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        if not self._trains:  # the methods learn from something else (GDumb's memory): no step on the stream
            if self.trainer.world_size == 1:
                return None
            # DDP cannot skip a step: a zero loss of every parameter (zero gradients; Adam's update stays 0)
            return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0
        x, task = batch.x, batch.task
        outputs = self.outputs(x, task)
        loss = self._classification_loss(batch, outputs)
        log = log_now(self.trainer)
        if loss.device.type == "cpu":  # the check costs nothing here: stop before a NaN reaches the weights
            if not torch.isfinite(loss):
                raise self._non_finite(float(loss), batch_idx)
        else:  # on an accelerator reading it is a host sync: noted on the device, read where one happens anyway
            self._loss_watch.note(loss, batch_idx, self.global_step)
            if log:
                self._raise_if_non_finite()
        if log:
            self.log("train/loss", loss, prog_bar=True)
        for method in self._methods:
            penalty = method.penalty(self, batch, outputs)
            if penalty is not None:
                if log:
                    self.log(f"train/{method.name}_penalty", penalty)
                loss = loss + penalty
        return loss

    def _classification_loss(self, batch: Batch, outputs: Tensor) -> Tensor:
        if self._loss_method is not None:
            loss = self._loss_method.classification_loss(self, batch, outputs)
            if loss is not None:
                return loss
        return F.cross_entropy(self.heads(outputs, batch.task), batch.y)

    def _non_finite(
        self, loss: float, batch_idx: int, step: int | None = None, after: bool = False
    ) -> NonFiniteLossError:
        dm = self.stream
        e, of = dm.epoch_in_task(self.current_epoch)
        ckpt = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        stopped = (
            "Training stopped before the next checkpoint, which would have held its weights"
            if after
            else "Training stopped before this step changed the weights"
        )
        return NonFiniteLossError(
            f"the training loss is {loss} at task {self.current_task + 1}/{dm.num_tasks} "
            f"(epoch {e + 1}/{of} of the task, batch {batch_idx}, "
            f"global step {self.global_step if step is None else step}). {stopped}"
            + (f"; the checkpoints written so far are intact in {ckpt}" if ckpt else "")
            + ". Lower the learning rate (optimizer.lr) or the method's strength (e.g. method.ewc_lambda)."
        )

    def _raise_if_non_finite(self) -> None:
        """Raise if the watch noted a non-finite loss (one host sync): at log steps, before a task's evaluation
        and at each epoch end, that is, before any checkpoint."""
        found = self._loss_watch.found()
        if found is not None:
            raise self._non_finite(*found, after=True)

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _measure_all(self) -> None:
        """One pass over the stream's evaluation loaders, in eval mode, into the accuracy metrics.

        Not Lightning's validation loop: that runs on its own schedule (epoch ends, fixed intervals), and a task
        may end at any step of the stream's clock."""
        was_training = self.training
        self.eval()
        try:
            for i, loader in enumerate(self.stream.eval_loaders()):
                for b in loader:
                    self._measure(i, b.x, b.y, b.task)
        finally:
            self.train(was_training)

    def _measure(self, loader: int, x: Tensor, y: Tensor, task: Tensor) -> None:
        scores = self.predict(x, task)
        self.eval_acc[loader].update(scores.argmax(-1), y)
        if self.task_aware_acc:  # the class scenario: also rank each sample among its own task's classes only
            mask = self.task_mask.index_select(0, task)[:, : scores.shape[1]]
            self.task_aware_acc[loader].update(scores.masked_fill(~mask, -torch.inf).argmax(-1), y)

    def _computed_rows(self) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """The accuracies gathered since the last call, synced across ranks: the validation row (or None), the
        test row, and the class scenario's task-aware rows, validation's then test's (or None)."""
        t = self.num_tasks
        row = _computed(self.eval_acc)
        aware = _computed(self.task_aware_acc) if self.task_aware_acc else None
        return (row[:t] if self.validation else None), row[-t:], aware

    def _evaluate(self, task: int) -> None:
        """Row ``task`` of every accuracy matrix, measured now (after the task's last step), and logged."""
        self._raise_if_non_finite()
        self._measure_all()
        dm = self.stream
        val, test, aware = self._computed_rows()
        self.accuracy_matrix[task] = test.to(self.accuracy_matrix)
        if val is not None:
            self.val_accuracy_matrix[task] = val.to(self.val_accuracy_matrix)
        if aware is not None:
            self.task_aware_accuracy_matrix[task] = aware[-self.num_tasks :].to(self.task_aware_accuracy_matrix)
            if val is not None:
                self.val_task_aware_accuracy_matrix[task] = aware[: self.num_tasks].to(
                    self.val_task_aware_accuracy_matrix
                )
        # the values are already synced across ranks (torchmetrics)
        logged: dict[str, float | Tensor] = {"task": float(task + 1)}
        for split, row in (("val", val), ("test", test)):
            if row is not None:
                logged.update({f"{split}/acc/task_{j + 1}": acc for j, acc in enumerate(row)})
                logged[f"{split}/avg_acc_seen"] = row[: task + 1].mean()
        self.log_event(logged)
        if self.trainer.is_global_zero:
            parts = [
                f"{name} accuracy {100 * row[: task + 1].mean().item():.2f} %"
                for name, row in (("validation", val), ("test", test))
                if row is not None
            ]
            each = " ".join(f"{100 * a:.1f}" for a in test[: task + 1].tolist())
            log.info(f"after task {task + 1}/{dm.num_tasks}: {', '.join(parts)} on tasks 1-{task + 1} (test: {each})")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before the validation split lacks its buffers: they start unmeasured (NaN)."""
        state = checkpoint.get("state_dict", {})
        for name, shape in RESULT_BUFFERS.items():
            state.setdefault(name, torch.full(shape(self.num_tasks), float("nan")))

    @override
    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory(self.parameters())

    def completed_rows(self, validation: bool = False, task_aware: bool = False) -> Tensor:
        """The rows of the (test, or validation) accuracy matrix filled so far (one per finished task); with
        ``task_aware``, of the class scenario's task-aware matrix (all NaN in the other scenarios)."""
        prefix = ("val_" if validation else "") + ("task_aware_" if task_aware else "")
        matrix: Tensor = getattr(self, f"{prefix}accuracy_matrix")
        return matrix[~self.accuracy_matrix.isnan().all(dim=1)]


# the results a module measures along the stream (buffers, so checkpoints carry them), by their shape for T tasks
RESULT_BUFFERS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "accuracy_matrix": lambda t: (t, t),  # test accuracy: row i after task i, column j on task j
    "val_accuracy_matrix": lambda t: (t, t),  # the same on the validation sets (NaN without them)
    "initial_accuracy": lambda t: (t,),  # test accuracy of the untrained network (forward transfer's reference)
    "val_initial_accuracy": lambda t: (t,),
    # the class scenario's test and validation accuracy with each sample ranked among its own task's classes
    "task_aware_accuracy_matrix": lambda t: (t, t),
    "val_task_aware_accuracy_matrix": lambda t: (t, t),
}
CLASS_OUTPUTS = ("seen", "all")  # the class scenario's head: see ContinualClassifier


def _computed(metrics: Sequence[MulticlassAccuracy]) -> Tensor:
    """Each metric's value (synced across ranks), as one row; the metrics are reset for the next evaluation."""
    row = torch.stack([metric.compute() for metric in metrics])
    for metric in metrics:
        metric.reset()
    return row
