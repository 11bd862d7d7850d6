"""The checks of a stream's constructor arguments: each bad value gets a message naming its ``dataset.`` key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_arguments(
    stream: str,
    scenarios: Sequence[str],
    scenario: str,
    *,
    num_tasks: int,
    epochs_per_task: int,
    batch_size: int,
    eval_batch_size: int,
    max_train_samples: int | None,
    max_test_samples: int | None,
    standardize: Any,
    val_fraction: Any,
    online: bool,
    task_sizes: Sequence[int] | None,
) -> None:
    """Raise ``ValueError`` for the first argument of a `TaskStream` (``stream``, its class name) out of range."""
    if scenario not in scenarios:
        raise ValueError(f"dataset.scenario must be one of {list(scenarios)} for {stream}, got {scenario!r}")
    for name, value in (
        ("num_tasks", num_tasks),
        ("epochs_per_task", epochs_per_task),
        ("batch_size", batch_size),
        ("eval_batch_size", eval_batch_size),
    ):
        if int(value) < 1:
            raise ValueError(f"dataset.{name} must be at least 1, got {value}")
    for name, limit in (("max_train_samples", max_train_samples), ("max_test_samples", max_test_samples)):
        if limit is not None and int(limit) < 1:
            raise ValueError(f"dataset.{name} must be a positive number or null, got {limit}")
    if not isinstance(standardize, bool):
        raise ValueError(f"dataset.standardize must be true or false, got {standardize!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(
            f"dataset.val_fraction must be a number in [0, 1) (the share of each task's training data held "
            f"out for validation; 0 for none), got {val_fraction!r}"
        )
    if online and int(epochs_per_task) != 1:
        raise ValueError(
            f"dataset.online=true sees every sample once: epochs_per_task must be 1, got {epochs_per_task}"
        )
    if task_sizes is not None and (len(task_sizes) != num_tasks or min(int(n) for n in task_sizes) < 1):
        raise ValueError(
            f"dataset.task_sizes must give {num_tasks} positive sample counts, one a task, got {list(task_sizes)}"
        )
