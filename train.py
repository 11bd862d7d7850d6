"""Train a network through a task stream: ``python train.py method=ewc dataset=permuted_mnist``.

A thin Hydra entry point: it composes the config (conf/), checks it, instantiates the parts and fits them
through :class:`lifelong.run.StreamRun`, the path :func:`lifelong.train_stream` takes too. Hydra stays at the
entry points (this file, eval.py, lifelong.cli and lifelong.config); the library takes plain values.
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

from lifelong.cli import (
    EXIT_BAD_INPUT,
    USER_ERRORS,
    build_module,
    build_part,
    build_parts,
    check,
    exit_with,
    held_file_logs,
    load,
    node_values,
    save_config,
)
from lifelong.config import name_the_key
from lifelong.errors import ConfigError, LifelongError, WriteError
from lifelong.files import write_error
from lifelong.folders import RunComplete, finished_run
from lifelong.logs import guard_log_files, quiet_lightning
from lifelong.run import StreamRun

log = logging.getLogger(__name__)


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
            stream_run = _prepare(cfg, output_dir, choices)
        except RunComplete as done:
            if sweep_dir is None:
                exit_with(str(done))
            print(f"skipped: {done}", file=sys.stderr, flush=True)
            recorded = finished_run(output_dir)
            return recorded.get("val_avg_accuracy", recorded.get("avg_accuracy"))
        except LifelongError as err:
            exit_with(str(err))
    try:
        stream_run.begin()  # asked for, and every check passed: overwrite's clearing, a killed write's leftovers
        if rank_zero_only.rank == 0:
            save_config(output_dir, cfg, HydraConfig.instance().cfg if HydraConfig.initialized() else None)
            info, epochs = stream_run.report.info, cfg.epochs_per_task
            start = f"resumed from {stream_run.ckpt_path}" if stream_run.ckpt_path else "from the start"
            log.info(  # the log's first line: what runs, and where its results go
                f"{info['method']} on {info['dataset']} ({info['scenario']} scenario): "
                f"{stream_run.datamodule.num_tasks} tasks x {epochs} epoch{'s' if epochs > 1 else ''}, "
                f"seed {cfg.seed}, {start}; results in {output_dir}"
            )
        metrics = stream_run.fit()
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
    if stream_run.datamodule.has_validation:
        return metrics.get("val_avg_accuracy")
    if sweep_dir is not None:
        _warn_selecting_on_test(sweep_dir)
    return metrics.get("avg_accuracy")


def _prepare(cfg: DictConfig, output_dir: Path, choices: dict[str, Any]) -> StreamRun:
    """Check everything a run needs, cheapest first, and build its parts (the library's one path,
    :class:`lifelong.run.StreamRun`); raises ``LifelongError``."""
    resolved = check(cfg)
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
    try:  # the folder is planned first; then Lightning checks the accelerator, devices and strategy
        stream_run = StreamRun(
            datamodule,
            output_dir,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            ckpt_path=cfg.ckpt_path,
            trainer=build_part("trainer", cfg.trainer),
            callbacks=callbacks,
            logger=logger,
            info=info,
            progress_bar=cfg.trainer.get("enable_progress_bar"),
        )
    except LifelongError:
        raise
    except USER_ERRORS as err:
        raise ConfigError(_trainer_message(err, cfg)) from None
    load(datamodule)
    stream_run.attach(build_module(cfg, datamodule, callbacks[0]))
    return stream_run


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
