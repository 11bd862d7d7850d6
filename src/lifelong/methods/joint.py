"""The joint-training baseline."""

from __future__ import annotations

import lightning as L
from typing_extensions import override

from lifelong.data.streams import stream_of
from lifelong.methods.base import ContinualMethod


class Joint(ContinualMethod):
    """Joint (multitask) training: task ``t`` trains on the union of tasks ``0..t``.

    The upper bound that regularisation methods are measured against: nothing is forgotten because nothing
    is left behind. The last row of its accuracy matrix is the offline, all-tasks-at-once result, reached
    after ``epochs_per_task`` epochs on the union (warm-started from the previous tasks).
    """

    name = "joint"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the fit: switch the stream to cumulative training data."""
        stream_of(trainer).cumulative = True
