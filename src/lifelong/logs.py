"""What a run prints: its own lines, not Lightning's advertising or warnings we know to be harmless.

A run whose output goes to a file (a cluster job, ``make train > log``) should read as a log: a few lines at the
start, one per task, the results. `quiet_lightning` is called by the entry points (``train.py``,
``eval.py``), not on import, so that the library leaves a user's own logging and warnings alone.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

# Lightning's start-up chatter (rank_zero_info): hardware lines that the config already states, and tips
# advertising Lightning's cloud products
LIGHTNING_CHATTER = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "LOCAL_RANK:",
    "`Trainer.fit` stopped:",
)
_CHATTY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)

# Warnings that say nothing about the user's run
KNOWN_WARNINGS = (
    # Lightning 2.6's own use of a torch API that newer torch deprecates
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # ModelCheckpoint on a resumed run's folder: train.py decides what a run may do with its folder (plan_folder)
    r"Checkpoint directory .* exists and is not empty",
)


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_CHATTER)


_DROP_CHATTER = _DropChatter()


def quiet_lightning() -> None:
    """Drop Lightning's tips and hardware lines and the known-harmless warnings (idempotent)."""
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_CHATTER not in logger.filters:
            logger.addFilter(_DROP_CHATTER)
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def guard_log_files() -> None:
    """A log file that cannot be written (a full disk, a read-only folder) is reported in one line and dropped,
    instead of Python's ``--- Logging error ---`` and a traceback at every line logged; the console keeps the log.
    """
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handleError = _drop_handler(handler)  # type: ignore[method-assign, assignment]


def _drop_handler(handler: logging.FileHandler) -> Callable[[logging.LogRecord], None]:
    def handle_error(record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            logging.Handler.handleError(handler, record)  # a bug in a log call: Python's own report
            return
        logging.getLogger().removeHandler(handler)
        reason = err.strerror or str(err)
        print(
            f"warning: the log file {handler.baseFilename} cannot be written ({reason}); logging to the console only",
            file=sys.stderr,
            flush=True,
        )

    return handle_error
