"""What a continual-learning method is here: a Lightning Callback that may also add a loss term."""

from __future__ import annotations

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
