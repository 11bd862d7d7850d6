"""Config keys as the library reads them, without Hydra: a nested config flattened to dotted keys, how a value is
shown in a message, and the one list of keys that do not change what a run learns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys that do not change what is learnt: where the data and the outputs live, how runs are logged and shown,
# on what hardware they run. A resumed run may change them from the run that wrote its checkpoint
# (lifelong.checkpoints), and a sweep's table does not group runs by them (lifelong.metrics.summary). A key
# under one of them (``logger.save_dir`` under ``logger``) is one of them.
NOT_LEARNT = (
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
# ... and what a sweep's runs of one setting differ in: their seed (and what interpolates it)
NOT_HYPERPARAMETERS = ("seed", "dataset.seed", *NOT_LEARNT)


def under(key: str, prefix: str) -> bool:
    """Whether ``key`` is ``prefix`` or lies under it (``logger.save_dir`` under ``logger``)."""
    return key == prefix or key.startswith(prefix + ".")


def show(value: Any, quote: bool = True) -> str:
    """A value as a command-line override writes it: ``null``, ``true``, ``[400,400]``; strings quoted
    (``'abc'``, to tell them from numbers) unless ``quote=False``; long ones cut."""
    if isinstance(value, list):
        text = "[" + ",".join(show(v, quote) for v in value) + "]"
    elif value is None or isinstance(value, bool):
        text = {None: "null", True: "true", False: "false"}[value]
    else:
        text = repr(value) if quote and isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"method.ewc_lambda": 100, ...}`` (an empty mapping has no keys)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, Mapping) else {key: v})
    return out
