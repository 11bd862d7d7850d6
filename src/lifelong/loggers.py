"""The run's loggers: TensorBoard and CSV, and the experiment trackers Weights & Biases and MLflow, local unless
told otherwise.

Each is Lightning's logger, whose writes the operating system may refuse (a full disk): such a failure raises
[`WriteError`][lifelong.errors.WriteError] naming where the logger writes (`names_its_files`), instead of an
``OSError`` without a file name from deep inside the library, or from TensorBoard's writer thread at the end.

- ``logger=wandb`` (`WandbStreamLogger`): a W&B run in the run folder (``RUN/wandb/``), **offline** unless
  you are logged in (``wandb login``, or ``WANDB_API_KEY``) or ``WANDB_MODE`` says otherwise. Upload an offline run
  later with ``wandb sync RUN/wandb/offline-run-*``.
- ``logger=mlflow`` (`MLflowStreamLogger`): an MLflow run in a local tracking store, the folder ``mlruns/``
  of the working directory (a SQLite database beside the runs' artifacts), unless ``MLFLOW_TRACKING_URI`` names
  another store or a server. Browse it with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`` (the
  server comes with the full ``mlflow`` package; lifelong needs only ``mlflow-skinny``).

Every logger receives the same record (`log_config` at the start, `log_results` at the end): the
per-step training metrics and, after each task, ``test/acc/task_<j>`` (a row of the accuracy matrix) and
``val/acc/task_<j>``; the run's resolved config as hyperparameters; the summary metrics (``test/avg_accuracy``,
...) and the two figures; for MLflow also the result files as artifacts. The run folder's files stay the
record of the run: a tracker that fails to take the results is reported and the run still completes.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from typing_extensions import override

from lifelong.errors import ConfigError
from lifelong.files import refused_write, write_error

log = logging.getLogger(__name__)

LoggerT = TypeVar("LoggerT", bound=type[Logger])
WRITING_METHODS = ("log_hyperparams", "log_metrics", "save", "finalize")  # the Logger methods that write


def names_its_files(where: Callable[[Any], str]) -> Callable[[LoggerT], LoggerT]:
    """A class decorator: a write of the logger's that the system refuses raises a ``WriteError`` naming
    ``where(logger)`` (its folder or store), unless the error names its file itself.

    ``finalize`` of a run that failed already (status other than ``"success"``) only logs its own failure, so
    that the error that stopped the run is the one reported.
    """

    def decorate(cls: LoggerT) -> LoggerT:
        for name in WRITING_METHODS:
            original = getattr(cls, name)

            @functools.wraps(original)
            def method(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                try:
                    return _original(self, *args, **kwargs)
                except Exception as err:
                    cause = _refused_in_chain(err)  # Lightning's TensorBoard logger wraps it in a ValueError
                    if cause is None:
                        raise
                    error = write_error(cause, getattr(cause, "filename", None) or where(self))
                    status = args[0] if args else kwargs.get("status", "success")
                    if _name == "finalize" and status != "success":
                        log.warning(f"{error} (while the run was stopping)")
                        return None
                    raise error from None

            setattr(cls, name, method)
        return cls

    return decorate


def _refused_in_chain(err: BaseException | None) -> BaseException | None:
    """The refused write ([`refused_write`][lifelong.files.refused_write]) that ``err`` is, or that caused it."""
    seen = 0
    while err is not None and seen < 8:
        if refused_write(err):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@names_its_files(lambda logger: f"the TensorBoard events in {logger.log_dir}")
class TensorBoardStreamLogger(TensorBoardLogger):
    """Lightning's `TensorBoardLogger`; a refused write names its folder."""


@names_its_files(lambda logger: str(Path(logger.log_dir) / "metrics.csv"))
class CSVStreamLogger(CSVLogger):
    """Lightning's `CSVLogger`; a refused write names its file."""


def _require(module: str, extra: str) -> None:
    """A tracker's package, or a message saying how to install it (``logger=wandb`` without W&B installed)."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"logger={extra} needs the {module} package, which is not installed: pip install 'lifelong[{extra}]' "
            "(make install installs it), or choose another logger (logger=tensorboard, csv or none)"
        )


def wandb_offline() -> bool:
    """Whether a W&B run should stay offline: yes unless an API key is configured (``WANDB_API_KEY``, or the
    netrc entry ``wandb login`` writes). ``WANDB_MODE``, when set, is left to decide (W&B reads it)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return False
    try:  # not wandb.login(prompt=False): it leaves W&B requiring a key for the offline run that follows
        import wandb
        from wandb.sdk.lib.wbauth import wbnetrc

        return wbnetrc.read_netrc_auth(host=wandb.Settings().base_url) is None
    except Exception:  # another W&B version's internals: stay offline, so nothing leaves the machine unasked
        return True


@names_its_files(lambda logger: f"the W&B run in {Path(logger.save_dir or '.') / 'wandb'}")
class WandbStreamLogger(WandbLogger):
    """Lightning's `WandbLogger`, offline unless you are logged in.

    The W&B run is finished when the stream ends, so that the next job of a sweep run in the same process (the
    joblib launcher reuses its workers) starts a run of its own instead of writing into this one.

    Args:
        save_dir: the folder W&B writes its ``wandb/`` folder to (the run folder).
        project: the W&B project.
        name: the W&B run's name.
        offline: ``None`` (default): offline unless logged in (`wandb_offline`).
        **kwargs: other arguments of ``WandbLogger`` and ``wandb.init`` (``entity``, ``group``, ``tags``, ...).
    """

    def __init__(
        self,
        save_dir: str,
        project: str = "lifelong",
        name: str | None = None,
        offline: bool | None = None,
        **kwargs: Any,
    ) -> None:
        _require("wandb", "wandb")
        import wandb

        offline = wandb_offline() if offline is None else offline
        kwargs.setdefault(
            "settings", wandb.Settings(silent=True)
        )  # not its 40-line summary in the log: ours says where
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]  # W&B warns on every run that the setting has no effect

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            run_dir = Path(self._experiment.dir).parent
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None
            if self._offline:
                log.info(f"W&B run kept offline in {run_dir}: upload it with: wandb sync {run_dir}")


@names_its_files(lambda logger: f"the MLflow store {logger._tracking_uri}")
class MLflowStreamLogger(MLFlowLogger):
    """Lightning's `MLFlowLogger` with a local store by default.

    MLflow 3 refuses its old folder-of-files store; the local default here is what MLflow itself uses, a SQLite
    database, kept in the folder ``store`` with the runs' artifacts beside it.

    Args:
        experiment_name: the MLflow experiment.
        run_name: the MLflow run's name.
        tracking_uri: a store or server; default: ``MLFLOW_TRACKING_URI`` if set, else the SQLite store in ``store``.
        store: the local tracking folder (relative to the working directory), used when no tracking URI is given.
        **kwargs: other arguments of ``MLFlowLogger`` (``tags``, ``artifact_location``, ...).
    """

    def __init__(
        self,
        experiment_name: str = "lifelong",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        store: str = "mlruns",
        **kwargs: Any,
    ) -> None:
        _require("mlflow", "mlflow")
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            _require("sqlalchemy", "mlflow")  # MLflow's SQLite store
            folder = Path(store).absolute()
            folder.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
            kwargs.setdefault("artifact_location", (folder / "artifacts").as_uri())
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri, **kwargs)

    @override
    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        super().finalize(status)
        if self._initialized:
            uri = self._tracking_uri
            browse = f"; to browse it: mlflow ui --backend-store-uri {uri} (the full mlflow package)"
            log.info(f"MLflow run {self.run_id} in {uri}" + (browse if uri.startswith("sqlite:") else ""))


def log_config(loggers: Iterable[Logger], info: Mapping[str, Any]) -> None:
    """The run's identity (method, dataset, seed, ...) and resolved config, as every logger's hyperparameters."""
    params = {"run": {k: v for k, v in info.items() if k != "config"}, "config": info.get("config", {})}
    for logger in loggers:
        logger.log_hyperparams(params)


def log_results(
    loggers: Iterable[Logger],
    scalars: Mapping[str, float],
    figures: Mapping[str, Figure],
    files: Iterable[Path],
    step: int,
) -> None:
    """The end of a stream, in each logger: the summary ``scalars`` and the ``figures`` (TensorBoard, W&B), or
    the result ``files`` (MLflow artifacts, the figures among them). Failures are logged, not raised: the run
    folder holds the results already."""
    files = list(files)
    for logger in loggers:
        try:
            logger.log_metrics(dict(scalars), step)
            if isinstance(logger, TensorBoardLogger):
                for name, fig in figures.items():
                    logger.experiment.add_figure(name, fig, global_step=step, close=False)
                logger.experiment.flush()
            elif isinstance(logger, WandbLogger):
                for name, fig in figures.items():
                    logger.log_image(key=name, images=[fig], step=step)
            elif isinstance(logger, MLFlowLogger):
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path))
        except Exception as err:  # a tracker's server or disk; the results are on disk whatever it says
            log.warning(f"{type(logger).__name__} did not take the run's results ({type(err).__name__}: {err})")
