"""Synaptic Intelligence (Zenke et al., 2017): importance from each parameter's contribution to the loss drop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lifelong.data.tensors import TaskData
from lifelong.methods.base import ContinualModule
from lifelong.methods.quadratic import QuadraticRegularizer, check_strength


class SI(QuadraticRegularizer):
    r"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017).

    While a task trains, every optimizer step adds to a running path integral the parameter's share of the
    drop in the task's loss, $\omega_i \mathrel{-}= g_i \, \Delta\theta_i$, with $g$ the gradient
    of the task's loss alone (before any penalty is added) and $\Delta\theta$ the step the optimizer
    took. At the task's end the importance is

    $$
    F_i = \frac{\max(\omega_i, 0)}{(\theta_i^{end} - \theta_i^{start})^2 + \xi}
    $$

    (negative contributions, steps along which the loss rose, are clipped at 0 so the quadratic stays
    convex). As in the paper importances add up over tasks around the latest anchor (``mode="online"``,
    ``decay=1``), with the loss $L(\theta) + c \sum_i \Omega_i (\theta_i - \theta^*_i)^2$ (no 1/2).

    Under DDP the gradients seen here are already all-reduced and the weights are the same on every rank,
    so every rank integrates the same path. The running integral is in the state, so a checkpoint taken
    inside a task resumes it.

    Args:
        si_c: strength $c \geq 0$.
        xi: damping $\xi > 0$.
        mode: ``"online"`` (the paper) or ``"separate"``.
        decay: online mode's $\gamma$.
    """

    name = "si"

    def __init__(
        self, si_c: float = 1.0, xi: float = 1e-3, mode: str = "online", decay: float = 1.0, **trigger: Any
    ) -> None:
        super().__init__(mode=mode, decay=decay, **trigger)
        if not xi > 0:
            raise ValueError(f"method.xi must be > 0, got {xi}")
        self.si_c = check_strength("si_c", si_c)
        self.xi = float(xi)
        self._omega: list[Tensor] = []  # running path integral, one tensor per parameter
        self._start: list[Tensor] = []  # the weights at the task's start
        self._before: list[Tensor] = []  # the weights before the current step
        self._grad: list[Tensor] = []  # the current step's gradient of the task's loss
        self._stepped = False
        self._tracked: list[Tensor] = []  # the parameters, in the order of the lists above
        self._tracked_names: list[str] = []

    @property
    def coefficient(self) -> float:
        return self.si_c

    # ---- the path integral (also usable without a Trainer) -------------------------------------------
    @torch.no_grad()
    def begin_task(self, params: Mapping[str, Tensor]) -> None:
        """Start integrating a task's path at the current weights."""
        self._tracked_names = list(params)
        self._tracked = list(params.values())
        self._omega = [torch.zeros_like(p) for p in self._tracked]
        self._start = [p.detach().clone() for p in self._tracked]
        self._before = [p.detach().clone() for p in self._tracked]
        self._grad = [torch.zeros_like(p) for p in self._tracked]

    @torch.no_grad()
    def record_gradient(self) -> None:
        """Before the optimizer step: keep the task loss's gradient (and nothing any penalty adds)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._tracked]
        torch._foreach_copy_(self._grad, grads)
        self._stepped = True

    @torch.no_grad()
    def record_step(self) -> None:
        """After the optimizer step: ``omega -= g * (theta - theta_before)``; ``theta_before = theta``."""
        if not self._stepped:
            return
        self._stepped = False
        delta = torch._foreach_sub(self._before, self._tracked)  # -(step)
        torch._foreach_addcmul_(self._omega, self._grad, delta)
        torch._foreach_copy_(self._before, self._tracked)

    @torch.no_grad()
    def path_importance(self) -> dict[str, Tensor]:
        """``max(omega, 0) / (total displacement**2 + xi)`` of the task integrated so far."""
        out = {}
        for name, omega, start, p in zip(self._tracked_names, self._omega, self._start, self._tracked, strict=True):
            out[name] = omega.clamp_min(0) / ((p.detach() - start).square() + self.xi)
        return out

    # ---- Lightning hooks ---------------------------------------------------------------------------
    @override
    def on_task_start(self, trainer: L.Trainer, module: ContinualModule, task: int) -> None:
        self.begin_task({n: p for n, p in module.named_parameters() if p.requires_grad})

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed inside a task goes on with the integral its checkpoint holds, on the model's device."""
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self._omega:
            self._rebind(params)
        elif self.trigger.task_free:  # no task start will come: the integral starts with the stream
            self.begin_task(params)

    def _rebind(self, params: Mapping[str, Tensor]) -> None:
        device = next(iter(params.values())).device
        self._tracked_names, self._tracked = list(params), list(params.values())
        for buf in ("_omega", "_start", "_before", "_grad"):
            setattr(self, buf, [t.to(device) for t in getattr(self, buf)])

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        self.record_gradient()  # before the penalty's gradient is added
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record_step()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # a task-free trigger

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        super().on_task_end(trainer, module, task, last)  # consolidates
        self._omega = []  # the next task starts a new integral

    def importance_on(
        self, trainer: L.Trainer, module: ContinualModule, data: TaskData, params: Mapping[str, Tensor], key: int
    ) -> dict[str, Tensor]:
        return self.path_importance()  # integrated along the training path: no data

    @override
    def after_consolidation(self, params: Mapping[str, Tensor]) -> None:
        self._omega = []  # a new integral from here
        self.begin_task(dict(params))

    # ---- checkpointing -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        path = {k: [t.detach().cpu() for t in getattr(self, f"_{k}")] for k in ("omega", "start", "before")}
        return {**super().state_dict(), "path": path}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        path = state_dict.get("path", {})
        if path.get("omega"):
            self._omega, self._start, self._before = (list(path[k]) for k in ("omega", "start", "before"))
            self._grad = [torch.zeros_like(t) for t in self._omega]
