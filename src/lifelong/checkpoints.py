"""Reading a checkpoint once, before ``fit``, and checking that it belongs to the run about to resume it.

Lightning resumes whatever it is given: a checkpoint of another method loads with a warning about callbacks
it cannot place (and the run then writes another method's name over the first one's results), one of another
network fails deep inside ``load_state_dict``, and a damaged file fails inside ``torch.load``.
`check_checkpoint` compares the checkpoint with the run - its recorded configuration, its stream, the
methods that hold state, the network's parameters - and names the first difference and how to proceed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lifelong.data.streams import TaskStream
from lifelong.errors import ResumeError
from lifelong.keys import NOT_LEARNT, flatten, show, under

LIGHTNING_KEYS = ("state_dict", "epoch", "loops", "callbacks")
MAX_LISTED = 4  # differences named in one message


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU as ``Trainer.fit`` loads it (tensors and plain values only).

    Raises:
        ResumeError: the path is not a file; `UnreadableCheckpoint`: the file cannot be read, or it is not
            a Lightning checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise ResumeError(f"ckpt_path={path} is not a file. Point it at a checkpoint, e.g. RUN/checkpoints/last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and torch's own errors differ with the damage
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        raise UnreadableCheckpoint(
            f"ckpt_path={path} could not be read as a checkpoint ({type(err).__name__}: {reason[:160]}): the file "
            "is damaged (cut short by a full disk or a killed copy) or is not a checkpoint. Resume from another "
            f"checkpoint of the run (e.g. {p.parent}/task_K.ckpt) or start a new run",
            f"it cannot be read as a checkpoint ({type(err).__name__}: {reason[:160]})",
        ) from None
    missing = [k for k in LIGHTNING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        held = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else f"the keys {sorted(ckpt)[:8]}"
        raise UnreadableCheckpoint(
            f"ckpt_path={path} is not a Lightning checkpoint written by lifelong (it holds {held}, without "
            f"{missing}). Point it at a checkpoint of a run, e.g. RUN/checkpoints/last.ckpt",
            f"it is not a Lightning checkpoint (it holds {held}, without {missing})",
        )
    return ckpt


class UnreadableCheckpoint(ResumeError):
    """A file that cannot be read as a Lightning checkpoint; ``reason`` says why, without the advice."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_checkpoint(
    ckpt: Mapping[str, Any],
    path: str | Path,
    trainer: L.Trainer,
    module: L.LightningModule,
    stream: TaskStream,
    info: Mapping[str, Any] | None = None,
    may_differ: Iterable[str] = NOT_LEARNT,
    where: str | None = None,
) -> None:
    """Raise `ResumeError` unless ``ckpt`` was written by the run that ``trainer`` is about to fit.

    In order, the first that differs is reported: the configuration recorded in the checkpoint
    (``ckpt["lifelong"]["info"]["config"]``, against ``info["config"]``; keys under ``may_differ``, such as the
    hardware, may change between the two, and keys only one side has are options added or removed since), the
    stream (its seed, tasks, scenario, permutations), the callbacks that hold state (the methods), and the
    network's parameter names and shapes. ``where`` names the checkpoint in messages (default
    ``ckpt_path=PATH``).
    """
    where = where or f"ckpt_path={path}"
    saved_info = ckpt.get("lifelong", {}).get("info", {})
    if info is not None and "config" in saved_info and "config" in info:
        _check_config(where, saved_info, info, tuple(may_differ))
    key = type(stream).__qualname__
    if key not in ckpt:
        other = [k for k in ckpt if k.endswith("Stream")]
        raise ResumeError(
            f"{where} was written for another task stream ({other[0] if other else 'none recorded'}, this run has "
            f"a {key}): resume it with the dataset= of the run that wrote it, or start a new run"
        )
    stream.check_state(ckpt[key])
    _check_callbacks(where, ckpt["callbacks"], trainer)
    _check_network(where, ckpt["state_dict"], module.state_dict(), saved_info.get("model"))


def _check_config(where: str, saved: Mapping[str, Any], info: Mapping[str, Any], may_differ: tuple[str, ...]) -> None:
    there, here = flatten(saved["config"]), flatten(info["config"])
    groups = [g for g in ("method", "dataset", "model", "optimizer") if saved.get(g) != info.get(g)]
    diffs = [f"{g}={saved.get(g)} there, {g}={info.get(g)} here" for g in groups]
    settings = [f"{g}={str(saved.get(g)).split('+')[0]}" for g in groups]  # "ewc+reservoir": method=ewc replay=...
    for k in sorted(there.keys() & here.keys()):
        if there[k] == here[k] or any(under(k, p) for p in (*may_differ, *groups)):
            continue
        diffs.append(f"{k}={show(there[k], quote=False)} there, {show(here[k], quote=False)} here")
        settings.append(f"{k}={show(there[k], quote=False)}")
    if not diffs:
        return
    raise ResumeError(
        f"{where} belongs to another run: {_listed(diffs)}. To resume it, run with the settings it was written "
        f"with ({' '.join(settings[:MAX_LISTED])}); for a run of your own settings, choose a new output folder "
        "(hydra.run.dir=NEW) without resume or ckpt_path"
    )


def _listed(diffs: list[str]) -> str:
    more = len(diffs) - MAX_LISTED
    return "; ".join(diffs[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _check_callbacks(where: str, saved: Mapping[str, Any], trainer: L.Trainer) -> None:
    """The checkpoint's callback states (Lightning's ``state_key``) against this run's callbacks: state of a
    callback this run lacks (another method's), or a stateful method of this run with none saved."""
    ours = {cb.state_key: cb for cb in trainer.callbacks}  # type: ignore[attr-defined]
    foreign = [k for k in saved if k not in ours and not k.startswith("ModelCheckpoint")]
    if foreign:
        raise ResumeError(
            f"{where} holds the state of {', '.join(foreign)}, which this run does not have: it was written with "
            "another method (or replay=...). Resume it with the method it was written with, or start a new run"
        )
    from lifelong.methods import ContinualMethod  # the methods import the data and models packages

    lacking = [k for k, cb in ours.items() if isinstance(cb, ContinualMethod) and k not in saved and cb.state_dict()]
    if lacking:
        raise ResumeError(
            f"{where} holds no state of {', '.join(lacking)}, which this run uses: it was written with another "
            "method. Resume it with the method it was written with, or start a new run"
        )


def _check_network(where: str, saved: Mapping[str, Any], ours: Mapping[str, Any], model: str | None) -> None:
    missing = [k for k in ours if k not in saved]
    unexpected = [k for k in saved if k not in ours]
    shapes = [
        f"{k} is {tuple(saved[k].shape)} there, {tuple(v.shape)} here"
        for k, v in ours.items()
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)
    ]
    diffs = [*shapes, *(f"{k} is missing there" for k in missing), *(f"{k} is not in this run's" for k in unexpected)]
    if diffs:
        listed = _listed(diffs)
        written = f" (written with model={model})" if model else ""
        raise ResumeError(
            f"{where} holds another network than this run's{written}: {listed}. Resume it with the model options "
            "it was written with, or start a new run"
        )
