"""Elastic Weight Consolidation as a Lightning Callback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from torch import Tensor

from lifelong.data.tensors import TaskData
from lifelong.methods.base import ContinualModule
from lifelong.methods.fisher import FISHER_TYPES, fisher_sums
from lifelong.methods.quadratic import QuadraticRegularizer, all_reduce_mean, check_strength
from lifelong.seeding import generator


class EWC(QuadraticRegularizer):
    r"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) and online EWC (Schwarz et al., 2018).

    At the end of each task k it computes the diagonal Fisher $F_k$ of that task (per sample and exact, see
    [`lifelong.methods.fisher`][lifelong.methods.fisher]) and the anchor $\theta^*_k$ (the weights then). While training
    later tasks it adds to the loss

    $$
    \frac{\lambda}{2} \sum_i \Omega_i (\theta_i - \bar\theta_i)^2 + \frac{\lambda}{2} c
    $$

    **Loss convention: the paper's** $\lambda/2$. A lambda quoted for the form without the 1/2 (as in
    Hsu et al. 2018 or this project's DESIGN notes) is half of ours: their 30 is our 60.

    ``mode="separate"`` (the paper) holds the sum of all past tasks' quadratics exactly as one quadratic;
    ``mode="online"`` keeps a running Fisher and the latest anchor (see
    [`QuadraticRegularizer`][lifelong.methods.quadratic.QuadraticRegularizer]). Under DDP every rank sums the Fisher
    over its shard of the task, the sums and counts are all-reduced, and every rank holds the same state.

    Args:
        ewc_lambda: strength $\lambda \geq 0$.
        fisher_type: ``"empirical"`` (true labels), ``"sampled"`` (labels drawn from the model) or
            ``"exact"`` (expectation over all classes).
        num_samples: samples of the finished task to estimate the Fisher on (random, seeded); ``None``
            for all.
        mode: ``"separate"`` or ``"online"``.
        decay: $\gamma \in [0, 1]$ of online mode (ignored in separate mode).
    """

    name = "ewc"

    def __init__(
        self,
        ewc_lambda: float = 60.0,
        fisher_type: str = "empirical",
        num_samples: int | None = None,
        mode: str = "separate",
        decay: float = 1.0,
        **trigger: Any,
    ) -> None:
        super().__init__(mode=mode, decay=decay, **trigger)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"method.fisher_type must be one of {list(FISHER_TYPES)}, got {fisher_type!r}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"method.num_samples must be a positive number or null, got {num_samples}")
        self.ewc_lambda = check_strength("ewc_lambda", ewc_lambda)
        self.fisher_type = fisher_type
        self.num_samples = num_samples

    @property
    def coefficient(self) -> float:
        return 0.5 * self.ewc_lambda

    @property
    def last_fisher(self) -> dict[str, Tensor]:
        """The latest task's Fisher."""
        return self.last_importance

    def importance_on(
        self, trainer: L.Trainer, module: ContinualModule, data: TaskData, params: Mapping[str, Tensor], key: int
    ) -> dict[str, Tensor]:
        """The diagonal Fisher over ``data`` (a finished task's training data, or ``num_samples`` of it)."""
        dm = module.stream
        labels = generator(dm.seed, "fisher_labels", task=key, rank=trainer.global_rank)
        sums = fisher_sums(
            module,  # type: ignore[arg-type]  # an nn.Module: ContinualModule is its view for methods
            dm.loader(data, train=False),
            self.fisher_type,
            params=params,  # type: ignore[arg-type]
            generator=labels,
        )
        return all_reduce_mean(trainer, sums.sums, sums.count)
