"""What ``train.py`` and ``eval.py`` share: failing with one message, checking a composed config and building
its parts, the run folder.

Bad input fails before anything trains, with one line on stderr and exit status 2, and changes no file that
was there before: the checks run while the run folder's log is held back (`held_file_logs`), and
Hydra's record of the config is written only once they pass (`save_config`).
"""

from __future__ import annotations

import logging
import sys
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import Any, Literal, NoReturn, TypedDict

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lifelong.config import check_targets, conforms, describe, name_the_key
from lifelong.data import TaskStream
from lifelong.errors import ConfigError, LifelongError
from lifelong.evaluation import ContinualEvaluation
from lifelong.methods import ContinualMethod, ExperienceReplay
from lifelong.methods.base import check_boundaries, stream_needs
from lifelong.models import ContinualClassifier
from lifelong.run import STREAM_TRAINER_ARGS

EXIT_BAD_INPUT = 2


def exit_with(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2: the user's input is wrong, not the code."""
    print(f"\nerror: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def root_cause(err: BaseException) -> BaseException:
    """The error inside Hydra's ``InstantiationException`` wrappers."""
    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


# Errors that mean a value is wrong: ours, Python's for a wrong value or type, and Lightning's for a setting
USER_ERRORS: tuple[type[BaseException], ...] = (LifelongError, ValueError, TypeError, MisconfigurationException)


def build_part(path: str, node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, the config node at ``path`` (``"method"``); a constructor's error on a
    value becomes a `ConfigError` naming the key (see
    [`lifelong.config.name_the_key`][lifelong.config.name_the_key])."""
    try:
        return instantiate(node, **kwargs)
    except Exception as err:
        cause = root_cause(err)
        if not isinstance(cause, USER_ERRORS):
            raise
        raise ConfigError(name_the_key(str(cause), path, node_values(node))) from cause


def node_values(node: DictConfig) -> dict[str, Any]:
    """A config node's values, resolved, as plain Python."""
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    return {str(k): v for k, v in values.items()}


# ---- the run's own options (conf/train.yaml's top level) -------------------------------------------------------
class TrainOptions(TypedDict):
    seed: int
    epochs_per_task: int
    reset_optimizer: bool
    class_outputs: Literal["seen", "all"]
    ckpt_path: str | None
    resume: bool
    overwrite: bool
    preset: dict[str, Any]
    eval_every: int | None
    eval_subset: int | None
    eval_redraw: bool
    eval_split: Literal["test", "val"]
    boundaries: Literal["given", "hidden"]


GROUPS = ("dataset", "model", "optimizer", "method", "replay", "trainer", "logger")
SEED_RANGE = (0, 2**32 - 1)  # numpy's, which seed_everything seeds too


def check_options(config: Mapping[str, Any]) -> None:
    """The top-level keys of a resolved ``train.yaml`` config: known, of the right type, in range."""
    hints = typing.get_type_hints(TrainOptions)
    for key, value in config.items():
        if key in GROUPS:
            continue
        if key not in hints:
            raise ConfigError(f"{key} is not an option of train.py; its options: {', '.join(hints)}, and the groups")
        if not conforms(value, hints[key]):
            raise ConfigError(f"{key}={value!r}: expected {describe(hints[key])}")
    lo, hi = SEED_RANGE
    if not lo <= config["seed"] <= hi:
        raise ConfigError(f"seed={config['seed']}: must be in [{lo}, {hi}] (numpy's seeds, which the run sets too)")
    if config.get("resume") and config.get("overwrite"):
        raise ConfigError("resume=true and overwrite=true contradict each other: keep a run's results, or replace them")


# ---- a run's parts, from its config ---------------------------------------------------------------------------
def check(cfg: DictConfig) -> dict[str, Any]:
    """Every value of a composed config, before anything is built: types, keys, the run's own options.

    Returns the config resolved (what ``metrics.json`` and the checkpoints record).
    """
    try:
        values = node_values(cfg)
    except OmegaConfBaseException as err:  # an interpolation that cannot be resolved; its message names the key
        raise ConfigError(str(err).strip()) from None
    check_options(values)
    check_targets({k: v for k, v in values.items() if k in GROUPS})
    derived = sorted(set(cfg.trainer) & set(STREAM_TRAINER_ARGS) - {"enable_progress_bar"})  # that one is read
    if derived:
        raise ConfigError(
            f"trainer.{derived[0]} is set by the stream (the trainer's clock is the stream's: num_tasks x "
            "epochs_per_task epochs, evaluated at each task end); set dataset.num_tasks or epochs_per_task instead"
        )
    return values


def build_parts(cfg: DictConfig) -> tuple[TaskStream, list[Any]]:
    """The stream (not yet loaded) and the method callbacks: constructors only, so their checks run first."""
    datamodule = build_part("dataset", cfg.dataset)
    method = build_part("method", cfg.method)
    callbacks = [method]
    if cfg.get("replay"):
        if isinstance(method, ExperienceReplay):
            raise ConfigError("method=er already replays: drop replay=..., or combine replay with another method")
        callbacks.append(build_part("replay", cfg.replay))
    try:
        stream_needs(callbacks)  # two methods that need incompatible things from the stream
        # hidden or mixed boundaries (a run recorded before the option had given ones)
        check_boundaries(callbacks, datamodule, cfg.get("boundaries", "given"), cfg.class_outputs)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.get("eval_every") is not None:  # continual evaluation beside the task-end one
        try:
            callbacks.append(
                ContinualEvaluation(
                    cfg.eval_every,
                    cfg.get("eval_subset", 1000),
                    cfg.get("eval_redraw", False),
                    cfg.get("eval_split", "test"),
                )
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if cfg.get("eval_split") == "val" and not datamodule.has_validation:
            raise ConfigError("eval_split=val needs validation data: set dataset.val_fraction > 0 (e.g. 0.1)")
    return datamodule, callbacks


def build_module(cfg: DictConfig, datamodule: TaskStream, method: ContinualMethod) -> ContinualClassifier:
    """The network and its LightningModule for a loaded stream; the optimizer is built once on its parameters,
    so that a value only torch checks (``optimizer.lr=-0.1``) fails here, not inside ``fit``."""
    net = build_part("model", cfg.model, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    try:
        net = method.configure_network(net, datamodule)  # e.g. HAT's per-task masks
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    module = ContinualClassifier.for_stream(
        net,
        build_part("optimizer", cfg.optimizer),
        datamodule,
        reset_optimizer=cfg.reset_optimizer,
        class_outputs=cfg.class_outputs,
        boundaries=cfg.get("boundaries", "given"),
    )
    try:
        module.configure_optimizers()
    except USER_ERRORS as err:
        raise ConfigError(name_the_key(str(err), "optimizer", node_values(cfg.optimizer))) from None
    return module


def build(cfg: DictConfig) -> tuple[TaskStream, ContinualClassifier, list[ContinualMethod]]:
    """The stream (set up: its data loaded), the module and the methods of a composed config (eval.py's).

    Raises ``LifelongError`` on bad values or data.
    """
    datamodule, callbacks = build_parts(cfg)
    load(datamodule)
    return datamodule, build_module(cfg, datamodule, callbacks[0]), callbacks


def load(datamodule: TaskStream) -> None:
    datamodule.prepare_data()
    try:
        datamodule.setup("fit")  # loads the data now: a missing file fails before anything else starts
    except ValueError as err:  # a value only the data can check (classes per task, a split too small)
        raise ConfigError(str(err)) from None


# ---- logs and Hydra's record ---------------------------------------------------------------------------------
@contextmanager
def held_file_logs() -> Iterator[None]:
    """Hold back what is logged to files (Hydra's ``train.log``) inside the block; written out if the block
    succeeds, dropped if it raises or exits, so a refused run adds nothing to the folder's log."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        yield
        return
    memory = MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False)
    memory.setLevel(min(h.level for h in files))
    for h in files:
        root.removeHandler(h)
    root.addHandler(memory)
    ok = False
    try:
        yield
        ok = True
    finally:
        root.removeHandler(memory)
        for h in files:
            root.addHandler(h)
        if ok:
            for record in memory.buffer:
                for h in files:
                    if record.levelno >= h.level:
                        h.handle(record)
        memory.buffer.clear()


def save_config(folder: Path, config: DictConfig, hydra_config: DictConfig | None) -> None:
    """Write ``.hydra/config.yaml``, ``overrides.yaml`` and ``hydra.yaml`` as Hydra does at a job's start.

    ``conf/train.yaml`` turns Hydra's own writing off (``hydra.output_subdir: null``): Hydra writes them before
    the run can check its folder, which would change a finished run's record on a refused ``resume=true``.
    """
    out = folder / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, out / "config.yaml")
    if hydra_config is not None:
        OmegaConf.save(hydra_config, out / "hydra.yaml")
        OmegaConf.save(hydra_config.hydra.overrides.task, out / "overrides.yaml")
