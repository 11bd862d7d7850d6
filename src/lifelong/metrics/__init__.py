"""Accuracy-matrix metrics and plots."""

from lifelong.metrics.continual import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    learning_accuracy,
    summarize,
)

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "learning_accuracy",
    "summarize",
]
