"""ER-ACE (Caccia et al., ICLR 2022): experience replay with an asymmetric cross-entropy on the incoming batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lifelong.data.tensors import Batch
from lifelong.methods.base import ContinualModule, gathered
from lifelong.methods.der import DarkExperienceReplay


class ERACE(DarkExperienceReplay):
    """ER-ACE, task-free: a reservoir memory of the stream (every batch offered after its step), a replayed batch
    with the plain cross-entropy in every step, and, on the incoming batch, the cross-entropy over only the classes
    present in that batch and the classes not seen yet - so new classes do not push the logits of the old ones down
    (the "asymmetric" update that keeps old classes' representations from drifting at a task's start).

    As the official code (``pclucas14/AML``, ``methods/er_ace.py``) computes it: ``seen`` is every class of the
    stream so far, this batch's included; the incoming loss masks every output but this batch's classes and those
    from the highest seen one on. It never uses a task boundary. Under DDP each rank masks by its own batch's
    classes; the classes seen are gathered from every rank after each step, so they are the same on all of them
    (and in a checkpoint).

    Args:
        buffer_size: samples held in memory (the paper's sweeps give it per class: 20, 50 or 100 times the classes).
        replay_batch_size: samples replayed per step; ``None`` for the stream's batch size (the paper: 10 and 10).
    """

    name = "er_ace"

    def __init__(self, buffer_size: int = 500, replay_batch_size: int | None = None) -> None:
        super().__init__(buffer_size, alpha=0.0, beta=1.0, replay_batch_size=replay_batch_size)
        self.name = "er_ace"
        self._seen: Tensor | None = None  # (C,) bool on the training device: the classes the stream has shown

    def _seen_of(self, width: int, device: torch.device) -> Tensor:
        if self._seen is None or self._seen.shape[0] < width or self._seen.device != device:
            seen = torch.zeros(width, dtype=torch.bool, device=device)
            if self._seen is not None:
                seen[: self._seen.shape[0]] = self._seen.to(device)
            self._seen = seen
        return self._seen

    @override
    def classification_loss(self, module: ContinualModule, batch: Batch, outputs: Tensor) -> Tensor | None:
        logits = module.heads(outputs, batch.task)
        width = logits.shape[1]
        present = torch.zeros(width, dtype=torch.bool, device=logits.device).index_fill_(0, batch.y, True)
        seen = self._seen_of(width, logits.device)[:width] | present
        index = torch.arange(width, device=logits.device)
        highest = torch.where(seen, index, 0).max()  # on the device: no sync
        allowed = present | (index >= highest)
        return F.cross_entropy(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min), batch.y)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        (y,) = gathered(trainer, pl_module, batch.y)  # every rank's classes
        if self._seen is not None:  # allocated by this step's loss, as wide as the logits
            self._seen.index_fill_(0, y, True)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen": None if self._seen is None else self._seen.cpu()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._seen = state_dict.get("seen")
