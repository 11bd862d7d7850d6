"""Running a whole task stream as one Lightning ``fit``: the trainer it needs, and the one path every run takes."""

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
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics.classification import MulticlassAccuracy

from lifelong.callbacks import StreamReport, TaskProgressBar
from lifelong.checkpoints import check_checkpoint
from lifelong.data.streams import TaskStream
from lifelong.errors import RunFolderError
from lifelong.files import AtomicCheckpointIO
from lifelong.folders import begin, checkpoint_to_resume, plan_folder
from lifelong.keys import NOT_LEARNT
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

    Checkpoints go to ``output_dir/checkpoints``: ``task_<k>.ckpt`` after each task (method state included) and
    ``last.ckpt`` after every epoch; ``trainer.fit(..., ckpt_path=...)`` resumes the stream from one. Each is written
    atomically in its folder ([`lifelong.files.AtomicCheckpointIO`][lifelong.files.AtomicCheckpointIO]): a write the
    system refuses raises [`WriteError`][lifelong.errors.WriteError] and leaves the previous checkpoint intact.

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


class StreamRun:
    """One run of a stream in its folder, planned, checked and fitted the same way from ``train.py`` and from
    `train_stream`: the folder is planned before anything is built
    ([`lifelong.folders.plan_folder`][lifelong.folders.plan_folder]), the trainer is built (its settings checked by
    Lightning), the stream's data is loaded, the checkpoint to resume from (``ckpt_path``, or with ``resume`` the
    folder's newest intact one) is checked against this run, and only then is anything written.

    Args:
        datamodule: the stream.
        output_dir: the run's folder.
        resume: continue the run the folder holds from its newest intact checkpoint.
        overwrite: replace the results of a run the folder holds.
        ckpt_path: the checkpoint to resume from (for example another run's).
        may_differ: config keys a resumed run may change from the run that wrote its checkpoint.
        **kwargs: for `stream_trainer` (``trainer``, ``callbacks``, ``logger``, ``info``, ``progress_bar``).
    """

    def __init__(
        self,
        datamodule: TaskStream,
        output_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        ckpt_path: str | None = None,
        may_differ: Sequence[str] = NOT_LEARNT,
        **kwargs: Any,
    ) -> None:
        if resume and overwrite:
            raise RunFolderError("resume and overwrite contradict each other: keep a run's results, or replace them")
        self.folder = Path(output_dir)
        self.state = plan_folder(self.folder, resume=resume, overwrite=overwrite, ckpt_path=ckpt_path)
        self.datamodule = datamodule
        self.trainer, self.report = stream_trainer(datamodule, self.folder, **kwargs)
        self.resume, self.overwrite, self.may_differ = resume, overwrite, tuple(may_differ)
        self._given = ckpt_path
        self.ckpt_path: str | None = None  # the checkpoint the fit resumes from, once attach() found it
        self.module: ContinualClassifier | None = None
        self._begun = False

    def load(self) -> None:
        """Load the stream's data (a missing file fails here, before anything is written)."""
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")

    def attach(self, module: ContinualClassifier) -> None:
        """The module to train; with a checkpoint to resume from, checked against it (its stream, methods, network)."""
        resumed = checkpoint_to_resume(self.folder, self.state, resume=self.resume, ckpt_path=self._given)
        if resumed is not None:
            path, ckpt = resumed
            where = f"ckpt_path={path}" if self._given is not None else f"the run's checkpoint {path}"
            check_checkpoint(
                ckpt, path, self.trainer, module, self.datamodule, self.report.info, self.may_differ, where
            )
            self.ckpt_path = path
        self.module = module

    def begin(self) -> None:
        """Once every check passed: clear what ``overwrite`` replaces and a killed write's leftovers (rank 0)."""
        if rank_zero_only.rank == 0 and not self._begun:  # type: ignore[attr-defined]
            begin(self.folder, self.state, overwrite=self.overwrite)
        self._begun = True

    def fit(self) -> dict[str, Any]:
        """Train the whole stream (after `begin`); returns the results (also written to the folder)."""
        assert self.module is not None, "attach() the module first"
        self.begin()
        self.trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.ckpt_path)
        return self.report.metrics


def train_stream(
    datamodule: TaskStream,
    module: ContinualClassifier,
    output_dir: str | Path,
    *,
    ckpt_path: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train ``module`` through the whole stream and return the results (also written to ``output_dir``).

    The run goes through `StreamRun`, as ``train.py``'s do: a folder that holds a finished run is refused unless
    ``overwrite``; ``resume`` continues the folder's unfinished run from its newest intact checkpoint; ``ckpt_path``
    resumes from a given checkpoint. Any checkpoint is checked against this run first (its stream, methods and network;
    [`lifelong.checkpoints.check_checkpoint`][lifelong.checkpoints.check_checkpoint]). Keyword arguments go to
    `stream_trainer`.
    """
    run = StreamRun(datamodule, output_dir, resume=resume, overwrite=overwrite, ckpt_path=ckpt_path, **kwargs)
    run.load()
    run.attach(module)
    return run.fit()


@torch.no_grad()
def evaluate(
    module: ContinualClassifier, stream: TaskStream, after_task: int | None = None, tasks: Sequence[int] | None = None
) -> list[float]:
    """Test accuracy on every task of ``stream`` (set up), as the stream's validation measures it.

    Args:
        module: the trained module, on the device it should run on (the stream's data is moved there).
        stream: the stream it was trained on.
        after_task: the last task trained (0-based), which sets the class scenario's head; default: the
            module's ``current_task``.
        tasks: the tasks to test (0-based); default: all of them.

    Returns:
        One accuracy per task (of ``tasks``), in [0, 1]: a row of the accuracy matrix (ranked by
        `ContinualClassifier.predict`).
    """
    was_training = module.training
    module.eval()
    if after_task is not None:
        module.current_task = after_task
    device = next(module.parameters()).device
    stream.to(device)
    row = []
    try:
        for j in range(stream.num_tasks) if tasks is None else tasks:
            metric = MulticlassAccuracy(module.num_classes, average="micro").to(device)
            for x, y, task, _ in stream.loader(stream.test_data(j), train=False):
                metric.update(module.predict(x, task).argmax(-1), y)
            row.append(float(metric.compute()))
    finally:
        module.train(was_training)
    return row
