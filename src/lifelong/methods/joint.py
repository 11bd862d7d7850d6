"""The joint-training baseline."""

from __future__ import annotations

from lifelong.methods.base import ContinualMethod


class Joint(ContinualMethod):
    """Joint (multitask) training: task ``t`` trains on the union of tasks ``0..t``.

    The upper bound that regularisation methods are measured against: nothing is forgotten because nothing
    is left behind. The last row of its accuracy matrix is the offline, all-tasks-at-once result, reached
    after the last task's epochs on the union (warm-started from the previous tasks). It only declares what
    it needs from the stream (`needs_cumulative_data`).
    """

    name = "joint"
    needs_cumulative_data = True
