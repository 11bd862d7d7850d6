"""Learning without Forgetting (Li & Hoiem, 2016): distillation from the previous model's outputs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lifelong.data.tensors import Batch
from lifelong.methods.base import ContinualMethod, ContinualModule, frozen_copy, module_of
from lifelong.methods.fisher import call_model


def distillation(new: Tensor, old: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(old / T) || softmax(new / T))``, averaged over the batch; ``(B, K)`` logits each.

    The same gradient as Li & Hoiem's cross-entropy with the softened old outputs as targets (they differ by
    the old outputs' entropy, a constant), and 0 when the new outputs equal the old.
    """
    log_new = F.log_softmax(new.float() / temperature, dim=-1)
    log_old = F.log_softmax(old.float() / temperature, dim=-1)
    return F.kl_div(log_new, log_old, log_target=True, reduction="batchmean")


class LwF(ContinualMethod):
    r"""Learning without Forgetting (Li & Hoiem, 2016).

    At the end of each task (but the last) a frozen copy of the network is kept. While later tasks train,
    the loss gains $\alpha \sum_h \mathrm{KL}(\sigma(o_h/T) \,\|\, \sigma(\hat o_h/T))$ on the current
    batch, where $o_h$ are the old network's outputs of head $h$ and $\hat o_h$ the new
    network's: in the task scenario one term per earlier task's head (the paper's multi-head setting), in
    the class scenario one term over all classes seen before the current task, in the domain scenario one
    over the shared head. The paper's defaults: $T = 2$, $\alpha = 1$ (no $T^2$ factor).

    No data of earlier tasks is stored: the old network's outputs on the new task's inputs stand in for it.
    Under DDP every rank copies the same weights, so the old network is the same everywhere. The old
    network's weights are in `state_dict`.

    Args:
        lwf_alpha: weight $\alpha \geq 0$ of the distillation term.
        temperature: $T > 0$.
    """

    name = "lwf"

    def __init__(self, lwf_alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__()
        if not lwf_alpha >= 0:
            raise ValueError(f"method.lwf_alpha must be >= 0, got {lwf_alpha}")
        if not temperature > 0:
            raise ValueError(f"method.temperature must be > 0, got {temperature}")
        self.lwf_alpha = float(lwf_alpha)
        self.temperature = float(temperature)
        self.old_tasks = 0  # tasks the old network has learnt (0: no old network yet)
        self._old: nn.Module | None = None
        self._old_state: dict[str, Tensor] | None = None  # restored from a checkpoint, loaded at fit start
        self._heads: list[slice] = []  # the output ranges distilled, fixed while one old network is in use

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._old_state is not None:
            module = module_of(pl_module)
            self._old = frozen_copy(module.net)
            self._old.load_state_dict(self._old_state)
            self._old_state = None
            self._heads = self._old_heads(module)

    @override
    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task: int, last: bool) -> None:
        if not last:
            self.snapshot(module, task + 1)

    def snapshot(self, module: ContinualModule, tasks: int) -> None:
        """Keep a frozen copy of ``module``'s network as the old network, which has learnt ``tasks`` tasks."""
        self._old = frozen_copy(module.net)
        self.old_tasks = tasks
        self._heads = self._old_heads(module)

    @override
    def penalty(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        if self._old is None or self.lwf_alpha == 0:
            return None
        x, task = batch.x, batch.task
        with torch.no_grad():
            old = call_model(self._old, x, task)
        loss = sum(distillation(outputs[:, h], old[:, h], self.temperature) for h in self._heads)
        return self.lwf_alpha * loss  # type: ignore[return-value]

    def _old_heads(self, module: ContinualModule) -> list[slice]:
        """The output ranges distilled: each earlier task's head (task scenario), the classes seen before
        the current task (class), or the shared head (domain). Slices, computed once per old network: no
        index tensor or check in the training step."""
        if module.scenario == "task":
            heads = module.task_classes[: self.old_tasks]
            if any(c != list(range(c[0], c[-1] + 1)) for c in heads):
                raise ValueError("LwF needs each task's outputs to be one contiguous range (as every stream gives)")
            return [slice(c[0], c[-1] + 1) for c in heads]
        if module.scenario == "class":
            return [slice(0, module.seen_outputs[self.old_tasks - 1])]
        return [slice(None)]

    @override
    def state_dict(self) -> dict[str, Any]:
        old = {k: v.detach().cpu() for k, v in self._old.state_dict().items()} if self._old is not None else None
        return {"old_tasks": self.old_tasks, "old_network": old}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.old_tasks = int(state_dict.get("old_tasks", 0))
        self._old_state = state_dict.get("old_network")
