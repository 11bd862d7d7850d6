"""Train a network through a task stream: ``python train.py method=ewc dataset=permuted_mnist``.

A thin Hydra entry point: it composes the config (conf/), instantiates the parts and hands them to
:func:`lifelong.train_stream`. Only this file knows about Hydra; the library takes plain values.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lifelong import train_stream
from lifelong.data import TaskStream
from lifelong.errors import LifelongError
from lifelong.methods import ContinualMethod, ExperienceReplay
from lifelong.models import ContinualClassifier

log = logging.getLogger(__name__)


def _fail(message: str) -> None:
    print(f"\nerror: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _fail_on(err: BaseException) -> None:
    """A wrong value or missing data: one message, no traceback from inside the library."""
    cause = _root_cause(err)
    _fail(str(cause) if isinstance(cause, (LifelongError, ValueError)) else str(err))


def _root_cause(err: BaseException) -> BaseException:
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _checkpoint_to_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    """``ckpt_path`` if given (it must exist), else with ``resume=true`` the run folder's last checkpoint."""
    if cfg.ckpt_path is not None:
        if not Path(cfg.ckpt_path).is_file():
            _fail(f"ckpt_path={cfg.ckpt_path} is not a file. Point it at a checkpoint, e.g. RUN/checkpoints/last.ckpt")
        return str(cfg.ckpt_path)
    if cfg.resume:
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info(f"resume=true: resuming the stream from {last}")
            return str(last)
        log.info(f"resume=true: no checkpoint in {last.parent} yet, starting the stream from the beginning")
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    return run(cfg, Path(hc.runtime.output_dir), dict(hc.runtime.choices), sweep_dir=sweep_dir)


def build(cfg: DictConfig) -> tuple[TaskStream, ContinualClassifier, list[ContinualMethod]]:
    """The stream (set up: its data loaded), the module and the methods of a composed config.

    Raises ``LifelongError``, ``ValueError`` or Hydra's ``InstantiationException`` on bad values or data.
    """
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")  # loads the data now: a missing file fails before anything else starts
    method = instantiate(cfg.method)
    callbacks = [method]
    if cfg.get("replay"):
        if isinstance(method, ExperienceReplay):
            raise ValueError("method=er already replays: drop replay=..., or combine replay with another method")
        callbacks.append(instantiate(cfg.replay))
    net = instantiate(cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    net = method.configure_network(net, datamodule)  # e.g. HAT's per-task masks
    module = ContinualClassifier.for_stream(
        net,
        instantiate(cfg.optimizer),
        datamodule,
        reset_optimizer=cfg.reset_optimizer,
        class_outputs=cfg.class_outputs,
    )
    return datamodule, module, callbacks


def run(cfg: DictConfig, output_dir: Path, choices: dict[str, Any], sweep_dir: Path | None = None) -> float | None:
    """Train through the stream of a composed config; results go to ``output_dir``.

    Returns what a sweep should select on (an Optuna trial's value): the validation average accuracy, or,
    for a stream without validation data (``dataset.val_fraction=0``), the test average accuracy, with a
    warning once per sweep (``sweep_dir``) that selecting on it selects on test.

    ``choices`` names the config groups chosen (``{"method": "ewc", "dataset": ...}``), for ``metrics.json``.
    Exits with status 2 and one message on bad values or missing data.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        datamodule, module, callbacks = build(cfg)
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        trainer = instantiate(cfg.trainer)
    except (LifelongError, ValueError, TypeError, InstantiationException) as err:
        _fail_on(err)
        return None
    info: dict[str, Any] = {
        "method": choices.get("method") + (f"+{choices['replay']}" if choices.get("replay") else ""),
        "dataset": choices.get("dataset"),
        "scenario": datamodule.scenario,
        "model": choices.get("model"),
        "optimizer": choices.get("optimizer"),
        "seed": cfg.seed,
        "epochs_per_task": cfg.epochs_per_task,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    ckpt_path = _checkpoint_to_resume(cfg, output_dir)
    try:
        metrics = train_stream(
            datamodule,
            module,
            output_dir,
            trainer=trainer,
            callbacks=callbacks,
            logger=logger,
            info=info,
            ckpt_path=ckpt_path,
            progress_bar=cfg.trainer.get("enable_progress_bar", True),
        )
    except LifelongError as err:  # e.g. a checkpoint of another run
        _fail(str(err))
        return None
    if datamodule.has_validation:
        return metrics.get("val_avg_accuracy")
    if sweep_dir is not None:
        _warn_selecting_on_test(sweep_dir)
    return metrics.get("avg_accuracy")


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
        _fail(
            f"cannot write the run's outputs to {folder}: {existing} {what}. "
            f"Choose another folder with {key}DIR (or run from a writable working directory)."
        )


if __name__ == "__main__":
    _check_output_folder(sys.argv[1:])
    main()
