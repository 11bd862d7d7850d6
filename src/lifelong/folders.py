"""A run's folder: what it holds, what a new run may do in it, and which checkpoint a resumed run continues from.

The same planning for ``train.py`` and the library's [`lifelong.train_stream`][lifelong.run.train_stream] (through
[`lifelong.run.StreamRun`][lifelong.run.StreamRun]): a folder holding a finished run is not overwritten unless asked, an
unfinished one is resumed or refused, and nothing is touched before every check passed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from lifelong.checkpoints import UnreadableCheckpoint, read_checkpoint
from lifelong.errors import ResumeError, RunFolderError
from lifelong.files import remove_stale_temporaries

log = logging.getLogger(__name__)

# What a run writes into its folder, and what overwrite=true removes (conf/logger's folders included; an
# MLflow store is shared by runs and lies outside it)
RESULT_FILES = ("metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curves.png")
RESULT_DIRS = ("checkpoints", "tensorboard", "csv", "wandb")

FolderState = Literal["empty", "unfinished", "finished"]


def folder_state(folder: Path) -> FolderState:
    """``finished`` when a run's results are there (metrics.json is written last), ``unfinished`` when only its
    checkpoints are, else ``empty``."""
    if (folder / "metrics.json").is_file():
        return "finished"
    if any((folder / "checkpoints").glob("*.ckpt")):
        return "unfinished"
    return "empty"


def finished_run(folder: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json`` ({} if it cannot be read)."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _summary(folder: Path) -> str:
    m = finished_run(folder)
    what = " on ".join(str(m[k]) for k in ("method", "dataset") if m.get(k))
    if m.get("seed") is not None:
        what += f", seed {m['seed']}"
    if isinstance(m.get("avg_accuracy"), (int, float)):
        what += f": average accuracy {100 * m['avg_accuracy']:.2f} %"
    return f" ({what.strip(', ')})" if what else ""


class RunComplete(RunFolderError):
    """``resume=true`` on a run that already finished."""


def plan_folder(folder: Path, *, resume: bool, overwrite: bool, ckpt_path: str | None) -> FolderState:
    """Decide what a run may do in ``folder``, before it writes anything; returns the folder's state.

    - empty: go.
    - unfinished (checkpoints, no results): ``resume=true`` continues it; otherwise refused, since a new run
      would write over its checkpoints, unless ``overwrite=true``.
    - finished: ``resume=true`` raises `RunFolderError` saying it is complete (nothing is touched);
      otherwise refused unless ``overwrite=true``.

    With ``overwrite=true`` the caller clears the previous results (`clear_results`) once every check passed.
    """
    state = folder_state(folder)
    if state == "finished" and resume:
        raise RunComplete(
            f"{folder} holds a finished run{_summary(folder)}: there is nothing to resume, and its files are left "
            "as they were. To train it again, choose a new folder (hydra.run.dir=NEW), or add overwrite=true "
            "instead of resume=true to replace its results"
        )
    if state == "empty" or (state == "unfinished" and resume):
        return state
    if not overwrite:
        finished = state == "finished"
        held = f"the results of a finished run{_summary(folder)}" if finished else "an unfinished run's checkpoints"
        proceed = "" if finished else "add resume=true to continue it, "
        raise RunFolderError(
            f"{folder} already holds {held}, which this run would overwrite: {proceed}choose a new folder "
            "(hydra.run.dir=NEW), or add overwrite=true to replace them"
        )
    if ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to((folder / "checkpoints").resolve()):
        raise RunFolderError(
            f"ckpt_path={ckpt_path} lies in the folder that overwrite=true would clear: copy it elsewhere first, "
            "or write the new run to another folder (hydra.run.dir=NEW)"
        )
    return state


def clear_results(folder: Path) -> None:
    """Remove the results a run writes (``overwrite=true``), and nothing else of the folder."""
    for name in RESULT_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RESULT_DIRS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def checkpoint_to_resume(
    folder: Path, state: FolderState, *, resume: bool, ckpt_path: str | None
) -> tuple[str, dict[str, Any]] | None:
    """``ckpt_path`` if given, else with ``resume`` the folder's newest intact checkpoint; with it read.

    The newest is ``last.ckpt`` unless a write was refused or the run was killed before it was replaced; a
    checkpoint that cannot be read (cut short by a full disk or a killed copy) is passed over, with a warning
    naming it, for the next newest.
    """
    if ckpt_path is not None:
        return str(ckpt_path), read_checkpoint(ckpt_path)
    if not resume:
        return None
    if state == "empty":
        log.info(f"resume=true: no checkpoint in {folder / 'checkpoints'} yet, starting the stream from the start")
        return None
    # newest first; at equal times last.ckpt, which is written after the task checkpoint of the same epoch
    candidates = sorted(
        (folder / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt")
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
        f"resume=true: none of the checkpoints in {folder / 'checkpoints'} can be read ({', '.join(passed_over)}): "
        "start the run again in a new folder (hydra.run.dir=NEW), or with overwrite=true"
    )


def begin(folder: Path, state: FolderState, *, overwrite: bool) -> None:
    """Once every check passed (rank 0): clear a previous run's results if ``overwrite`` asked for it, and remove
    the temporary files a killed write left behind."""
    if overwrite and state != "empty":
        clear_results(folder)
    for where in (folder, folder / "checkpoints"):
        for stale in remove_stale_temporaries(where):
            log.info(f"removed {stale}, the temporary file of a write that did not finish")
