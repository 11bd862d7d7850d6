"""Running a whole task stream as one Lightning ``fit``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torchmetrics.classification import MulticlassAccuracy

from lifelong.callbacks import StreamReport, TaskProgressBar
from lifelong.checkpoints import check_checkpoint, read_checkpoint
from lifelong.data.streams import TaskStream
from lifelong.files import AtomicCheckpointIO
from lifelong.models.module import ContinualClassifier

TrainerFactory = Callable[..., L.Trainer]

# The Trainer arguments the stream sets (a trainer factory's own values for them would be overridden)
STREAM_TRAINER_ARGS = (
    "max_epochs",
    "reload_dataloaders_every_n_epochs",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
    "use_distributed_sampler",
    "callbacks",
    "logger",
    "enable_progress_bar",
    "default_root_dir",
)


def stream_trainer(
    datamodule: TaskStream,
    output_dir: str | Path,
    *,
    trainer: TrainerFactory = L.Trainer,
    callbacks: Sequence[Callback] = (),
    logger: Logger | bool | None = None,
    info: dict[str, Any] | None = None,
    progress_bar: bool | None = None,
) -> tuple[L.Trainer, StreamReport]:
    """A Trainer that runs ``datamodule``'s whole stream in one ``fit``.

    The stream fixes what the trainer's clock means, so these arguments are derived here, not configured:
    ``max_epochs`` the stream's, the train loader rebuilt every epoch (for the epoch's task), no Lightning
    validation (the module evaluates every task where the stream's clock ends a task: one row of the accuracy
    matrix), and no distributed sampler (the stream's loaders shard themselves across ranks).

    Checkpoints go to ``output_dir/checkpoints``: ``task_<k>.ckpt`` after each task (method state included)
    and ``last.ckpt`` after every epoch; ``trainer.fit(..., ckpt_path=...)`` resumes the stream from one. Each is
    written atomically in its folder (:class:`lifelong.files.AtomicCheckpointIO`): a write the system refuses
    raises :class:`~lifelong.errors.WriteError` and leaves the previous checkpoint intact.

    Args:
        datamodule: the stream.
        output_dir: the run's folder (results, checkpoints, TensorBoard events).
        trainer: ``Trainer`` or a partial of it carrying the hardware settings (accelerator, devices, ...).
        callbacks: the methods (``ContinualMethod`` callbacks) and any other callbacks.
        logger: a Lightning logger, or ``False`` for none.
        info: identifying fields written into ``metrics.json`` (method, dataset, seed, ...).
        progress_bar: show the task-aware progress bar; ``None`` (default): when stderr is a terminal. A run whose
            output goes to a file logs one line per task instead of hundreds of bar updates.

    Returns:
        The trainer and the report callback (its ``metrics`` hold the results once ``fit`` returns).
    """
    out = Path(output_dir)
    epochs = datamodule.epochs_per_checkpoint
    report = StreamReport(out, info)
    ckpt_dir = out / "checkpoints"
    per_task = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="task_{task:.0f}",  # no "=": Hydra overrides such as ckpt_path=... cannot hold one
        auto_insert_metric_name=False,
        every_n_epochs=epochs,
        save_top_k=-1,
        save_last=epochs == 1,
        save_on_train_epoch_end=True,
    )
    extra: list[Callback] = [report, per_task]
    if epochs > 1:  # also after every epoch inside a task
        extra.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, save_on_train_epoch_end=True))
    if progress_bar is None:
        progress_bar = sys.stderr.isatty()
    if progress_bar:
        extra.append(TaskProgressBar())
    derived = dict(
        max_epochs=datamodule.max_epochs,
        # every epoch, not every `epochs`: Lightning counts that schedule from the last reload, which a resumed
        # run shifts by one (it builds the loaders before it moves to the next epoch), so a run resumed inside
        # a stream of 2-epoch tasks trained one epoch on the previous task. A loader costs nothing to build.
        reload_dataloaders_every_n_epochs=1,
        check_val_every_n_epoch=1,  # no validation loop runs (see lifelong.models.ContinualClassifier)
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[*callbacks, *extra],
        logger=logger if logger is not None else False,
        enable_progress_bar=progress_bar,
        default_root_dir=str(out),
    )
    assert derived.keys() == set(STREAM_TRAINER_ARGS)
    trainer_obj = trainer(**derived)
    if type(trainer_obj.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default; a plugin of yours stays
        trainer_obj.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer_obj, report


def train_stream(
    datamodule: TaskStream,
    module: ContinualClassifier,
    output_dir: str | Path,
    *,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train ``module`` through the whole stream and return the results (also written to ``output_dir``).

    With ``ckpt_path``, the checkpoint is read and checked against this run first (its stream, methods and
    network; :func:`lifelong.checkpoints.check_checkpoint`). Keyword arguments go to :func:`stream_trainer`.
    """
    trainer, report = stream_trainer(datamodule, output_dir, **kwargs)
    if ckpt_path is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        check_checkpoint(read_checkpoint(ckpt_path), ckpt_path, trainer, module, datamodule, kwargs.get("info"))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return report.metrics


@torch.no_grad()
def evaluate(module: ContinualClassifier, stream: TaskStream, after_task: int | None = None) -> list[float]:
    """Test accuracy on every task of ``stream`` (set up), as the stream's validation measures it.

    Args:
        module: the trained module, on the device it should run on (the stream's data is moved there).
        stream: the stream it was trained on.
        after_task: the last task trained (0-based), which sets the class scenario's head; default: the
            module's ``current_task``.

    Returns:
        One accuracy per task, in [0, 1]: a row of the accuracy matrix (ranked by :meth:`ContinualClassifier.predict`).
    """
    was_training = module.training
    module.eval()
    if after_task is not None:
        module.current_task = after_task
    device = next(module.parameters()).device
    stream.to(device)
    row = []
    try:
        for j in range(stream.num_tasks):
            metric = MulticlassAccuracy(module.num_classes, average="micro").to(device)
            for x, y, task, _ in stream.loader(stream.test_data(j), train=False):
                metric.update(module.predict(x, task).argmax(-1), y)
            row.append(float(metric.compute()))
    finally:
        module.train(was_training)
    return row
