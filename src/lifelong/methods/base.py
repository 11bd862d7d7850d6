"""What a continual-learning method is here: a Lightning Callback that reacts to the stream's task events and
may add a loss term. `ContinualMethod` is the one door between a method, the stream and the module."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lifelong.data.schedule import StreamNeeds
from lifelong.data.streams import TaskStream
from lifelong.data.tensors import Batch, TaskData


def log_now(trainer: L.Trainer) -> bool:
    """Whether this training step's logs will be written (Lightning writes every ``log_every_n_steps``).

    ``self.log`` costs a fraction of a millisecond, a large share of a small network's step on a CPU, so
    per-step values are only logged on the steps the logger keeps.
    """
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0  # type: ignore[attr-defined]


class ContinualModule(Protocol):
    """What a method sees of the LightningModule it trains
    ([`lifelong.models.ContinualClassifier`][lifelong.models.module.ContinualClassifier] is one): the network, the
    heads, the task being trained and the stream, without importing the module's class.

    Attributes:
        net: the network (the wrapper a method's `ContinualMethod.configure_network` returned).
        current_task: the task being trained (0-based), set by the stream's clock at every step.
        num_tasks: the stream's tasks.
        num_classes: the network's outputs, every head's.
        scenario: ``"task"``, ``"domain"`` or ``"class"``.
        task_classes: the outputs of each task's classes.
        seen_outputs: how many outputs the classes of tasks ``0..t`` span (the class scenario's head after ``t``).
        reset_optimizer: whether the optimizer's state is cleared at each task start.
    """

    net: nn.Module
    current_task: int
    num_tasks: int
    num_classes: int
    scenario: str
    task_classes: list[list[int]]
    seen_outputs: list[int]
    reset_optimizer: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def trainer(self) -> L.Trainer: ...

    @property
    def stream(self) -> TaskStream:
        """The stream being trained (the trainer's datamodule)."""
        ...

    @property
    def training(self) -> bool: ...

    def __call__(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """The scenario's logits of ``x`` (the heads applied)."""
        ...

    def outputs(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """The network's raw outputs, every head's."""
        ...

    def heads(self, logits: Tensor, task: Tensor | None) -> Tensor:
        """The scenario's logits from raw outputs."""
        ...

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``: per-step values from the training step and its hooks."""
        ...

    def log_event(self, values: Mapping[str, float | Tensor]) -> None:
        """Write ``values`` to the run's loggers at this step, as they are: what a task event measured (the
        values must already agree across ranks)."""
        ...


# what module_of checks: members a detached module has too (the trainer and the stream need a fit)
VIEW_MEMBERS = ("net", "current_task", "num_tasks", "scenario", "seen_outputs", "heads", "outputs", "log_event")


def module_of(pl_module: L.LightningModule) -> ContinualModule:
    """``pl_module`` as methods see it, checked once (in Lightning's hooks, which pass the plain LightningModule)."""
    missing = [name for name in VIEW_MEMBERS if not hasattr(pl_module, name)]
    if missing:
        raise TypeError(
            f"lifelong's methods train a module with heads and a task stream (lifelong.models.ContinualClassifier); "
            f"{type(pl_module).__name__} has no {', '.join(missing)}"
        )
    return pl_module  # type: ignore[return-value]  # checked above: a structural match


class ContinualMethod(Callback):
    """A continual-learning method: a Lightning Callback that reacts to the stream's task events.

    Three kinds of hook, all optional:

    * **Task events**, raised by the stream's clock where a boundary falls (at any step, not only at an epoch's
      end) and dispatched once to every method by the module: `on_task_start` before a task's first
      step, `on_task_end` after its last step and before it is evaluated.
    * **Loss terms**: `penalty` (added to the loss in every training step), `classification_loss`
      (in place of the cross-entropy), `scores` (what evaluation ranks). A term that is a function of the
      parameters alone (EWC's quadratic) is cheaper added to the gradients in ``on_before_optimizer_step``,
      like any other Lightning hook.
    * **Declared needs** from the stream, read once at setup (`stream_needs`): `needs_rows`,
      `needs_cumulative_data`, and `training_data` when overridden. Two methods that need
      incompatible things are refused before anything trains.

    Methods keep their state (importances, anchors, buffers) in ``state_dict``, so checkpoints resume them.
    """

    name = "method"
    needs_rows = False  # training batches carry each sample's row (Batch.rows): its identity
    needs_cumulative_data = False  # task t trains on tasks 0..t (the joint baseline)
    trains_on_stream = True  # False: the stream's batches train nothing (GDumb learns from its memory alone)

    @property
    def needs_boundaries(self) -> bool:
        """Whether the method needs the task events: it acts at a task's start or end, or trains on tasks 0..t.
        ``boundaries=hidden`` refuses such a method (`check_boundaries`); a task-free one leaves both hooks alone."""
        return overrides(self, "on_task_start") or overrides(self, "on_task_end") or self.needs_cumulative_data

    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        """The network to train, given the model's: methods that change the network (HAT's masks) wrap it here.

        Called once, before the LightningModule is built; the default leaves the network as it is.
        """
        return net

    def training_data(self, stream: TaskStream, data: TaskData, task: int, epoch_in_task: int) -> TaskData:
        """The samples an epoch of ``task`` trains on, given the stream's (``data``): overridden by a method that
        chooses them (DWA's curriculum, iCaRL's exemplars). At most one method of a run may."""
        return data

    def before_evaluation(self, trainer: L.Trainer, module: ContinualModule) -> None:
        """Before each task-end evaluation, with the task events given or hidden: a method that prepares its
        network for testing (GDumb trains it on its memory) does it here."""

    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task: int) -> None:
        """Before the first training step of ``task``."""

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """After the last training step of ``task``, before it is evaluated; ``last``: the stream's last task, after
        which nothing trains (importances and memories would never be used)."""

    def penalty(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        """The term added to the training loss at this step, or ``None`` for none.

        Args:
            module: the module being trained.
            batch: the step's batch.
            outputs: the network's raw outputs on ``batch.x``, every head's (before the scenario's masking).
        """
        return None

    def classification_loss(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        """The training loss in place of the cross-entropy (iCaRL's sigmoid loss), or ``None`` to keep it.

        At most one method of a run may replace it; arguments as in `penalty`.
        """
        return None

    def scores(self, module: ContinualModule, x: Tensor, task: Tensor | None) -> Tensor | None:
        """Class scores that evaluation should rank in place of the network's logits (iCaRL's nearest mean of
        exemplars), through the scenario's heads, or ``None`` to use the logits."""
        return None


def overrides(method: ContinualMethod, hook: str) -> bool:
    """Whether ``method``'s class overrides ``hook`` of `ContinualMethod`."""
    return getattr(type(method), hook) is not getattr(ContinualMethod, hook)


def stream_needs(methods: Sequence[ContinualMethod]) -> StreamNeeds:
    """What ``methods`` together need from the stream; raises ``ValueError`` (one message naming both) when two
    of them each choose the training data or each replace the classification loss."""
    for hook, what in (("training_data", "choose the training data"), ("classification_loss", "replace the loss")):
        claim = [m.name for m in methods if overrides(m, hook)]
        if len(claim) > 1:
            raise ValueError(f"methods {' and '.join(claim)} each {what}: a run can combine at most one of them")
    chooser = next((m for m in methods if overrides(m, "training_data")), None)
    return StreamNeeds(
        rows=any(m.needs_rows for m in methods),
        cumulative=any(m.needs_cumulative_data for m in methods),
        training_data=chooser.training_data if chooser is not None else None,
    )


BOUNDARIES = ("given", "hidden")  # what the methods are told of the task boundaries
TASK_FREE = "finetune, der, derpp, er_ace, gdumb, or ewc, online_ewc, mas, si with method.consolidate=plateau|every"


def check_boundaries(
    methods: Sequence[ContinualMethod], stream: TaskStream, boundaries: str, class_outputs: str
) -> None:
    """Refuse what cannot run with the task boundaries ``boundaries`` (given or hidden from the methods) on
    ``stream``: a method that needs them when they are hidden, and the class scenario's head of the classes seen so
    far (``class_outputs="seen"``, set by the task being trained) when they are hidden or the stream mixes tasks."""
    if boundaries not in BOUNDARIES:
        raise ValueError(f"boundaries must be one of {list(BOUNDARIES)}, got {boundaries!r}")
    if boundaries == "hidden":
        needing = [m.name for m in methods if m.needs_boundaries]
        if needing:
            raise ValueError(
                f"method={needing[0]} needs the task boundaries (it acts at task ends or trains on the tasks so far), "
                f"and boundaries=hidden hides them from the methods: use boundaries=given, or a task-free method "
                f"({TASK_FREE})"
            )
    mixed = stream.boundary.mixes
    if stream.scenario == "class" and class_outputs == "seen" and (boundaries == "hidden" or mixed):
        why = (
            f"dataset.boundary={stream.boundary.kind} puts later tasks' classes in earlier tasks"
            if mixed
            else ("boundaries=hidden keeps the task being trained from the methods")
        )
        raise ValueError(
            f"class_outputs=seen sets the class scenario's head by the task being trained, but {why}: use "
            "class_outputs=all (every output trained from the first step, as Mammoth and the online literature do)"
        )


def gathered(trainer: L.Trainer, pl_module: L.LightningModule, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Each of ``tensors`` (the same shape on every rank) with every rank's rows, in rank order; as they are in a
    single process. What a method whose state must be the same on every rank offers that state."""
    if trainer.world_size == 1:
        return tensors
    return tuple(cast(Tensor, pl_module.all_gather(t)).flatten(0, 1) for t in tensors)


def frozen_copy(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode, without gradients: the old network that distillation compares with."""
    old = copy.deepcopy(net).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


# ---- for methods that wrap the network (HAT, DWA) ---------------------------------------------------------
NetT = TypeVar("NetT", bound=nn.Module)


def require_task_scenario(method: str, stream: TaskStream, why: str) -> None:
    """Refuse any scenario but ``task``, saying ``why`` the method needs the task identity."""
    if stream.scenario != "task":
        raise ValueError(f"method={method} needs dataset.scenario=task ({why}), got {stream.scenario!r}")


def refuse_sharded(method: str, trainer: L.Trainer) -> None:
    """Refuse strategies that shard or flatten parameters: ``method`` keeps a state per parameter."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel")):
        raise ValueError(f"method={method} does not support the {name} strategy (it shards parameters); use ddp")


def refuse_normalisation(method: str, net: nn.Module) -> None:
    """Refuse a network with normalisation layers, whose statistics every task would share."""
    norms = [n for n, m in net.named_modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm))]
    if norms:
        raise ValueError(
            f"method={method} cannot mask a network with normalisation layers ({norms[0]}, ...): every task would "
            "share their statistics. Use model=mlp, cnn or alexnet"
        )


def wrapped_net(module: L.LightningModule | ContinualModule, cls: type[NetT], method: str) -> NetT:
    """The module's network, checked to be the wrapper ``cls`` that ``method``'s ``configure_network`` builds."""
    net = module_of(module).net if isinstance(module, L.LightningModule) else module.net
    if not isinstance(net, cls):
        raise TypeError(
            f"method={method} trains a {cls.__name__}: build the module with the network its "
            "configure_network(net, stream) returns"
        )
    return net
