"""Train a network through a task stream: ``python train.py method=ewc dataset=permuted_mnist``.

A thin Hydra entry point: it composes the config (conf/), checks it, instantiates the parts and fits them
(see :func:`lifelong.stream_trainer`). Only this file knows about Hydra; the library takes plain values.
Every check runs before anything trains or is written (docs/running.md, "Bad input").
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from lifelong.callbacks import StreamReport
from lifelong.checkpoints import UnreadableCheckpoint, check_checkpoint, read_checkpoint
from lifelong.cli import (
    EXIT_BAD_INPUT,
    USER_ERRORS,
    FolderState,
    RunComplete,
    build_module,
    build_part,
    build_parts,
    check,
    clear_results,
    exit_with,
    finished_run,
    held_file_logs,
    load,
    node_values,
    plan_folder,
    save_config,
)
from lifelong.config import name_the_key
from lifelong.data import TaskStream
from lifelong.errors import ConfigError, LifelongError, ResumeError, WriteError
from lifelong.files import remove_stale_temporaries, write_error
from lifelong.logs import guard_log_files, quiet_lightning
from lifelong.models import ContinualClassifier
from lifelong.run import stream_trainer

log = logging.getLogger(__name__)

# Keys a resumed run may change from the run that wrote its checkpoint: where it runs and what it shows, not
# what it trains (everything else recorded in the checkpoint must match; see lifelong.checkpoints)
RESUME_MAY_DIFFER = (
    "ckpt_path",
    "resume",
    "overwrite",
    "preset",  # the values it pins are compared where they are used
    "logger",
    "dataset.root",
    "dataset.download",
    "dataset.eval_batch_size",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_lightning()
    guard_log_files()
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    return run(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), sweep_dir=sweep_dir)


def run(cfg: DictConfig, output_dir: Path, choices: dict[str, Any], sweep_dir: Path | None = None) -> float | None:
    """Train through the stream of a composed config; results go to ``output_dir``.

    Returns what a sweep should select on (an Optuna trial's value): the validation average accuracy, or,
    for a stream without validation data (``dataset.val_fraction=0``), the test average accuracy, with a
    warning once per sweep (``sweep_dir``) that selecting on it selects on test.

    ``choices`` names the config groups chosen (``{"method": "ewc", "dataset": ...}``), for ``metrics.json``.
    Bad input - a value, missing data, a checkpoint of another run, a folder holding another run's results -
    exits with status 2 and one message before anything trains, and leaves every file as it was; so does a
    NaN loss or a write the system refuses during training (the message names the file), leaving every file
    written before intact for ``resume=true``. In a sweep, a job that completed already (``resume=true``)
    returns its recorded value, and a job whose training fails is reported and returns NaN, so that the sweep
    goes on.
    """
    with held_file_logs():  # a refused run adds nothing to the folder's train.log
        try:
            datamodule, module, trainer, report, ckpt_path, state = _prepare(cfg, output_dir, choices)
        except RunComplete as done:
            if sweep_dir is None:
                exit_with(str(done))
            print(f"skipped: {done}", file=sys.stderr, flush=True)
            recorded = finished_run(output_dir)
            return recorded.get("val_avg_accuracy", recorded.get("avg_accuracy"))
        except LifelongError as err:
            exit_with(str(err))
    try:
        if rank_zero_only.rank == 0:
            if cfg.overwrite and state != "empty":
                clear_results(output_dir)  # asked for, and every check passed
            for folder in (output_dir, output_dir / "checkpoints"):  # a killed write's leftovers
                for stale in remove_stale_temporaries(folder):
                    log.info(f"removed {stale}, the temporary file of a write that did not finish")
            save_config(output_dir, cfg, HydraConfig.instance().cfg if HydraConfig.initialized() else None)
            info, epochs = report.info, cfg.epochs_per_task
            start = f"resumed from {ckpt_path}" if ckpt_path else "from the start"
            log.info(  # the log's first line: what runs, and where its results go
                f"{info['method']} on {info['dataset']} ({info['scenario']} scenario): {datamodule.num_tasks} tasks x "
                f"{epochs} epoch{'s' if epochs > 1 else ''}, seed {cfg.seed}, {start}; results in {output_dir}"
            )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except (LifelongError, OSError) as err:  # a NaN loss; a write the system refused
        written = isinstance(err, WriteError) or not isinstance(err, LifelongError)
        message = _write_failed(err, output_dir) if written else str(err)
        if sweep_dir is None:
            exit_with(message)
        log.error(f"error: {message}\n(this job failed; the sweep goes on)")
        return math.nan
    except Exception as err:
        if rank_zero_only.rank == 0 or not _peer_stopped(err):
            raise
        # Another process of the run (rank 0, which writes the files) failed and says why; this one only lost
        # its peer while waiting at a collective, before Lightning's launcher stopped it
        print(f"\nrank {rank_zero_only.rank}: stopped, as another process of the run failed", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    metrics = report.metrics
    if datamodule.has_validation:
        return metrics.get("val_avg_accuracy")
    if sweep_dir is not None:
        _warn_selecting_on_test(sweep_dir)
    return metrics.get("avg_accuracy")


def _prepare(
    cfg: DictConfig, output_dir: Path, choices: dict[str, Any]
) -> tuple[TaskStream, ContinualClassifier, L.Trainer, StreamReport, str | None, FolderState]:
    """Check everything a run needs, cheapest first, and build its parts; raises ``LifelongError``."""
    resolved = check(cfg)
    state = plan_folder(output_dir, resume=cfg.resume, overwrite=cfg.overwrite, ckpt_path=cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, callbacks = build_parts(cfg)
    info: dict[str, Any] = {
        "method": choices.get("method") + (f"+{choices['replay']}" if choices.get("replay") else ""),
        "dataset": choices.get("dataset"),
        "scenario": datamodule.scenario,
        "model": choices.get("model"),
        "optimizer": choices.get("optimizer"),
        "seed": cfg.seed,
        "epochs_per_task": cfg.epochs_per_task,
        "config": resolved,
    }
    logger = build_part("logger", cfg.logger) if cfg.get("logger") else False
    try:  # Lightning checks the accelerator, devices and strategy here
        trainer, report = stream_trainer(
            datamodule,
            output_dir,
            trainer=build_part("trainer", cfg.trainer),
            callbacks=callbacks,
            logger=logger,
            info=info,
            progress_bar=cfg.trainer.get("enable_progress_bar"),
        )
    except USER_ERRORS as err:
        raise ConfigError(_trainer_message(err, cfg)) from None
    load(datamodule)
    module = build_module(cfg, datamodule, callbacks[0])
    resumed = _checkpoint_to_resume(cfg, output_dir, state)
    ckpt_path = None
    if resumed is not None:
        ckpt_path, ckpt = resumed
        where = f"ckpt_path={ckpt_path}" if cfg.ckpt_path is not None else f"the run's checkpoint {ckpt_path}"
        check_checkpoint(ckpt, ckpt_path, trainer, module, datamodule, info, RESUME_MAY_DIFFER, where)
    return datamodule, module, trainer, report, ckpt_path, state


def _peer_stopped(err: BaseException) -> bool:
    """Whether ``err`` is a collective that lost its peer (the other process of a DDP run stopped)."""
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(err, torch.distributed.DistError) or any(w in str(err) for w in words)


def _write_failed(err: BaseException, output_dir: Path) -> str:
    """What a refused write (:class:`~lifelong.errors.WriteError`, or an ``OSError`` of a library's) tells the user:
    the file, the system's words, and how the run goes on from what was written before."""
    if finished_run(output_dir):
        return (
            f"{write_error(err)}. The run's results are complete ({output_dir / 'metrics.json'} and the files beside "
            "it); only that file is incomplete"
        )
    return (
        f"{write_error(err)}. Every file written before it is intact: once the cause is fixed, run the same command "
        f"with resume=true (and hydra.run.dir={output_dir}) to continue from the last checkpoint"
    )


def _trainer_message(err: BaseException, cfg: DictConfig) -> str:
    message = name_the_key(str(err), "trainer", node_values(cfg.trainer))
    if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        message += " (no CUDA GPU is visible to this process: run on the CPU with trainer=cpu, or trainer=ddp_cpu)"
    return message


def _checkpoint_to_resume(cfg: DictConfig, output_dir: Path, state: FolderState) -> tuple[str, dict[str, Any]] | None:
    """``ckpt_path`` if given, else with ``resume=true`` the run folder's newest intact checkpoint; with it read.

    The newest is ``last.ckpt`` unless a write was refused or the run was killed before it was replaced; a
    checkpoint that cannot be read (cut short by a full disk or a killed copy) is passed over, with a warning
    naming it, for the next newest.
    """
    if cfg.ckpt_path is not None:
        return str(cfg.ckpt_path), read_checkpoint(cfg.ckpt_path)
    if not cfg.resume:
        return None
    if state == "empty":
        log.info(f"resume=true: no checkpoint in {output_dir / 'checkpoints'} yet, starting the stream from the start")
        return None
    # newest first; at equal times last.ckpt, which is written after the task checkpoint of the same epoch
    candidates = sorted(
        (output_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt")
    )[::-1]
    passed_over: list[str] = []
    for path in candidates:
        try:
            ckpt = read_checkpoint(path)
        except UnreadableCheckpoint as err:
            log.warning(f"resume=true: passing over {path}: {err.reason}")
            passed_over.append(path.name)
            continue
        instead = f" (instead of {', '.join(passed_over)}, which cannot be read)" if passed_over else ""
        log.info(f"resume=true: resuming the stream from {path}{instead}")
        return str(path), ckpt
    raise ResumeError(
        f"resume=true: none of the checkpoints in {output_dir / 'checkpoints'} can be read ({', '.join(passed_over)}): "
        "start the run again in a new folder (hydra.run.dir=NEW), or with overwrite=true"
    )


def _warn_selecting_on_test(sweep_dir: Path) -> None:
    """Once per sweep (the first job to get here creates a marker in the sweep folder, whichever process it is)."""
    try:
        fd = os.open(sweep_dir / ".warned_selecting_on_test", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    except OSError:
        pass  # an unwritable sweep folder: warn anyway
    else:
        os.close(fd)
    log.warning(
        "this sweep's runs have no validation data (dataset.val_fraction=0): the value each job returns, and that "
        "a sweeper such as Optuna maximises, is TEST accuracy, so a setting chosen by it is chosen on test. "
        "Set dataset.val_fraction (e.g. 0.1) to select on held-out training data, then report test accuracy "
        "(python scripts/summarize.py SWEEP --select)."
    )


def _check_output_folder(argv: list[str]) -> None:
    """Refuse an output folder that cannot be created before Hydra tries (its error is a bare traceback)."""
    sweep = "-m" in argv or "--multirun" in argv
    key = "hydra.sweep.dir=" if sweep else "hydra.run.dir="
    given = [a[len(key) :] for a in argv if a.startswith(key)]
    folder = Path(given[-1].strip("'\"")) if given else Path("multirun" if sweep else "outputs")
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        exit_with(
            f"cannot write the run's outputs to {folder}: {existing} {what}. "
            f"Choose another folder with {key}DIR (or run from a writable working directory)."
        )


if __name__ == "__main__":
    _check_output_folder(sys.argv[1:])
    main()
