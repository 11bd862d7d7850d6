"""Elastic Weight Consolidation as a Lightning Callback."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lifelong.data.tensors import TaskData
from lifelong.errors import ResumeError
from lifelong.methods.base import ContinualModule
from lifelong.methods.fisher import FISHER_TYPES, FisherSums, fisher_sums
from lifelong.methods.kfac import KroneckerSums, kfac_sums
from lifelong.methods.kfac_penalty import KroneckerPenalty
from lifelong.methods.quadratic import QuadraticRegularizer, all_reduce_mean, check_strength
from lifelong.seeding import generator

STRUCTURES = ("diagonal", "kfac")
log = logging.getLogger(__name__)


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

    ``fisher_structure="kfac"`` replaces each ``nn.Linear`` and ``nn.Conv2d`` layer's diagonal by a Kronecker-factored
    block $A \otimes G$ (Ritter et al., 2018; [`lifelong.methods.kfac`][lifelong.methods.kfac]), which keeps how the
    weights of one layer interact; the penalty is then

    $$
    \frac{\lambda}{2} \sum_\ell \mathrm{tr}\!\left(\Delta_\ell^\top G_\ell \Delta_\ell A_\ell\right)
    = \frac{\lambda}{2} \sum_\ell \mathrm{vec}(\Delta_\ell)^\top (A_\ell \otimes G_\ell)\, \mathrm{vec}(\Delta_\ell)
    $$

    with the same $\lambda/2$: where $A$ and $G$ are diagonal it is the diagonal penalty with $F_{oi} = G_{oo}
    A_{ii}$. ``mode="separate"`` keeps every task's pair (exact; memory and step time grow with the tasks),
    ``"online"`` merges them into one (``kfac_merge``,
    [`lifelong.methods.kfac_penalty`][lifelong.methods.kfac_penalty]). Parameters of other layers (normalisation,
    embeddings, shared weights) keep the diagonal, and the run's log says which.

    Args:
        ewc_lambda: strength $\lambda \geq 0$.
        fisher_type: ``"empirical"`` (true labels), ``"sampled"`` (labels drawn from the model) or
            ``"exact"`` (expectation over all classes).
        num_samples: samples of the finished task to estimate the Fisher on (random, seeded); ``None``
            for all.
        mode: ``"separate"`` or ``"online"``.
        decay: $\gamma \in [0, 1]$ of online mode (ignored in separate mode).
        fisher_structure: ``"diagonal"`` or ``"kfac"``.
        kfac_merge: ``"average"`` or ``"pi"``: how online mode merges two tasks' Kronecker pairs into one.
        kfac_damping: $\delta \geq 0$ added to the Kronecker blocks, $\pi$-scaled onto the factors (0: none).
        kfac_matmul_precision: torch's float32 matmul precision for the Kronecker penalty's products: ``"highest"``
            (float32), ``"high"`` (TF32 on NVIDIA GPUs) or ``"medium"`` (bfloat16 products where the hardware has them).
    """

    name = "ewc"

    def __init__(
        self,
        ewc_lambda: float = 60.0,
        fisher_type: str = "empirical",
        num_samples: int | None = None,
        mode: str = "separate",
        decay: float = 1.0,
        fisher_structure: str = "diagonal",
        kfac_merge: str = "average",
        kfac_damping: float = 0.0,
        kfac_matmul_precision: str = "highest",
        **trigger: Any,
    ) -> None:
        super().__init__(mode=mode, decay=decay, **trigger)
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"method.fisher_type must be one of {list(FISHER_TYPES)}, got {fisher_type!r}")
        if fisher_structure not in STRUCTURES:
            raise ValueError(f"method.fisher_structure must be one of {list(STRUCTURES)}, got {fisher_structure!r}")
        self.fisher_structure = fisher_structure
        kron = KroneckerPenalty(mode, decay, kfac_merge, kfac_damping, kfac_matmul_precision)
        self.kron = kron if fisher_structure == "kfac" else None  # (its arguments are checked either way)
        self.last_factors: KroneckerSums | None = None  # the latest task's factors (divided by the count)
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
        """The diagonal Fisher over ``data`` (a finished task's training data, or ``num_samples`` of it); with
        ``fisher_structure="kfac"``, that of the parameters the Kronecker factors do not cover, the factors
        themselves (estimated in the same pass) waiting in `last_factors` for `consolidate`."""
        dm = module.stream
        labels = generator(dm.seed, "fisher_labels", task=key, rank=trainer.global_rank)
        estimate = fisher_sums if self.kron is None else kfac_sums
        sums = estimate(
            module,  # type: ignore[arg-type]  # an nn.Module: ContinualModule is its view for methods
            dm.loader(data, train=False),
            self.fisher_type,
            params=params,  # type: ignore[arg-type]
            generator=labels,
        )
        if not isinstance(sums, KroneckerSums):
            return all_reduce_mean(trainer, sums.sums, sums.count)
        factors = {**{f"A:{n}": t for n, t in sums.a.items()}, **{f"G:{n}": t for n, t in sums.g.items()}}
        means = all_reduce_mean(trainer, {**sums.diagonal.sums, **factors}, sums.count)
        a, g = ({n: means[f"{k}:{n}"] for n in sums.a} for k in "AG")
        diagonal = {n: means[n] for n in sums.diagonal.sums}
        self.last_factors = KroneckerSums(a, g, sums.params, FisherSums(diagonal, 1))
        if self._num_consolidated == 0 and trainer.is_global_zero:
            rest = ", ".join(diagonal) or "none"
            log.info(f"{self.name}: Kronecker-factored Fisher for {', '.join(a) or 'no layer'}; diagonal for: {rest}")
        return diagonal

    @override
    def consolidate(self, importance: dict[str, Tensor], params: Mapping[str, Tensor]) -> None:
        """Fold the finished task's diagonal importance (and, with KFAC, its factors) and anchor into the state."""
        super().consolidate(importance, params)
        if self.kron is not None:
            if self.last_factors is None:
                raise RuntimeError("EWC with fisher_structure=kfac consolidates the factors importance_on estimated")
            f = self.last_factors
            self.kron.consolidate(f.a, f.g, f.params, params)

    @override
    @torch.no_grad()
    def penalty_value(self, pl_module: torch.nn.Module) -> Tensor | None:
        value = super().penalty_value(pl_module)
        if value is None or self.kron is None:
            return value
        return value + self.coefficient * self.kron.value(pl_module)

    @override
    @torch.no_grad()
    def add_penalty_grad(self, pl_module: torch.nn.Module, scale: float = 1.0) -> None:
        super().add_penalty_grad(pl_module, scale)
        if self.kron is not None:
            self.kron.add_grad(pl_module, 2.0 * self.coefficient * scale)

    @override
    def importance_mean(self, importance: Mapping[str, Tensor]) -> Tensor:
        r"""With KFAC, each covered weight's and bias's diagonal of $A \otimes G$ counts as a parameter's importance."""
        if self.kron is None or self.last_factors is None:
            return super().importance_mean(importance)
        f = self.last_factors
        means = [v.mean() for v in importance.values()]
        for layer, (_, bias) in f.params.items():
            da, dg = f.a[layer].diagonal(), f.g[layer].diagonal().mean()
            means += [dg * (da[:-1] if bias else da).mean(), *([dg * da[-1]] if bias else [])]
        return torch.stack(means).mean()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.kron is not None:
            self.kron.to(pl_module.device)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "kfac": self.kron.state_dict()} if self.kron is not None else state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if ("kfac" in state_dict) != (self.kron is not None):
            held = "Kronecker-factored" if "kfac" in state_dict else "diagonal"
            raise ResumeError(
                f"the checkpoint's EWC state holds a {held} Fisher, this run uses "
                f"method.fisher_structure={self.fisher_structure!r}"
            )
        super().load_state_dict(state_dict)
        if self.kron is not None:
            self.kron.load_state_dict(state_dict["kfac"])
