"""Continual evaluation: every seen task's accuracy every few training steps, not only at task ends.

`ContinualEvaluation` is a Lightning Callback (``train.py eval_every=N``); the curve it measures shows what
task-end evaluation cannot, such as the stability gap (De Lange et al., ICLR 2023), and its summary
([`lifelong.metrics.stability`][lifelong.metrics.stability]: min-ACC, WC-ACC, windowed forgetting) goes into
``metrics.json`` beside the accuracy matrix.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from matplotlib.figure import Figure
from torch import Tensor
from typing_extensions import override

from lifelong.data.streams import TaskStream, stream_of
from lifelong.data.tensors import TaskData
from lifelong.errors import ResumeError
from lifelong.files import atomic_open, save_atomic
from lifelong.methods.base import log_now
from lifelong.metrics.stability import WINDOWS, min_accuracy_per_task, stability_summary, windowed_change_per_task
from lifelong.seeding import generator

SPLITS = ("test", "val")


class ContinualEvaluation(L.Callback):
    """Evaluates every task seen so far on a subset of its test (or validation) set every ``every`` training steps.

    What is measured: after the optimizer step of every ``every``-th global step, at the last step of every task,
    and once before the first step (the untrained network on task 1), the accuracy of each task trained so far
    (the current one included) on ``subset`` samples of it, in eval mode, through the module's ``predict`` (the
    same ranking as the task-end evaluation, with the class scenario's head of the task being trained). It costs
    one forward pass over the subsets: no loader is rebuilt, the subsets are transformed once and kept on the
    device, and the accuracies stay on the device until a step that syncs anyway (a log step, a task end, an epoch
    end), so an evaluation adds no host sync of its own on an accelerator. Under DDP each rank evaluates its
    shard of the subsets and the correct counts are summed (one all-reduce): every rank holds the same curve.

    The subsets are **fixed** by default: drawn once per task from the run's seed (``eval_subset`` purpose). De Lange
    et al.'s code draws a new random subset before every evaluation (``redraw=True`` here, seeded by the step, so it
    is reproducible too). Fixed is the default because then two points of the curve differ only by the weights: a
    drop is the network's, not the subset's sampling noise (about 1.5 points at 1,000 samples and 80 % accuracy),
    and the subsets are transformed once instead of at every evaluation.

    Results: ``metrics.json`` gets ``continual_eval`` (the curve: ``steps``, the task ``trained`` at each, the
    ``accuracy`` rows, NaN as ``null`` for tasks not yet seen, and ``task_end_steps``), the summary ``min_acc``,
    ``wc_acc``, ``wf10``, ``wp10``, ``wf100``, ``wp100`` with their per-task values, and ``eval_time_s``; the run's
    folder ``eval_curve.csv`` and ``eval_curve.png`` (task boundaries marked); the loggers
    ``<split>_curve/acc/task_<j>`` and ``<split>_curve/avg_acc_seen`` at each evaluation's step. The curve is in the
    checkpoints, so a resumed run continues it exactly.

    Args:
        every: evaluate every this many training steps (global steps).
        subset: samples per task (a seeded random subset; all of a task's samples if it has fewer); ``None`` for
            the whole set.
        redraw: draw a new subset at every evaluation (De Lange et al.) instead of one fixed subset per task.
        split: ``"test"`` (the default, as De Lange et al.) or ``"val"`` (the held-out part of each task's training
            data, ``dataset.val_fraction > 0``): a curve to select on must be the validation one.
    """

    def __init__(self, every: int, subset: int | None = 1000, redraw: bool = False, split: str = "test") -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"eval_every must be a number of training steps >= 1, got {every!r}")
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
            raise ValueError(f"eval_subset must be a number of samples per task >= 1, or null for all, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"eval_split must be one of {list(SPLITS)}, got {split!r}")
        self.every, self.subset, self.redraw, self.split = every, subset, redraw, split
        self.steps: list[int] = []  # the global step after which each evaluation was made
        self.trained: list[int] = []  # the task being trained at each
        self.rows: list[list[float]] = []  # each evaluation's accuracy per task (NaN: not seen yet)
        self.task_end_steps: list[int] = []  # the last step of each finished task
        self.eval_time_s = 0.0
        self._pending: list[Tensor] = []  # rows still on the device (steps and trained are already recorded)
        self._timers: list[tuple[Any, Any]] = []  # CUDA events of evaluations not yet read
        self._cache: tuple[int, list[tuple[Tensor, Tensor, Tensor, Tensor]]] | None = None  # (tasks, chunks)
        self._totals: Tensor | None = None

    @property
    def config(self) -> dict[str, Any]:
        return {"every": self.every, "subset": self.subset, "redraw": self.redraw, "split": self.split}

    # ---- when ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = stream_of(trainer)
        if self.split == "val" and not dm.has_validation:
            raise ValueError("eval_split=val needs validation data: set dataset.val_fraction > 0")
        self._cache = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and not self.steps:  # a fresh stream: the untrained network on task 1
            self._evaluate(trainer, pl_module, 0)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        at = getattr(pl_module, "stream_step", None)
        ends = bool(at is not None and at.ends_task)
        if (step % self.every == 0 or ends) and (not self.steps or self.steps[-1] != step):
            self._evaluate(trainer, pl_module, step)
        if ends:
            self.task_end_steps.append(step)
        if ends or log_now(trainer):
            self.flush(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    # ---- what ----------------------------------------------------------------------------------------
    def _data(self, dm: TaskStream, task: int) -> TaskData:
        data = dm.test_data(task) if self.split == "test" else dm.val_data(task)
        if self.subset is None:
            return data
        step = self.steps[-1] if self.redraw else 0
        return data.subset(self.subset, generator(dm.seed, "eval_subset", task=task, epoch=step))

    def _chunks(self, dm: TaskStream, tasks: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """This rank's shard of the subsets of tasks ``0..tasks-1`` as evaluation batches: (x, y, task, column)."""
        if self._cache is not None and self._cache[0] == tasks and not self.redraw:
            return self._cache[1]
        chunks = []
        totals = torch.zeros(dm.num_tasks)
        for j in range(tasks):
            data = self._data(dm, j)
            totals[j] = len(data)
            for b in dm.loader(data, train=False):  # sharded across ranks; transformed once (fixed subsets)
                chunks.append((b.x, b.y, b.task, torch.full_like(b.y, j)))
        totals[tasks:] = math.nan
        self._totals = totals.to(chunks[0][0].device if chunks else "cpu")
        self._cache = (tasks, chunks)
        return chunks

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        dm = stream_of(trainer)
        task = int(pl_module.current_task)  # type: ignore[arg-type]
        self.steps.append(step)
        self.trained.append(task)
        timer = _Timer(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            chunks = self._chunks(dm, task + 1)
            assert self._totals is not None
            correct = torch.zeros(dm.num_tasks, device=pl_module.device)
            for x, y, t, column in chunks:
                pred = pl_module.predict(x, t).argmax(-1)  # type: ignore[operator]
                correct.index_add_(0, column, (pred == y).to(correct.dtype))
            if trainer.world_size > 1:
                correct = trainer.strategy.reduce(correct, reduce_op="sum")
            self._pending.append(correct / self._totals)
        finally:
            pl_module.train(was_training)
        timer.stop(self)

    def flush(self, trainer: L.Trainer | None = None) -> None:
        """Bring the evaluations still on the device to the host (one sync) and write them to the loggers."""
        if not self._pending:
            return
        new = torch.stack(self._pending).cpu().tolist()
        first = len(self.rows)
        self.rows.extend(new)
        self._pending.clear()
        for start, end in self._timers:
            end.synchronize()
            self.eval_time_s += start.elapsed_time(end) / 1000
        self._timers.clear()
        if trainer is None:
            return
        for i in range(first, len(self.rows)):
            k = self.trained[i]
            seen = self.rows[i][: k + 1]
            values = {f"{self.split}_curve/acc/task_{j + 1}": v for j, v in enumerate(seen)}
            values[f"{self.split}_curve/avg_acc_seen"] = sum(seen) / len(seen)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=self.steps[i])

    # ---- results -------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        """The curve and its summary, for ``metrics.json``."""
        self.flush()
        rows = torch.tensor(self.rows, dtype=torch.float64).reshape(len(self.rows), -1)
        summary = stability_summary(rows, self.trained) if len(self.rows) else {}
        per_task: dict[str, Any] = {"min_acc_per_task": _rounded(min_accuracy_per_task(rows, self.trained))}
        for w in WINDOWS:
            per_task[f"wf{w}_per_task"] = _rounded(windowed_change_per_task(rows, w))
        return {
            **{k: _round(v) for k, v in summary.items()},
            **per_task,
            "eval_time_s": round(self.eval_time_s, 3),
            "continual_eval": {
                **self.config,
                "steps": self.steps,
                "trained": self.trained,
                "task_end_steps": self.task_end_steps,
                "accuracy": [_rounded(r) for r in self.rows],
            },
        }

    def write(self, out: Path, title: str = "") -> dict[str, Figure]:
        """Write ``eval_curve.csv`` and ``eval_curve.png`` into ``out``; returns the figure (for the loggers)."""
        self.flush()
        width = len(self.rows[0]) if self.rows else 0
        with atomic_open(out / "eval_curve.csv", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "trained_task", *[f"task_{j + 1}" for j in range(width)]])
            for step, k, row in zip(self.steps, self.trained, self.rows, strict=True):
                writer.writerow([step, k + 1, *["" if math.isnan(v) else f"{v:.6f}" for v in row]])
        fig = curve_figure(self.steps, self.rows, self.task_end_steps, f"{title} ({self.split}, every {self.every})")
        save_atomic(out / "eval_curve.png", functools.partial(fig.savefig, format="png"))
        return {"eval_curve": fig}

    # ---- checkpoints ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        self.flush()
        return {
            "config": self.config,
            "steps": list(self.steps),
            "trained": list(self.trained),
            "rows": [list(r) for r in self.rows],
            "task_end_steps": list(self.task_end_steps),
            "eval_time_s": self.eval_time_s,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config") != self.config:
            raise ResumeError(
                f"the checkpoint's continual evaluation was {state_dict.get('config')}, this run's is {self.config}: "
                "resume with the same eval_every, eval_subset, eval_redraw and eval_split"
            )
        self.steps = list(state_dict["steps"])
        self.trained = list(state_dict["trained"])
        self.rows = [list(r) for r in state_dict["rows"]]
        self.task_end_steps = list(state_dict["task_end_steps"])
        self.eval_time_s = float(state_dict["eval_time_s"])
        self._pending.clear()


class _Timer:
    """An evaluation's time: CUDA events on a GPU (read at the next flush, so timing adds no sync), the wall clock
    on a CPU (where every operation has finished when it returns)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start: Any = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def stop(self, owner: ContinualEvaluation) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            owner._timers.append((self.start, end))
        else:
            owner.eval_time_s += time.perf_counter() - self.start


def curve_figure(steps: list[int], rows: list[list[float]], task_ends: list[int], title: str = "") -> Figure:
    """Each task's accuracy along the training steps, from its first evaluation on; dashed lines at task ends."""
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    a = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), -1)
    x = torch.tensor(steps, dtype=torch.float64)
    for j in range(a.shape[1]):
        seen = ~a[:, j].isnan()
        if seen.any():
            ax.plot(x[seen].numpy(), a[seen, j].numpy(), linewidth=1, label=f"task {j + 1}")
    for end in task_ends[:-1]:
        ax.axvline(end, color="grey", linestyle="--", linewidth=0.7)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if a.shape[1] <= 20:
        ax.legend(fontsize=7, ncol=2 if a.shape[1] > 10 else 1, loc="lower left")
    ax.set_title(title.strip(), fontsize=9)
    fig.tight_layout()
    return fig


def _round(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 6)


def _rounded(values: list[float | None] | list[float]) -> list[float | None]:
    return [_round(v) for v in values]
