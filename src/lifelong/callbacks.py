"""Callbacks every stream run uses: a task-aware progress bar and the writer of the run's results."""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lifelong.data.streams import stream_of
from lifelong.evaluation import ContinualEvaluation
from lifelong.files import atomic_open, save_atomic, write_atomic
from lifelong.loggers import log_config, log_results
from lifelong.methods.base import ContinualMethod
from lifelong.metrics.continual import SUMMARY_KEYS, summarize
from lifelong.metrics.cost import peak_memory, tensor_bytes
from lifelong.metrics.plots import accuracy_curves, accuracy_heatmap
from lifelong.metrics.stability import STABILITY_KEYS

log = logging.getLogger(__name__)


class TaskProgressBar(TQDMProgressBar):
    """Lightning's progress bar, labelled with the task as well as the epoch: ``Task 3/10 · epoch 1/2``.

    Redrawn every ``refresh_rate`` batches (default 10: at hundreds of small steps a second, redrawing at
    every step costs several percent of the training time). Testing every task at a task's end takes a moment
    and has no bar of its own; its result is the log line after each task.
    """

    def __init__(self, refresh_rate: int = 10, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        dm = stream_of(trainer)
        epoch = trainer.current_epoch
        e, of = dm.epoch_in_task(epoch)
        self.train_progress_bar.set_description(
            f"Task {dm.task_of_epoch(epoch) + 1}/{dm.num_tasks} · epoch {e + 1}/{of}"
        )


def _num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


class StreamReport(L.Callback):
    """Writes the run's results when the stream ends (rank 0 only).

    Files in ``output_dir``: ``metrics.json`` (the output contract, docs/getting-started.md),
    ``accuracy_matrix.csv``, ``accuracy_matrix.png`` (heatmap) and ``accuracy_curves.png`` (each task's accuracy
    along the stream). Each file is written atomically, and ``metrics.json`` last: its presence means the run
    finished and every other result is complete. In the trainer's loggers: the run's config at the start and,
    at the end, the summary metrics as ``test/<metric>`` and, with a validation split, ``val/<metric>``, with
    the figures ([`lifelong.loggers`][lifelong.loggers]).

    ``wall_time_s`` is the training time of the whole stream: a resumed run adds its time to the time recorded
    in the checkpoint it resumed from. The time between the two runs is not counted; an interrupted epoch,
    trained again, is counted twice, as it was paid for twice.

    What the run cost ([`lifelong.metrics.cost`][lifelong.metrics.cost]): ``examples_seen``, the training samples
    the network took from the stream over every rank (an epoch's repeats counted again, replayed samples not);
    ``method_state_bytes``, after each finished task, the bytes of the tensors the run's methods checkpoint (that
    task's checkpoint holds exactly these), and their maximum ``method_state_bytes_max``; ``peak_memory_bytes``, the
    most any rank held (``peak_memory_kind`` says what: the GPU allocator's peak, or a CPU process's peak resident
    set). A resumed run carries the counts on from its checkpoint; its peak memory is its own process's.

    Args:
        output_dir: the run's folder.
        info: identifying fields for ``metrics.json`` (``method``, ``dataset``, ``seed``, ...).
    """

    def __init__(self, output_dir: str | Path, info: dict[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.info = dict(info or {})
        self._start = 0.0
        self._before = 0.0  # training time recorded in the checkpoint this run resumed from
        self.metrics: dict[str, Any] = {}
        self._examples = 0  # training samples taken, over every rank
        self._state_bytes: list[int] = []  # what the methods checkpoint, after each finished task
        self._task_ended = False  # a task ended at the last step: count the methods' state once they consolidated

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        log_config(trainer.loggers, self.info)

    def elapsed(self) -> float:
        """Seconds of training so far, over every run that trained this stream."""
        return self._before + time.perf_counter() - self._start

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed(), "examples_seen": self._examples, "method_state_bytes": self._state_bytes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._before = float(state_dict.get("elapsed_s", 0.0))
        self._examples = int(state_dict.get("examples_seen", 0))
        self._state_bytes = list(state_dict.get("method_state_bytes", []))

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._count_state(trainer)  # a task ended inside the epoch: before the next one starts

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._examples += len(batch.y) * trainer.world_size  # a shape: no sync
        step = getattr(pl_module, "stream_step", None)
        self._task_ended = bool(step is not None and step.ends_task)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count_state(trainer)  # before the task's checkpoint is written (checkpoint callbacks run last)

    def _count_state(self, trainer: L.Trainer) -> None:
        """After a task's end (the methods' on_task_end has run): the bytes of what the methods checkpoint."""
        if self._task_ended:
            self._task_ended = False
            methods = [cb for cb in trainer.callbacks if isinstance(cb, ContinualMethod)]  # type: ignore[attr-defined]
            self._state_bytes.append(sum(tensor_bytes(m.state_dict()) for m in methods))

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Make every checkpoint self-describing: the run's fields and resolved config (what eval.py rebuilds)."""
        checkpoint["lifelong"] = {"info": self.info}

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows: torch.Tensor = pl_module.completed_rows().cpu()  # type: ignore[operator]
        dm = stream_of(trainer)
        results = _results(rows, pl_module.initial_accuracy.cpu())  # type: ignore[arg-type]
        if dm.has_validation:
            val_rows = pl_module.completed_rows(validation=True).cpu()  # type: ignore[operator]
            val = _results(val_rows, pl_module.val_initial_accuracy.cpu())  # type: ignore[arg-type]
            results.update({f"val_{k}": v for k, v in val.items()})
        if dm.scenario == "class":  # the Task-IL view of the same run: each sample among its own task's classes
            for validation in (False, True)[: 1 + dm.has_validation]:
                aware = pl_module.completed_rows(validation=validation, task_aware=True).cpu()  # type: ignore[operator]
                prefix = "val_task_aware_" if validation else "task_aware_"
                entries = _results(aware, torch.full((aware.shape[1],), math.nan))
                results.update({prefix + k: v for k, v in entries.items() if k not in ("initial_accuracy", "fwt")})
        self._count_state(trainer)
        peak, kind = peak_memory(pl_module.device)
        if trainer.world_size > 1:  # the most any rank held
            peak = int(trainer.strategy.reduce(torch.tensor(peak, device=pl_module.device), reduce_op="max"))
        self.metrics = {
            **results,
            "num_tasks": dm.num_tasks,
            "tasks_completed": len(rows),
            **self.info,
            "wall_time_s": round(self.elapsed(), 3),
            "examples_seen": self._examples,
            "method_state_bytes": self._state_bytes,
            "method_state_bytes_max": max(self._state_bytes, default=0),
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "stream": dm.describe(),
        }
        for curve in _curves(trainer):
            self.metrics.update(curve.results())
        self._write(trainer, rows)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, rows: torch.Tensor) -> None:
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / "accuracy_matrix.csv", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["after_task", *[f"task_{j + 1}" for j in range(rows.shape[1])]])
            for i, row in enumerate(rows.tolist()):
                writer.writerow([i + 1, *[f"{v:.6f}" for v in row]])
        title = f"{self.info.get('method', '')} on {self.info.get('dataset', '')}".strip()
        figures = {"accuracy_matrix": accuracy_heatmap(rows, title), "accuracy_curves": accuracy_curves(rows, title)}
        for name, fig in figures.items():
            save_atomic(out / f"{name}.png", functools.partial(fig.savefig, format="png"))
        files = []
        for evaluation in _curves(trainer):
            figures.update(evaluation.write(out, title))
            files.append(out / "eval_curve.csv")
        write_atomic(out / "metrics.json", json.dumps(self.metrics, indent=2) + "\n")  # last: the run is complete
        scalars = {
            f"{split}/{key}": self.metrics[prefix + key]
            for split, prefix in (("test", ""), ("val", "val_"))
            for key in SUMMARY_KEYS
            if self.metrics.get(prefix + key) is not None
        }
        if "continual_eval" in self.metrics:  # the stability-gap summary, under the split its curve was measured on
            split = self.metrics["continual_eval"]["split"]
            scalars.update(
                {f"{split}_curve/{k}": self.metrics[k] for k in STABILITY_KEYS if self.metrics.get(k) is not None}
            )
        files = [out / name for name in ("metrics.json", "accuracy_matrix.csv", *(f"{f}.png" for f in figures))] + files
        log_results(trainer.loggers, scalars, figures, files, trainer.global_step)
        for fig in figures.values():
            fig.clf()
        _print_summary(self.metrics, out)


def _curves(trainer: L.Trainer) -> list[ContinualEvaluation]:
    return [cb for cb in trainer.callbacks if isinstance(cb, ContinualEvaluation)]  # type: ignore[attr-defined]


def _results(rows: torch.Tensor, initial: torch.Tensor) -> dict[str, Any]:
    """One split's (test or validation) entries of ``metrics.json``: the matrix, the reference row, the summary."""
    out: dict[str, Any] = {
        "accuracy_matrix": [[round(v, 6) for v in row] for row in rows.tolist()],
        "initial_accuracy": None if initial.isnan().any() else [round(v, 6) for v in initial.tolist()],
    }
    if len(rows):
        out.update({k: _num(v) for k, v in summarize(rows, None if initial.isnan().any() else initial).items()})
    return out


def _print_summary(metrics: dict[str, Any], out: Path) -> None:
    rows = metrics["accuracy_matrix"]
    width = max(len(r) for r in rows) if rows else 0
    lines = ["", "Accuracy matrix (row i: after training task i; column j: test accuracy on task j, %)"]
    lines.append("        " + "".join(f"{'T' + str(j + 1):>7}" for j in range(width)))
    for i, row in enumerate(rows):
        lines.append(f"after {i + 1:<2}" + "".join(f"{100 * v:7.2f}" for v in row))

    def fmt(key: str) -> str:
        v = metrics.get(key)
        return "n/a" if v is None else f"{100 * v:.2f}"

    lines.append(
        f"average accuracy {fmt('avg_accuracy')} %  |  BWT {fmt('bwt')} %  |  forgetting {fmt('forgetting')} %  |  "
        f"FWT {fmt('fwt')} %  |  learning accuracy {fmt('learning_accuracy')} %"
    )
    if metrics.get("task_aware_avg_accuracy") is not None:
        lines.append(
            f"task-aware (each sample among its task's classes): average accuracy {fmt('task_aware_avg_accuracy')} %"
            f"  |  BWT {fmt('task_aware_bwt')} %"
        )
    if metrics.get("val_avg_accuracy") is not None:
        lines.append(f"validation: average accuracy {fmt('val_avg_accuracy')} %  |  BWT {fmt('val_bwt')} %")
    curve = metrics.get("continual_eval")
    if curve is not None:
        lines.append(
            f"continual evaluation ({curve['split']}, every {curve['every']} steps, {len(curve['steps'])} points): "
            f"min-ACC {fmt('min_acc')} %  |  WC-ACC {fmt('wc_acc')} %  |  WF10 {fmt('wf10')} %  |  "
            f"WF100 {fmt('wf100')} %  (eval_curve.png)"
        )
    lines.append(f"results: {out}")
    # through logging, so that under Hydra it reaches both the console and the run's train.log
    log.info("\n".join(lines))
