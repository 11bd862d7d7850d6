"""What a continual-learning method is here: a Lightning Callback that may also add a loss term."""

from __future__ import annotations

import copy
from typing import TypeVar

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lifelong.data.streams import TaskStream
from lifelong.data.tensors import Batch


def log_now(trainer: L.Trainer) -> bool:
    """Whether this training step's logs will be written (Lightning writes every ``log_every_n_steps``).

    ``self.log`` costs a fraction of a millisecond, a large share of a small network's step on a CPU, so
    per-step values are only logged on the steps the logger keeps.
    """
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0  # type: ignore[attr-defined]


class ContinualMethod(Callback):
    """A Lightning Callback that can add a penalty to the training loss.

    Methods keep their state (importances, anchors, buffers) in ``state_dict`` so that checkpoints resume
    them, and react to task boundaries through Lightning's hooks (``stream_of(trainer).is_task_end(epoch)``).
    A term that needs autograd through the network (e.g. distillation) is returned by :meth:`penalty`,
    which the LightningModule adds to the loss in every training step; a term that is a function of the
    parameters alone (EWC's quadratic) is cheaper added to the gradients in ``on_before_optimizer_step``.
    """

    name = "method"

    def configure_network(self, net: nn.Module, stream: TaskStream) -> nn.Module:
        """The network to train, given the model's: methods that change the network (HAT's masks) wrap it here.

        Called once, before the LightningModule is built; the default leaves the network as it is.
        """
        return net

    def penalty(self, pl_module: L.LightningModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        """The term added to the training loss at this step, or ``None`` for none.

        Args:
            pl_module: the :class:`~lifelong.models.ContinualClassifier`.
            batch: the step's ``(x, y, task)``.
            outputs: the network's raw outputs on ``x``, every head's (before the scenario's masking).
        """
        return None

    def classification_loss(self, pl_module: L.LightningModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        """The training loss in place of the cross-entropy (iCaRL's sigmoid loss), or ``None`` to keep it.

        At most one method of a run may replace it; arguments as in :meth:`penalty`.
        """
        return None

    def scores(self, pl_module: L.LightningModule, x: Tensor, task: Tensor) -> Tensor | None:
        """Class scores that evaluation should rank in place of the network's logits (iCaRL's nearest mean of
        exemplars), through the scenario's heads, or ``None`` to use the logits."""
        return None


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


def refuse_normalisation(method: str, net: nn.Module) -> None:
    """Refuse a network with normalisation layers, whose statistics every task would share."""
    norms = [n for n, m in net.named_modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm))]
    if norms:
        raise ValueError(
            f"method={method} cannot mask a network with normalisation layers ({norms[0]}, ...): every task would "
            "share their statistics. Use model=mlp, cnn or alexnet"
        )


def wrapped_net(pl_module: L.LightningModule, cls: type[NetT], method: str) -> NetT:
    """The module's network, checked to be the wrapper ``cls`` that ``method``'s ``configure_network`` builds."""
    net = getattr(pl_module, "net", None)
    if not isinstance(net, cls):
        raise TypeError(
            f"method={method} trains a {cls.__name__}: build the module with the network its "
            "configure_network(net, stream) returns"
        )
    return net
