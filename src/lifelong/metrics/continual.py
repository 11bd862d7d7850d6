"""Summary metrics of an accuracy matrix.

``R[i, j]`` is the test accuracy on task j after training task i (fractions in [0, 1]), ``T`` tasks.

* average accuracy (ACC): the mean of the last row, ``1/T sum_j R[T-1, j]``;
* backward transfer (BWT, Lopez-Paz & Ranzato, 2017): ``1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])``;
  negative when learning later tasks hurts earlier ones;
* forgetting (Chaudhry et al., 2018): ``1/(T-1) sum_{j<T-1} max_{l<T-1} (R[l, j]) - R[T-1, j]``, the drop
  from each task's best accuracy before the end;
* forward transfer (FWT, Lopez-Paz & Ranzato, 2017): ``1/(T-1) sum_{j>0} (R[j-1, j] - b[j])``, how much
  better than the untrained network ``b`` (its accuracy on task j before any training) the network does on
  each task just before training it;
* learning accuracy (LA, Riemer et al., 2019): ``1/T sum_j R[j, j]``, how well each task is learnt when it
  is learnt (plasticity, beside BWT's stability).

BWT, forgetting and FWT need two tasks or more; with one they are ``None``. A partial matrix (the first
``k`` rows of a stream stopped early) counts the ``k`` tasks trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Matrix = Sequence[Sequence[float]] | torch.Tensor
# the summary of a run, in metrics.json, the loggers (test/<key>, val/<key>) and a sweep's table
SUMMARY_KEYS = ("avg_accuracy", "bwt", "forgetting", "fwt", "learning_accuracy")


def _as_matrix(accuracy: Matrix) -> torch.Tensor:
    r = torch.as_tensor(accuracy, dtype=torch.float64)
    if r.ndim != 2 or r.shape[0] > r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"an accuracy matrix has rows <= columns, got shape {tuple(r.shape)}")
    return r


def average_accuracy(accuracy: Matrix) -> float:
    """Mean accuracy over all tasks after the last trained task (the last row)."""
    return _as_matrix(accuracy)[-1].mean().item()


def backward_transfer(accuracy: Matrix) -> float | None:
    """Mean change of each earlier task's accuracy from just after it was learned to the end."""
    r = _as_matrix(accuracy)
    t = r.shape[0]
    if t < 2:
        return None
    return (r[-1, : t - 1] - r.diagonal()[: t - 1]).mean().item()


def forgetting(accuracy: Matrix) -> float | None:
    """Mean drop of each earlier task from its best accuracy (before the last row) to the last row."""
    r = _as_matrix(accuracy)
    t = r.shape[0]
    if t < 2:
        return None
    best = torch.stack([r[j : t - 1, j].max() for j in range(t - 1)])
    return (best - r[-1, : t - 1]).mean().item()


def forward_transfer(accuracy: Matrix, initial: Sequence[float] | torch.Tensor) -> float | None:
    """Mean gain on each task, just before training it, over the untrained network's accuracy ``initial``."""
    r = _as_matrix(accuracy)
    b = torch.as_tensor(initial, dtype=torch.float64)
    t = r.shape[0]
    if b.shape != (r.shape[1],):
        raise ValueError(f"initial accuracy needs one value per task ({r.shape[1]}), got shape {tuple(b.shape)}")
    if t < 2 or b.isnan().any():
        return None
    before = torch.stack([r[j - 1, j] for j in range(1, t)])
    return (before - b[1:t]).mean().item()


def learning_accuracy(accuracy: Matrix) -> float:
    """Mean accuracy on each task right after training it (the diagonal)."""
    r = _as_matrix(accuracy)
    return r.diagonal()[: r.shape[0]].mean().item()


def summarize(accuracy: Matrix, initial: Sequence[float] | torch.Tensor | None = None) -> dict[str, float | None]:
    """ACC, BWT, forgetting, learning accuracy and, given the untrained network's accuracies, FWT."""
    return {
        "avg_accuracy": average_accuracy(accuracy),
        "bwt": backward_transfer(accuracy),
        "forgetting": forgetting(accuracy),
        "fwt": forward_transfer(accuracy, initial) if initial is not None else None,
        "learning_accuracy": learning_accuracy(accuracy),
    }
