"""What a stream tells the rest of lifelong as it runs: where each training step falls (`Step`), and what
the methods asked of its training data (`StreamNeeds`).

A task boundary is an event the stream's clock raises at a step, not something each part re-derives from the epoch
counter: [`lifelong.data.TaskStream.step`][lifelong.data.streams.TaskStream.step] says, for every training step, which
task it trains and whether it starts or ends that task. The fixed-epochs stream ends a task at the last step of its last
epoch; a stream whose tasks end elsewhere (inside an epoch: online, single-pass or blurry streams) overrides ``step``
and its training loader, and everything downstream - the module's evaluation, every method's ``on_task_start`` /
``on_task_end``
- follows it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lifelong.data.tensors import TaskData

# (stream, data, task, epoch_in_task) -> the samples this epoch trains on: DWA's curriculum, iCaRL's exemplars.
# The stream is the caller (a lifelong.data.TaskStream); not named here, which streams.py imports.
TrainingData = Callable[..., TaskData]


@dataclass(frozen=True)
class Step:
    """Where one training step falls in the stream.

    Attributes:
        task: the task this step trains (0-based).
        epoch_in_task: the epoch of that task this step belongs to (0-based; 0 for a stream without epochs).
        starts_task: the step is the task's first: ``on_task_start`` is raised before it.
        ends_task: the step is the task's last: ``on_task_end`` is raised after it, then the task is evaluated.
    """

    task: int
    epoch_in_task: int
    starts_task: bool
    ends_task: bool


@dataclass(frozen=True)
class StreamNeeds:
    """What the run's methods declared they need from the stream, resolved once at setup
    ([`lifelong.methods.base.stream_needs`][lifelong.methods.base.stream_needs]).

    Attributes:
        rows: training batches carry each sample's row
            (`lifelong.data.tensors.Batch.rows`).
        cumulative: task ``t`` trains on the union of tasks ``0..t`` (the joint baseline).
        training_data: the one method's choice of the samples each epoch trains on, or ``None``.
    """

    rows: bool = False
    cumulative: bool = False
    training_data: TrainingData | None = None
