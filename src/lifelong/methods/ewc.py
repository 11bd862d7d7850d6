"""Elastic Weight Consolidation as a Lightning Callback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lifelong.data.streams import stream_of
from lifelong.errors import ResumeError
from lifelong.methods.base import ContinualMethod, log_now
from lifelong.methods.fisher import FISHER_TYPES, fisher_sums

MODES = ("separate", "online")


class EWC(ContinualMethod):
    r"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) and online EWC (Schwarz et al., 2018).

    At the end of each task k it computes the diagonal Fisher :math:`F_k` of that task (per sample and
    exact, see :mod:`lifelong.methods.fisher`) and the anchor :math:`\theta^*_k` (the weights then). While
    training later tasks it adds to the loss

    .. math::  \frac{\lambda}{2} \sum_i \Omega_i (\theta_i - \bar\theta_i)^2 + \frac{\lambda}{2} c

    **Loss convention: the paper's** :math:`\lambda/2`. A lambda quoted for the form without the 1/2 (as in
    Hsu et al. 2018 or this project's DESIGN notes) is half of ours: their 30 is our 60.

    * ``mode="separate"`` (the paper): one penalty per past task, :math:`\sum_k F_k (\theta -
      \theta^*_k)^2`. That sum of quadratics is itself one quadratic, held exactly as
      :math:`\Omega = \sum_k F_k`, :math:`\bar\theta = \sum_k F_k \theta^*_k / \Omega` and the constant
      :math:`c = \sum_k F_k {\theta^*_k}^2 - \Omega \bar\theta^2` (which changes the value, not the
      gradient), so memory and per-step cost do not grow with the number of tasks.
    * ``mode="online"``: a running Fisher :math:`\Omega \leftarrow \gamma \Omega + F_k` and the latest
      anchor, :math:`\bar\theta = \theta^*_k` (``decay`` is :math:`\gamma`).

    Under DDP every rank sums the Fisher over its shard of the task, the sums and counts are all-reduced,
    and every rank holds the same state. Importances and anchors are saved through :meth:`state_dict`, so a
    checkpoint resumes them.

    Args:
        ewc_lambda: strength :math:`\lambda \geq 0`.
        fisher_type: ``"empirical"`` (true labels), ``"sampled"`` (labels drawn from the model) or
            ``"exact"`` (expectation over all classes).
        num_samples: samples of the finished task to estimate the Fisher on (random, seeded); ``None``
            for all.
        mode: ``"separate"`` or ``"online"``.
        decay: :math:`\gamma \in [0, 1]` of online mode (ignored in separate mode).
    """

    name = "ewc"

    def __init__(
        self,
        ewc_lambda: float = 60.0,
        fisher_type: str = "empirical",
        num_samples: int | None = None,
        mode: str = "separate",
        decay: float = 1.0,
    ) -> None:
        super().__init__()
        if not ewc_lambda >= 0:  # also refuses NaN
            raise ValueError(f"method.ewc_lambda must be >= 0, got {ewc_lambda}")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"method.fisher_type must be one of {list(FISHER_TYPES)}, got {fisher_type!r}")
        if mode not in MODES:
            raise ValueError(f"method.mode must be one of {list(MODES)}, got {mode!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"method.decay must be in [0, 1], got {decay}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"method.num_samples must be a positive number or null, got {num_samples}")
        self.ewc_lambda = float(ewc_lambda)
        self.fisher_type = fisher_type
        self.num_samples = num_samples
        self.mode = mode
        self.decay = float(decay)
        self._importance: dict[str, Tensor] = {}  # Omega
        self._anchor: dict[str, Tensor] = {}  # theta-bar
        self._const = torch.zeros(())  # c
        self._num_consolidated = 0
        self.last_fisher: dict[str, Tensor] = {}  # the latest task's Fisher, for inspection
        self._params: tuple[torch.nn.Module, list[Tensor]] | None = None  # in the state's order
        self._omega_anchor: list[Tensor] | None = None  # Omega * theta-bar, derived; reset when the state changes

    # ---- the penalty -------------------------------------------------------------------------------
    @torch.no_grad()
    def penalty_value(self, pl_module: torch.nn.Module) -> Tensor | None:
        """``lambda/2 * (sum_i Omega_i (theta_i - theta-bar_i)^2 + c)``; ``None`` before any task ended."""
        if self._num_consolidated == 0:
            return None
        params = self._param_list(pl_module)
        diffs = torch._foreach_sub(params, list(self._anchor.values()))
        total = self._const.clone()
        for omega, d in zip(self._importance.values(), diffs, strict=True):
            total += torch.dot((omega * d).flatten(), d.flatten())
        return 0.5 * self.ewc_lambda * total

    @torch.no_grad()
    def add_penalty_grad(self, pl_module: torch.nn.Module, scale: float = 1.0) -> None:
        """Add ``scale *`` the penalty's gradient, ``lambda * Omega * (theta - theta-bar)``, to each ``.grad``.

        Computed as ``lambda * (Omega * theta - (Omega * theta-bar))`` with ``Omega * theta-bar`` kept from
        the last consolidation: two fused in-place passes over the parameters and no allocation. (Near the
        anchor this differs from the factored form by float32 round-off of ``Omega * theta``, far below
        the gradient noise of a mini-batch.) Done as a gradient, not as a loss term: autograd of the
        quadratic builds and walks a graph of four element-wise ops per parameter and allocates their
        results, which made the penalty cost more than half of a small network's own step
        (scripts/benchmark.py measures what is left).
        """
        params = self._param_list(pl_module)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        if self._omega_anchor is None:
            self._omega_anchor = list(torch._foreach_mul(list(self._importance.values()), list(self._anchor.values())))
        step = self.ewc_lambda * scale
        torch._foreach_addcmul_(grads, list(self._importance.values()), params, value=step)
        torch._foreach_add_(grads, self._omega_anchor, alpha=-step)

    def _param_list(self, pl_module: torch.nn.Module) -> list[Tensor]:
        """The module's parameters in the order of the state (cached: the same objects for the whole fit)."""
        if self._params is None or self._params[0] is not pl_module or len(self._params[1]) != len(self._anchor):
            named = dict(pl_module.named_parameters())
            missing = [n for n in self._anchor if n not in named]
            if missing:
                raise ValueError(f"EWC state names parameters the model does not have: {missing[:5]}")
            self._params = (pl_module, [named[n] for n in self._anchor])
        return self._params[1]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the fit: refuse strategies that shard or flatten parameters (the state is per parameter)."""
        name = type(trainer.strategy).__name__
        if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(f"EWC does not support the {name} strategy (it shards parameters); use ddp")

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After each backward pass (grads already all-reduced under DDP): add the penalty's gradient."""
        if self._num_consolidated == 0:
            return
        # the loss of each micro-batch is divided by accumulate_grad_batches, and under fp16 AMP gradients are
        # still multiplied by the loss scale here: scale the penalty's gradient the same way
        scale = 1.0 / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scale *= float(scaler.get_scale())
        self.add_penalty_grad(pl_module, scale)
        if log_now(trainer):
            pl_module.log("train/ewc_penalty", self.penalty_value(pl_module))  # type: ignore[arg-type]

    # ---- consolidation -----------------------------------------------------------------------------
    @torch.no_grad()
    def consolidate(self, fisher: dict[str, Tensor], params: Mapping[str, Tensor]) -> None:
        """Fold one finished task's Fisher and anchor (``params``) into the state."""
        first = self._num_consolidated == 0
        if self.mode == "online" or first:
            const = torch.zeros((), device=next(iter(fisher.values())).device)
            scale = self.decay if (self.mode == "online" and not first) else 0.0
            self._importance = {
                n: f + scale * self._importance[n] if not first else f.clone() for n, f in fisher.items()
            }
            self._anchor = {n: params[n].detach().clone() for n in fisher}
        else:  # separate: merge two quadratics into one, exactly
            const = self._const.clone()
            for n, f in fisher.items():
                omega_old, mean_old, theta = self._importance[n], self._anchor[n], params[n].detach()
                omega = omega_old + f
                safe = omega.clamp_min(torch.finfo(omega.dtype).tiny)
                mean = torch.where(omega > 0, (omega_old * mean_old + f * theta) / safe, theta)
                # c gains the merged quadratic's minimum, omega_old*f/omega * (mean_old - theta)^2: the
                # same as omega_old*mean_old^2 + f*theta^2 - omega*mean^2, without its cancellation
                const += (omega_old * f / safe * (mean_old - theta).square()).sum()
                self._importance[n], self._anchor[n] = omega, mean
        self._const = const
        self._omega_anchor = None
        self._num_consolidated += 1
        self.last_fisher = fisher

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the strategy placed the model: move (restored) state to the model's device."""
        device = pl_module.device
        self._importance = {n: t.to(device) for n, t in self._importance.items()}
        self._anchor = {n: t.to(device) for n, t in self._anchor.items()}
        self._const = self._const.to(device)
        self._omega_anchor = None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At a task boundary (not after the last task): estimate the Fisher and consolidate."""
        dm = stream_of(trainer)
        epoch = trainer.current_epoch
        if not dm.is_task_end(epoch):
            return
        task = dm.task_of_epoch(epoch)
        if task == dm.num_tasks - 1:
            return  # nothing is trained after the last task: its Fisher would never be used
        data = dm.train_data(task)
        if self.num_samples is not None:
            data = data.subset(self.num_samples, torch.Generator().manual_seed(dm.seed * 7919 + task))
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        generator = torch.Generator().manual_seed(dm.seed * 104_729 + task + trainer.global_rank)
        sums = fisher_sums(
            pl_module, dm.loader(data, train=False), self.fisher_type, params=params, generator=generator
        )
        fisher = _all_reduce_mean(trainer, sums.sums, sums.count)
        self.consolidate(fisher, params)
        pl_module.log("ewc/fisher_mean", torch.stack([f.mean() for f in fisher.values()]).mean(), sync_dist=True)

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
                f"the checkpoint's EWC state is in mode {state_dict['mode']!r}, this run uses {self.mode!r}"
            )
        self._importance = dict(state_dict["importance"])
        self._anchor = dict(state_dict["anchor"])
        self._const = state_dict["const"]
        self._num_consolidated = int(state_dict["num_consolidated"])
        self._omega_anchor = None


def _all_reduce_mean(trainer: L.Trainer, sums: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """Sum ``sums`` and ``count`` over all ranks (one collective), then divide."""
    names = list(sums)
    device = sums[names[0]].device
    flat = torch.cat([*(sums[n].flatten() for n in names), torch.tensor([float(count)], device=device)])
    if trainer.world_size > 1:
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
    total = flat[-1]
    if total <= 0:
        raise ValueError("the Fisher was estimated on no samples (is the task's training data empty?)")
    out, offset = {}, 0
    for n in names:
        k = sums[n].numel()
        out[n] = (flat[offset : offset + k] / total).view_as(sums[n])
        offset += k
    return out
