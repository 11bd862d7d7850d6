"""The fine-tuning baseline."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn
from typing_extensions import override

from lifelong.methods.base import ContinualMethod, module_of


class Finetune(ContinualMethod):
    """Fine-tuning: each task trains from the previous task's weights with no protection (the lower bound).

    Args:
        freeze_layers: hold the network's first this many Linear/Conv2d layers fixed once the first task has
            ended (0: none). A control, not a method: with 1 it is the stem that DWA's diagnosis found doing the
            protecting (docs/methods.md, "DWA: what lifelong implements"), which a method must beat to show that
            it protects more than its first layer.
    """

    name = "finetune"

    def __init__(self, freeze_layers: int = 0) -> None:
        super().__init__()
        if int(freeze_layers) < 0:
            raise ValueError(f"method.freeze_layers must be >= 0, got {freeze_layers}")
        self.freeze_layers = int(freeze_layers)
        self._held: list[nn.Parameter] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the fit: the layers to hold, checked to leave some to learn."""
        layers = [m for m in module_of(pl_module).net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if self.freeze_layers >= len(layers):
            raise ValueError(
                f"method.freeze_layers={self.freeze_layers} would hold every layer of this network "
                f"({len(layers)} Linear/Conv2d layers): nothing would learn after the first task"
            )
        self._held = [p for layer in layers[: self.freeze_layers] for p in layer.parameters()]

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """After the first task: no gradient for the held layers (``None``, so the optimizer skips them whole,
        its moments included)."""
        if self.freeze_layers and module_of(pl_module).current_task > 0:
            for p in self._held:
                p.grad = None
