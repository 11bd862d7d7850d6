"""Metrics of a continual-evaluation curve: accuracy measured every few training steps, not only at task ends.

De Lange, van de Ven & Tuytelaars (ICLR 2023) showed that a task's accuracy collapses right after the next task
starts and then recovers - the *stability gap*, which evaluation at task ends never sees. Their metrics, as their
code computes them (``Mattdl/ContinualEvaluation``, ``src/eval/continual_eval_metrics.py``):

* **min-ACC**: for each earlier task ``i``, the minimum of its accuracy over every evaluation made while it is no
  longer the task being trained (from the first evaluation after its last step on), averaged over those tasks.
* **WC-ACC** (worst-case accuracy): ``1/k A(current) + (1 - 1/k) min-ACC`` at the last evaluation, ``k`` the number
  of tasks trained: the mean of the current task's accuracy and each earlier task's minimum.
* **WF^w** (windowed forgetting): per task, the largest drop ``A_a - A_b`` between two of its evaluations ``a``
  before ``b`` at most ``w - 1`` evaluations apart (within a sliding window of ``w``), the maximum over the run,
  at least 0; averaged over the tasks evaluated. **WP^w** (windowed plasticity) is the same with the largest rise.

The curve is ``accuracy`` ``(N, T)``: row ``n`` is the ``n``-th evaluation, column ``j`` task ``j``'s accuracy in
[0, 1], NaN where task ``j`` was not evaluated (not yet seen); ``trained`` ``(N,)`` is the task being trained at
each evaluation (0-based). A metric without the evaluations it needs (min-ACC before a second task) is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

WINDOWS = (10, 100)  # the windows De Lange et al.'s code logs WF and WP for
# the curve's summary in metrics.json and a sweep's table
STABILITY_KEYS = ("min_acc", "wc_acc", *(f"wf{w}" for w in WINDOWS))

Curve = Sequence[Sequence[float]] | torch.Tensor


def _curve(accuracy: Curve, trained: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.as_tensor(accuracy, dtype=torch.float64)
    k = torch.as_tensor(trained, dtype=torch.long)
    if a.ndim != 2 or k.shape != (a.shape[0],):
        raise ValueError(
            f"a curve is (N, T) accuracies with one trained task per row, got {tuple(a.shape)} and {tuple(k.shape)}"
        )
    return a, k


def min_accuracy_per_task(accuracy: Curve, trained: Sequence[int] | torch.Tensor) -> list[float | None]:
    """Each task's minimum accuracy over the evaluations after it stopped being trained (``None`` for a task with
    none: the current one, or one never trained)."""
    a, k = _curve(accuracy, trained)
    out: list[float | None] = []
    for j in range(a.shape[1]):
        after = a[(k > j) & ~a[:, j].isnan(), j]
        out.append(after.min().item() if len(after) else None)
    return out


def min_accuracy(accuracy: Curve, trained: Sequence[int] | torch.Tensor) -> float | None:
    """min-ACC: the mean over earlier tasks of their minimum accuracy once no longer trained."""
    mins = [m for m in min_accuracy_per_task(accuracy, trained) if m is not None]
    return sum(mins) / len(mins) if mins else None


def worst_case_accuracy(accuracy: Curve, trained: Sequence[int] | torch.Tensor) -> float | None:
    """WC-ACC at the last evaluation: the mean of the current task's accuracy and each earlier task's minimum."""
    a, k = _curve(accuracy, trained)
    if not len(a):
        return None
    current = int(k[-1])
    now = a[-1, current].item()
    mins = [m for j, m in enumerate(min_accuracy_per_task(a, k)) if j < current and m is not None]
    return (now + sum(mins)) / (1 + len(mins))


def _largest_change(values: torch.Tensor, window: int, rise: bool) -> float:
    """The largest drop (or rise) between two of ``values`` at most ``window - 1`` apart; at least 0."""
    best = 0.0
    for lag in range(1, min(window, len(values))):
        change = values[lag:] - values[:-lag] if rise else values[:-lag] - values[lag:]
        best = max(best, change.max().item())
    return best


def windowed_change_per_task(
    accuracy: Curve, window: int, rise: bool = False, trained: Sequence[int] | torch.Tensor | None = None
) -> list[float | None]:
    """Each task's WF^w (``rise=False``) or WP^w (``rise=True``) over its evaluations; ``None`` if never evaluated."""
    if window < 1:
        raise ValueError(f"a window holds at least one evaluation, got {window}")
    a = torch.as_tensor(accuracy, dtype=torch.float64)
    out: list[float | None] = []
    for j in range(a.shape[1]):
        values = a[~a[:, j].isnan(), j]
        out.append(_largest_change(values, window, rise) if len(values) else None)
    return out


def windowed_forgetting(accuracy: Curve, window: int) -> float | None:
    """WF^w: the mean over evaluated tasks of each one's largest drop within ``window`` evaluations."""
    per = [v for v in windowed_change_per_task(accuracy, window) if v is not None]
    return sum(per) / len(per) if per else None


def windowed_plasticity(accuracy: Curve, window: int) -> float | None:
    """WP^w: the mean over evaluated tasks of each one's largest rise within ``window`` evaluations."""
    per = [v for v in windowed_change_per_task(accuracy, window, rise=True) if v is not None]
    return sum(per) / len(per) if per else None


def stability_summary(accuracy: Curve, trained: Sequence[int] | torch.Tensor) -> dict[str, float | None]:
    """min-ACC, WC-ACC and WF^w, WP^w for the windows of `WINDOWS` (``wf10``, ``wp10``, ...)."""
    out: dict[str, float | None] = {
        "min_acc": min_accuracy(accuracy, trained),
        "wc_acc": worst_case_accuracy(accuracy, trained),
    }
    for w in WINDOWS:
        out[f"wf{w}"] = windowed_forgetting(accuracy, w)
        out[f"wp{w}"] = windowed_plasticity(accuracy, w)
    return out
