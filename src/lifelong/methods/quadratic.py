r"""Methods whose penalty is a quadratic around past weights: EWC, online EWC, L2, SI and MAS.

They differ only in the importance $\Omega$ of each parameter, estimated at every task boundary (the
Fisher for EWC, ones for L2, the path integral for SI, output sensitivities for MAS); the quadratic, its
merging over tasks, its gradient and its state are shared here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lifelong.data.streams import TaskStream
from lifelong.data.tensors import TaskData
from lifelong.errors import ResumeError
from lifelong.methods.base import ContinualMethod, ContinualModule, log_now, refuse_sharded
from lifelong.seeding import generator

MODES = ("separate", "online")


class QuadraticRegularizer(ContinualMethod):
    r"""A penalty $\kappa \left(\sum_i \Omega_i (\theta_i - \bar\theta_i)^2 + c\right)$ around past weights.

    At the end of each task k (except the last) a subclass estimates the importance $F_k$ of every
    parameter (`task_importance`), and it is folded into the state with the anchor
    $\theta^*_k$ (the weights then):

    * ``mode="separate"``: one quadratic per past task, $\sum_k F_k (\theta - \theta^*_k)^2$. That sum
      is itself one quadratic, held exactly as $\Omega = \sum_k F_k$, $\bar\theta = \sum_k F_k
      \theta^*_k / \Omega$ and the constant $c = \sum_k F_k {\theta^*_k}^2 - \Omega \bar\theta^2$
      (which changes the value, not the gradient), so memory and per-step cost do not grow with the number
      of tasks.
    * ``mode="online"``: a running importance $\Omega \leftarrow \gamma \Omega + F_k$ and the latest
      anchor, $\bar\theta = \theta^*_k$ (``decay`` is $\gamma$).

    The coefficient $\kappa$ (`coefficient`) follows each method's paper: ``lambda/2`` for EWC
    and L2, ``c`` for SI, ``lambda`` for MAS.

    The penalty's gradient, $2\kappa\,\Omega (\theta - \bar\theta)$, is added to the gradients in
    ``on_before_optimizer_step``: after gradient accumulation, the DDP all-reduce and AMP's unscaling, so it
    needs no scaling of its own and is the same on every rank. Importances and anchors are saved through
    `state_dict`, so a checkpoint resumes them.

    Args:
        mode: ``"separate"`` or ``"online"``.
        decay: $\gamma \in [0, 1]$ of online mode (ignored in separate mode).
    """

    name = "quadratic"

    def __init__(self, mode: str = "separate", decay: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"method.mode must be one of {list(MODES)}, got {mode!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"method.decay must be in [0, 1], got {decay}")
        self.mode = mode
        self.decay = float(decay)
        self._importance: dict[str, Tensor] = {}  # Omega
        self._anchor: dict[str, Tensor] = {}  # theta-bar
        self._const = torch.zeros(())  # c
        self._num_consolidated = 0
        self.last_importance: dict[str, Tensor] = {}  # the latest task's importance, for inspection
        self._params: tuple[torch.nn.Module, list[Tensor]] | None = None  # in the state's order
        self._diff: list[Tensor] | None = None  # theta - theta-bar, a buffer reused at every step

    @property
    def coefficient(self) -> float:
        r"""$\kappa$, the factor in front of $\sum_i \Omega_i (\theta_i - \bar\theta_i)^2$."""
        raise NotImplementedError

    def task_importance(
        self, trainer: L.Trainer, module: ContinualModule, task: int, params: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The importance of each of ``params`` for the finished ``task`` (the same on every rank)."""
        raise NotImplementedError

    # ---- the penalty -------------------------------------------------------------------------------
    @torch.no_grad()
    def penalty_value(self, pl_module: torch.nn.Module) -> Tensor | None:
        """``coefficient * (sum_i Omega_i (theta_i - theta-bar_i)^2 + c)``; ``None`` before any task ended."""
        if self._num_consolidated == 0:
            return None
        params = self._param_list(pl_module)
        diffs = torch._foreach_sub(params, list(self._anchor.values()))
        total = self._const.clone()
        for omega, d in zip(self._importance.values(), diffs, strict=True):
            total += torch.dot((omega * d).flatten(), d.flatten())
        return self.coefficient * total

    @torch.no_grad()
    def add_penalty_grad(self, pl_module: torch.nn.Module, scale: float = 1.0) -> None:
        """Add ``scale *`` the penalty's gradient, ``2 coefficient * Omega * (theta - theta-bar)``, to each ``.grad``.

        Three fused in-place passes over the parameters into a buffer kept between steps, no allocation.
        Done as a gradient, not as a loss term: autograd of the quadratic builds and walks a graph of four
        element-wise ops per parameter and allocates their results, which made the penalty cost more than
        half of a small network's own step (scripts/benchmark.py measures what is left).

        The difference is taken first, in the factored form. The expanded form ``Omega * theta - Omega *
        theta-bar`` (one pass fewer) leaves the float32 round-off of ``Omega * theta`` where the true
        gradient is near zero, and Adam divides each parameter's gradient by its own running scale: that
        round-off became full-size steps of weights the penalty should hold still, and cost EWC 1.4 points
        of average accuracy on permuted Fashion-MNIST (docs/experiments.md).
        """
        params = self._param_list(pl_module)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        if self._diff is None:
            self._diff = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._diff, params)
        torch._foreach_sub_(self._diff, list(self._anchor.values()))
        torch._foreach_addcmul_(
            grads, list(self._importance.values()), self._diff, value=2.0 * self.coefficient * scale
        )

    def _param_list(self, pl_module: torch.nn.Module) -> list[Tensor]:
        """The module's parameters in the order of the state (cached: the same objects for the whole fit)."""
        if self._params is None or self._params[0] is not pl_module or len(self._params[1]) != len(self._anchor):
            named = dict(pl_module.named_parameters())
            missing = [n for n in self._anchor if n not in named]
            if missing:
                raise ValueError(f"{type(self).__name__} state names parameters the model does not have: {missing[:5]}")
            self._params = (pl_module, [named[n] for n in self._anchor])
            self._diff = None
        return self._params[1]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the fit: refuse strategies that shard or flatten parameters (the state is per parameter)."""
        refuse_sharded(self.name, trainer)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        """Once per optimizer step, on the final (accumulated, all-reduced, unscaled) gradients."""
        if self._num_consolidated == 0:
            return
        self.add_penalty_grad(pl_module)
        if log_now(trainer):
            pl_module.log(f"train/{self.name}_penalty", self.penalty_value(pl_module))  # type: ignore[arg-type]

    # ---- consolidation -----------------------------------------------------------------------------
    @torch.no_grad()
    def consolidate(self, importance: dict[str, Tensor], params: Mapping[str, Tensor]) -> None:
        """Fold one finished task's importance and anchor (``params``) into the state."""
        first = self._num_consolidated == 0
        if self.mode == "online" or first:
            const = torch.zeros((), device=next(iter(importance.values())).device)
            scale = self.decay if (self.mode == "online" and not first) else 0.0
            self._importance = {
                n: f + scale * self._importance[n] if not first else f.clone() for n, f in importance.items()
            }
            self._anchor = {n: params[n].detach().clone() for n in importance}
        else:  # separate: merge two quadratics into one, exactly
            const = self._const.clone()
            for n, f in importance.items():
                omega_old, mean_old, theta = self._importance[n], self._anchor[n], params[n].detach()
                omega = omega_old + f
                safe = omega.clamp_min(torch.finfo(omega.dtype).tiny)
                mean = torch.where(omega > 0, (omega_old * mean_old + f * theta) / safe, theta)
                # c gains the merged quadratic's minimum, omega_old*f/omega * (mean_old - theta)^2: the
                # same as omega_old*mean_old^2 + f*theta^2 - omega*mean^2, without its cancellation
                const += (omega_old * f / safe * (mean_old - theta).square()).sum()
                self._importance[n], self._anchor[n] = omega, mean
        self._const = const
        self._diff = None
        self._num_consolidated += 1
        self.last_importance = importance

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the strategy placed the model: move (restored) state to the model's device."""
        device = pl_module.device
        self._importance = {n: t.to(device) for n, t in self._importance.items()}
        self._anchor = {n: t.to(device) for n, t in self._anchor.items()}
        self._const = self._const.to(device)
        self._diff = None

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """Estimate the finished task's importance and consolidate (not after the last task: nothing is trained
        after it, so its importance would never be used)."""
        if last:
            return
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        importance = self.task_importance(trainer, module, task, params)
        self.consolidate(importance, params)
        module.log_event({f"{self.name}/importance_mean": torch.stack([f.mean() for f in importance.values()]).mean()})

    # ---- checkpointing -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        cpu = {"importance": self._importance, "anchor": self._anchor}
        return {
            **{k: {n: t.detach().cpu() for n, t in d.items()} for k, d in cpu.items()},
            "const": self._const.detach().cpu(),
            "num_consolidated": self._num_consolidated,
            "mode": self.mode,
            "decay": self.decay,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ResumeError(
                f"the checkpoint's {type(self).__name__} state is in mode {state_dict['mode']!r}, "
                f"this run uses {self.mode!r}"
            )
        self._importance = dict(state_dict["importance"])
        self._anchor = dict(state_dict["anchor"])
        self._const = state_dict["const"]
        self._num_consolidated = int(state_dict["num_consolidated"])
        self._diff = None


def task_sample(stream: TaskStream, task: int, num_samples: int | None) -> TaskData:
    """The finished task's training data to estimate importances on: all of it, or a seeded random subset."""
    data = stream.train_data(task)
    if num_samples is not None:
        data = data.subset(num_samples, generator(stream.seed, "importance_subset", task=task))
    return data


def check_strength(name: str, value: float) -> float:
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"method.{name} must be >= 0, got {value}")
    return float(value)


def all_reduce_mean(trainer: L.Trainer, sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """Sum ``sums`` and ``count`` over all ranks (one collective), then divide."""
    names = list(sums)
    device = sums[names[0]].device
    flat = torch.cat([*(sums[n].flatten() for n in names), torch.tensor([float(count)], device=device)])
    if trainer.world_size > 1:
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
    total = flat[-1]
    if total <= 0:
        raise ValueError("the importance was estimated on no samples (is the task's training data empty?)")
    out, offset = {}, 0
    for n in names:
        k = sums[n].numel()
        out[n] = (flat[offset : offset + k] / total).view_as(sums[n])
        offset += k
    return out
