r"""Methods whose penalty is a quadratic around past weights: EWC, online EWC, L2, SI and MAS.

They differ only in the importance $\Omega$ of each parameter, estimated at every task boundary (the
Fisher for EWC, ones for L2, the path integral for SI, output sensitivities for MAS); the quadratic, its
merging over tasks, its gradient and its state are shared here.
"""

from __future__ import annotations

import logging
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
from lifelong.methods.base import ContinualMethod, ContinualModule, log_now, module_of, refuse_sharded
from lifelong.methods.trigger import ConsolidationTrigger
from lifelong.seeding import generator

MODES = ("separate", "online")
log = logging.getLogger(__name__)


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

    Task-free (``consolidate="every"`` or ``"plateau"``, [`lifelong.methods.trigger`][lifelong.methods.trigger]): the
    method consolidates when its trigger fires - every ``consolidate_every`` steps, or on a loss plateau (Aljundi et
    al., 2019) - on the most recent ``recent_samples`` training samples, and takes no task event (it runs with
    ``boundaries=hidden``). Each consolidation is logged (``<name>/consolidations``, and a line in the run's log) and
    kept in the state (``trigger.fired``: its step and why).

    Args:
        mode: ``"separate"`` or ``"online"``.
        decay: $\gamma \in [0, 1]$ of online mode (ignored in separate mode).
        consolidate: ``"task_end"`` (the default), ``"every"`` or ``"plateau"``.
        consolidate_every: ``"every"``: steps between consolidations.
        plateau_steps: ``"plateau"``: the steps averaged into one loss observation.
        plateau_window: ``"plateau"``: the observations in the window.
        plateau_mean: ``"plateau"``: the threshold of the window's mean loss.
        plateau_var: ``"plateau"``: the threshold of its variance.
        recent_samples: task-free: the most recent training samples the importance is estimated on
            (`lifelong.methods.trigger.ConsolidationTrigger`).
    """

    name = "quadratic"

    def __init__(
        self,
        mode: str = "separate",
        decay: float = 1.0,
        consolidate: str = "task_end",
        consolidate_every: int = 1000,
        plateau_steps: int = 10,
        plateau_window: int = 5,
        plateau_mean: float = 0.2,
        plateau_var: float = 0.1,
        recent_samples: int = 1000,
    ) -> None:
        super().__init__()
        self.trigger = ConsolidationTrigger(
            consolidate, consolidate_every, plateau_steps, plateau_window, plateau_mean, plateau_var, recent_samples
        )
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

    @property
    def needs_boundaries(self) -> bool:
        return not self.trigger.task_free

    @property
    def needs_rows(self) -> bool:  # type: ignore[override]
        return self.trigger.task_free  # the recent samples are remembered by their rows

    def task_importance(
        self, trainer: L.Trainer, module: ContinualModule, task: int, params: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The importance of each of ``params`` for the finished ``task`` (the same on every rank): on its training
        data (or ``num_samples`` of it)."""
        data = task_sample(module.stream, task, getattr(self, "num_samples", None))
        return self.importance_on(trainer, module, data, params, key=task)

    def importance_on(
        self, trainer: L.Trainer, module: ContinualModule, data: TaskData, params: Mapping[str, Tensor], key: int
    ) -> dict[str, Tensor]:
        """The importance of each of ``params`` estimated on ``data`` (every rank's shard of it, all-reduced);
        ``key`` numbers the estimate (the seed of its random draws)."""
        raise NotImplementedError

    # ---- the penalty -------------------------------------------------------------------------------
    @torch.no_grad()
    def penalty_value(self, pl_module: torch.nn.Module) -> Tensor | None:
        """``coefficient * (sum_i Omega_i (theta_i - theta-bar_i)^2 + c)``; ``None`` before any task ended."""
        if self._num_consolidated == 0:
            return None
        params = self._param_list(pl_module)
        diffs = torch._foreach_sub(params, list(self._anchor.values())) if params else []
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
        if not params:  # every parameter is another structure's (EWC's Kronecker factors)
            return
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
            const = torch.zeros((), device=next(iter(importance.values())).device if importance else self._const.device)
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
        self.trigger.to(device)

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        """Estimate the finished task's importance and consolidate (not after the last task: nothing is trained
        after it, so its importance would never be used); a task-free trigger ignores task ends."""
        if last or self.trigger.task_free:
            return
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        importance = self.task_importance(trainer, module, task, params)
        self.consolidate(importance, params)
        module.log_event({f"{self.name}/importance_mean": self.importance_mean(importance)})

    def importance_mean(self, importance: Mapping[str, Tensor]) -> Tensor:
        """What the log shows of a task's importance: the mean over parameters of each one's mean."""
        return torch.stack([f.mean() for f in importance.values()]).mean()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Task-free: show the step to the trigger, and consolidate when it fires."""
        if not self.trigger.task_free:
            return
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        why = self.trigger.observe(trainer, batch.rows, batch.task, loss)
        if why is None:
            return
        module = module_of(pl_module)
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        data = self.trigger.recent(trainer, pl_module, module.stream)
        importance = self.importance_on(trainer, module, data, params, key=self._num_consolidated)
        self.consolidate(importance, params)
        self.after_consolidation(params)
        self.trigger.fired.append({"step": trainer.global_step, "why": why})
        module.log_event({f"{self.name}/consolidations": float(self._num_consolidated)})
        if trainer.is_global_zero:
            log.info(f"{self.name}: consolidated at step {trainer.global_step}: {why}")

    def after_consolidation(self, params: Mapping[str, Tensor]) -> None:
        """After a task-free consolidation (SI starts a new path integral here)."""

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
            **({"trigger": self.trigger.state_dict()} if self.trigger.task_free else {}),
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
        if "trigger" in state_dict:
            self.trigger.load_state_dict(state_dict["trigger"])


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
