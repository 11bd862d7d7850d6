"""Faults while writing: a filesystem that fills up, and an ``OSError`` injected into each writer of a run.

Each ends in one ``error:`` line naming the file and the system's words, exit 2, every earlier checkpoint and
result intact, and ``resume=true`` finishes the run to the matrix of an uninterrupted one. The full
filesystem is a real tmpfs mounted for the test (skipped, with the reason, where the machine does not allow
mounting).
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
from pathlib import Path

import pytest
import torch

from lifelong.checkpoints import read_checkpoint
from tests.conftest import QUIET, compose_run, read_metrics, refused_run, run_train

STREAM = ["dataset.num_tasks=3", "dataset.max_train_samples=1000", "dataset.max_test_samples=500"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_root) -> dict:
    """The stream run without a fault: what every resumed run must end at (its metrics, and ``ckpt_bytes``, the
    size of its first task checkpoint)."""
    run = tmp_path_factory.mktemp("whole")
    metrics = compose_run([f"dataset.root={mnist_root}", *STREAM, "logger=none"], run)
    return {**metrics, "ckpt_bytes": (run / "checkpoints" / "task_1.ckpt").stat().st_size}


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs mounted at ``tmp_path/fs``; yields a function that sets its size in bytes."""
    mount = tmp_path / "fs"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here ({proc.stderr.strip() or 'mount failed'}); run as root to test")

    def resize(size: int) -> Path:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)
        return mount

    yield resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem refuses; returns the filler file (delete it to free)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _intact(run: Path) -> list[str]:
    """The run's checkpoints, each read as resume reads it (a damaged one raises)."""
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    for name in names:
        read_checkpoint(run / "checkpoints" / name)
    return names


@pytest.mark.integration
def test_a_full_disk_during_a_checkpoint_write(tmp_path, small_fs, mnist_root, uninterrupted):
    """train.py as a user runs it, on a filesystem with room for two checkpoints and a half: the third, task
    2's, is refused. Then the disk is grown, and resume=true finishes the stream."""
    args = [f"dataset.root={mnist_root}", *STREAM, *QUIET]
    size = uninterrupted["ckpt_bytes"]
    run = small_fs(2 * size + size // 2) / "run"
    proc = run_train(args, run, env={"LIFELONG_DATA_DIR": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
    assert f"could not write {run / 'checkpoints' / 'task_2.ckpt'}: No space left on device" in errors[0]
    assert "resume=true" in errors[0]
    assert _intact(run) == ["last.ckpt", "task_1.ckpt"]  # the refused one left nothing, not even a temporary file
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "task_1.ckpt"]
    assert not (run / "metrics.json").exists()

    small_fs(200 * 2**20)
    resumed = run_train([*args, "resume=true"], run, env={"LIFELONG_DATA_DIR": ""})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(run)["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


@pytest.mark.integration
def test_a_full_disk_under_ddp(tmp_path, small_fs, mnist_root, uninterrupted):
    """The same fault under data-parallel training (2 processes, gloo): rank 0's refused write stops both ranks
    (no rank left waiting at a collective), with the one message, and the resumed run ends at the matrix of an
    uninterrupted 2-process run."""
    args = [f"dataset.root={mnist_root}", *STREAM, *QUIET, "trainer=ddp_cpu", "logger=none"]
    env = {"LIFELONG_DATA_DIR": "", "OMP_NUM_THREADS": "1"}
    size = uninterrupted["ckpt_bytes"]
    run = small_fs(2 * size + size // 2) / "run"
    proc = run_train(args, run, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: could not write {run / 'checkpoints' / 'task_2.ckpt'}: No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr and _intact(run) == ["last.ckpt", "task_1.ckpt"]
    small_fs(200 * 2**20)
    assert run_train([*args, "resume=true"], run, env=env, timeout=300).returncode == 0
    whole = tmp_path / "whole"
    assert run_train(args, whole, env=env, timeout=300).returncode == 0
    assert read_metrics(run)["accuracy_matrix"] == read_metrics(whole)["accuracy_matrix"]


@pytest.mark.integration
def test_a_full_disk_while_the_results_are_written(tmp_path, small_fs, mnist_root, uninterrupted, capsys, monkeypatch):
    """The disk fills up just before the results are written (the training is done, the checkpoints kept)."""
    from lifelong.callbacks import StreamReport

    run = small_fs(120 * 2**20) / "run"
    write = StreamReport._write
    filled: list[Path] = []

    def fill_then_write(self, *args, **kwargs):
        if not filled:
            filled.append(_fill(run.parent))
        return write(self, *args, **kwargs)

    monkeypatch.setattr(StreamReport, "_write", fill_then_write)
    overrides = [f"dataset.root={mnist_root}", *STREAM]  # the default logger (TensorBoard) writes there too
    message = refused_run(overrides, run, capsys)
    assert f"could not write {run / 'accuracy_matrix.csv'}: No space left on device" in message
    assert _intact(run) == ["last.ckpt", "task_1.ckpt", "task_2.ckpt", "task_3.ckpt"]
    assert not any((run / name).exists() for name in ("metrics.json", "accuracy_matrix.csv"))
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    filled[0].unlink()
    assert compose_run([*overrides, "resume=true"], run)["accuracy_matrix"] == uninterrupted["accuracy_matrix"]


def test_resume_passes_over_a_damaged_last_checkpoint(tmp_path, mnist_root, uninterrupted, caplog):
    """``last.ckpt`` cut short (an older writer, a killed copy): resume=true takes the newest intact one."""
    import logging

    run = tmp_path / "run"
    overrides = [f"dataset.root={mnist_root}", *STREAM, "logger=none"]
    compose_run(overrides, run)
    (run / "metrics.json").unlink()  # as if killed after task 2: its checkpoints only
    (run / "checkpoints" / "task_3.ckpt").unlink()
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    stale = run / "checkpoints" / ".task_3.ckpt.k3j2h1g0.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.INFO):
        metrics = compose_run([*overrides, "resume=true"], run)
    assert not stale.exists() and f"removed {stale}" in caplog.text
    assert f"passing over {last}: it cannot be read as a checkpoint" in caplog.text
    assert f"resuming the stream from {run / 'checkpoints' / 'task_2.ckpt'} (instead of last.ckpt" in caplog.text
    assert metrics["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    torch.load(last, weights_only=True)  # written again, whole


# ---- an OSError injected into each writer -------------------------------------------------------------------
def _once(exc: BaseException, original, when=lambda *a, **k: True):
    """``original``, except that the first call for which ``when`` holds raises ``exc``."""
    raised: list[bool] = []

    def call(*args, **kwargs):
        if not raised and when(*args, **kwargs):
            raised.append(True)
            raise exc
        return original(*args, **kwargs)

    return call


def _eio(name: str = "") -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO), *([name] if name else []))


def _replace_fails_for(monkeypatch, name: str) -> None:
    """The rename that puts a finished file in place fails (an I/O error) for the file called ``name``."""
    from lifelong import files

    monkeypatch.setattr(files.os, "replace", _once(_eio(), os.replace, lambda src, dst: Path(dst).name == name))


def _hydra_config(monkeypatch) -> None:
    from lifelong import cli

    save = cli.OmegaConf.save
    monkeypatch.setattr(
        cli.OmegaConf, "save", _once(_eio("config.yaml"), save, lambda cfg, f, **k: Path(f).name == "config.yaml")
    )


def _tensorboard(monkeypatch) -> None:
    from torch.utils.tensorboard.writer import SummaryWriter

    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # TensorBoard's own: no file named
    monkeypatch.setattr(SummaryWriter, "add_scalar", _once(no_space, SummaryWriter.add_scalar))


def _csv(monkeypatch) -> None:
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(_ExperimentWriter, "save", _once(no_space, _ExperimentWriter.save))


def _mlflow(monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    full = MlflowException("(sqlite3.OperationalError) database or disk is full")  # how SQLite says it
    monkeypatch.setattr(MlflowClient, "log_batch", _once(full, MlflowClient.log_batch))


def _wandb(monkeypatch) -> None:
    from wandb.sdk.wandb_run import Run

    monkeypatch.setattr(Run, "log", _once(_eio(), Run.log))


WRITERS = {
    # name: (inject, extra overrides, what the message names (RUN: the run folder))
    "checkpoint": (lambda mp: _replace_fails_for(mp, "task_2.ckpt"), [], "RUN/checkpoints/task_2.ckpt"),
    "accuracy_matrix.csv": (lambda mp: _replace_fails_for(mp, "accuracy_matrix.csv"), [], "RUN/accuracy_matrix.csv"),
    "figure": (lambda mp: _replace_fails_for(mp, "accuracy_curves.png"), [], "RUN/accuracy_curves.png"),
    "metrics.json": (lambda mp: _replace_fails_for(mp, "metrics.json"), [], "RUN/metrics.json"),
    "hydra config": (_hydra_config, [], "config.yaml"),
    "tensorboard": (_tensorboard, ["logger=tensorboard"], "the TensorBoard events in RUN/tensorboard"),
    "csv": (_csv, ["logger=csv"], "RUN/csv/metrics.csv"),
    "mlflow": (_mlflow, ["logger=mlflow", "logger.store=MLRUNS"], "the MLflow store sqlite:///MLRUNS/mlflow.db"),
    "wandb": (_wandb, ["logger=wandb"], "the W&B run in RUN/wandb"),
}


@pytest.mark.integration
@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_injected_os_error_in_each_writer(writer, tmp_path, mnist_root, uninterrupted, capsys, monkeypatch):
    inject, extra, named = WRITERS[writer]
    run, store = tmp_path / "run", tmp_path / "mlruns"
    monkeypatch.setenv("WANDB_MODE", "offline")
    extra = [e.replace("MLRUNS", str(store)) for e in extra]
    overrides = [f"dataset.root={mnist_root}", *STREAM, "logger=none", *extra]
    inject(monkeypatch)
    message = refused_run(overrides, run, capsys)
    named = named.replace("MLRUNS", str(store)).replace("RUN", str(run))
    assert f"could not write {named}" in message, message
    assert ("Input/output error" in message) or ("No space left on device" in message) or ("disk is full" in message)
    before = _intact(run) if (run / "checkpoints").exists() else []
    if writer == "metrics.json":
        assert (run / "accuracy_matrix.csv").is_file() and not (run / "metrics.json").exists()
    assert not [p for p in run.rglob("*.tmp")]

    metrics = compose_run([*overrides, "resume=true"], run)
    assert metrics["accuracy_matrix"] == uninterrupted["accuracy_matrix"]
    assert set(before) <= set(_intact(run))


class _Refusing(io.StringIO):
    def write(self, text: str) -> int:
        raise _eio()


def test_a_log_file_that_cannot_be_written_is_said_once(tmp_path, capsys):
    """train.log on a full disk: one warning, the handler dropped, no '--- Logging error ---' per line."""
    import logging

    from lifelong.logs import guard_log_files

    handler = logging.FileHandler(tmp_path / "train.log", delay=True)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        guard_log_files()
        handler.stream = _Refusing()
        for i in range(3):
            logging.getLogger("lifelong").warning(f"line {i}")
    finally:
        root.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err.count(f"warning: the log file {tmp_path / 'train.log'} cannot be written (Input/output error)") == 1
    assert "Logging error" not in err and "Traceback" not in err


def test_summarize_names_the_file_it_cannot_write(tmp_path, monkeypatch, capsys):
    """``scripts/summarize.py``'s table: the same atomic write, one message, exit 2, no half-written CSV."""
    from lifelong.metrics.summary import main

    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(
        '{"method": "ewc", "dataset": "permuted_mnist", "seed": 0, "num_tasks": 1, "scenario": "domain", '
        '"accuracy_matrix": [[0.9]], "avg_accuracy": 0.9, "bwt": 0.0, "forgetting": 0.0}'
    )
    _replace_fails_for(monkeypatch, "summary.csv")
    assert main([str(tmp_path / "sweep")]) == 2
    assert f"error: could not write {tmp_path / 'sweep' / 'summary.csv'}: Input/output error" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0"]


def test_decompressing_data_onto_a_full_disk_names_the_file(tmp_path, small_fs, monkeypatch):
    """Debian's Fashion-MNIST .gz files decompressed into a data folder that fills up: one WriteError naming the
    file, no half-written IDX file left to be taken for a good one."""
    from lifelong.data import load_image_dataset, sources
    from lifelong.errors import WriteError
    from tests.conftest import write_idx

    system = tmp_path / "system"
    write_idx(system / "fashion-mnist", n=400, gz=True)  # 400 x 784 bytes of training images: more than fits
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (system,))
    monkeypatch.setenv(sources.ENV_VAR, "")
    root = small_fs(128 * 1024) / "data"
    with pytest.raises(WriteError, match="No space left on device") as err:
        load_image_dataset("fashion_mnist", root, download=False)
    raw = root / "FashionMNIST" / "raw"
    assert err.value.path == str(raw / "train-images-idx3-ubyte")
    assert not any(p.name.startswith("train-images") for p in raw.iterdir())


def test_a_read_only_data_folder_decompresses_into_the_cache(tmp_path, small_fs, monkeypatch):
    """A read-only dataset.root (EROFS, which root's permissions cannot bypass) is passed over for the cache."""
    from lifelong.data import load_image_dataset, sources
    from tests.conftest import write_idx

    system = tmp_path / "system"
    write_idx(system / "fashion-mnist", gz=True)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (system,))
    monkeypatch.setenv(sources.ENV_VAR, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mount = small_fs(1024 * 1024)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    train, _ = load_image_dataset("fashion_mnist", mount / "data", download=False)
    assert len(train) == 20
    assert (tmp_path / "cache" / "lifelong" / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
