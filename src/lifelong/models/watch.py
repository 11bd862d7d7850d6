"""Watching the training loss for NaN without a host sync per step."""

from __future__ import annotations

import torch
from torch import Tensor


class LossWatch:
    """Where the training loss first became NaN or infinite, noted on the loss's device with no host sync.

    On a CPU the module checks every step's loss before the step (free there); on an accelerator that check
    would wait for the device at every step, so each step only records, on the device, the first non-finite
    loss with its batch and step, and `found` (one sync) is read at steps that sync anyway (the log
    steps), before each task's evaluation and at each epoch end: a NaN never reaches a checkpoint.
    """

    def __init__(self) -> None:
        self._noted: tuple[Tensor, Tensor, Tensor] | None = None  # loss, batch, step; batch -1 while all finite

    def note(self, loss: Tensor, batch_idx: int, step: int) -> None:
        loss = loss.detach().float()
        if self._noted is None or self._noted[0].device != loss.device:
            none = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._noted = (torch.zeros((), device=loss.device), none, none.clone())
        value, batch, at = self._noted
        new = torch.isfinite(loss).logical_not() & (batch < 0)  # (), on the device; Python numbers need no copy
        self._noted = (torch.where(new, loss, value), torch.where(new, batch_idx, batch), torch.where(new, step, at))

    def found(self) -> tuple[float, int, int] | None:
        """``(loss, batch, step)`` of the first non-finite loss noted, or ``None`` (reads the device once)."""
        if self._noted is None:
            return None
        value, batch, step = self._noted
        first, at = torch.stack([batch, step]).tolist()
        return None if first < 0 else (float(value), int(first), int(at))
