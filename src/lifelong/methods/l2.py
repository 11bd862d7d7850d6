"""The plain L2 anchor baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lifelong.data.tensors import TaskData
from lifelong.methods.base import ContinualModule
from lifelong.methods.quadratic import QuadraticRegularizer, check_strength


class L2(QuadraticRegularizer):
    r"""EWC's quadratic with every importance 1: $\frac{\lambda}{2} \|\theta - \theta^*\|^2$.

    The baseline that shows what EWC's Fisher adds (Kirkpatrick et al., 2017, compare it as "L2"): every
    parameter is held back equally, by default towards the weights at the end of the previous task
    (``mode="online"``, ``decay=0``: the importance stays 1, as in Hsu et al. 2018's L2). Separate mode (one
    term per past task) is available but pulls towards the mean of all past anchors, which for output heads
    trained after an anchor means back towards their untrained values: it forgets more than fine-tuning on
    multi-head streams. Same ``lambda/2`` convention as [`EWC`][lifelong.methods.ewc.EWC].

    Args:
        l2_lambda: strength $\lambda \geq 0$.
        mode: ``"online"`` (one anchor, the latest) or ``"separate"``.
        decay: online mode's $\gamma$ (0: the importance is 1 whatever the number of tasks).
    """

    name = "l2"

    def __init__(self, l2_lambda: float = 0.1, mode: str = "online", decay: float = 0.0, **trigger: Any) -> None:
        super().__init__(mode=mode, decay=decay, **trigger)
        self.l2_lambda = check_strength("l2_lambda", l2_lambda)

    @property
    def coefficient(self) -> float:
        return 0.5 * self.l2_lambda

    def importance_on(
        self, trainer: L.Trainer, module: ContinualModule, data: TaskData, params: Mapping[str, Tensor], key: int
    ) -> dict[str, Tensor]:
        return {n: torch.ones_like(p) for n, p in params.items()}
