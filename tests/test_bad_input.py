"""Plausible mistakes, made as a user makes them, against a real run's folder.

Each is refused before anything trains, with exit status 2, one message that names what is wrong, no
traceback, and every file that was there before byte for byte as it was. The composed config is run in this
process, as train.py runs it (``refused_run``: no interpreter to start per case); a few cases run train.py
itself in a subprocess, for the exit status and the folder's train.log that Hydra holds open there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, load_checkpoint, read_metrics, refused_run, run_train

pytestmark = pytest.mark.integration


def _args(root: Path) -> list[str]:
    small = ["dataset.num_tasks=2", "dataset.max_train_samples=500", "dataset.max_test_samples=500"]
    return [f"dataset.root={root}", *small, "logger=none", *QUIET]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and the SHA-256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root) -> Path:
    """A finished run of the default method (EWC) on 2 small permuted-MNIST tasks."""
    run = tmp_path_factory.mktemp("bad_input") / "finished"
    proc = run_train(_args(mnist_root), run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def unfinished(tmp_path, finished) -> Path:
    """The same run as if killed during task 2: its checkpoints up to task 1, no results."""
    run = tmp_path / "unfinished"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(finished / ".hydra", run / ".hydra")
    for name in ("task_1.ckpt", "last.ckpt"):
        shutil.copy(finished / "checkpoints" / "task_1.ckpt", run / "checkpoints" / name)
    return run


def refused_here(overrides: list[str], run_dir: Path, capsys, *phrases: str) -> None:
    """``overrides`` composed and run in this process: refused with one ``error:`` line holding ``phrases``."""
    line = refused_run(overrides, run_dir, capsys)
    for phrase in phrases:
        assert phrase in line, line


def refused(proc, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error: ") :]
    assert message.count("\n") == 1, message  # one line
    for phrase in phrases:
        assert phrase in message, message


# ---- values that only torch, numpy or Lightning would have checked, inside fit ---------------------------------
VALUES = [
    (["optimizer.lr=-0.1"], ["optimizer.lr=-0.1", "Invalid learning rate"]),
    (["optimizer=sgd", "optimizer.momentum=-1"], ["optimizer.momentum", "-1"]),
    (["seed=-5"], ["seed=-5", "must be in [0, 4294967295]"]),
    (["seed=1.5"], ["seed=1.5", "expected an integer"]),
    (["dataset.num_tasks=abc"], ["dataset.num_tasks='abc'", "expected an integer, got a string"]),
    (["dataset.max_train_samples=true"], ["dataset.max_train_samples=true", "an integer or null"]),
    (["model.hidden_sizes=[400,x]"], ["model.hidden_sizes", "a list of integers"]),
    (["+method.lamda=3"], ["method.lamda is not an option of lifelong.methods.EWC", "ewc_lambda"]),
    (["+trainer.max_epochs=3"], ["trainer.max_epochs is set by the stream", "epochs_per_task"]),
    (["method.fisher_type=diag"], ["method.fisher_type must be one of"]),
    (["class_outputs=some"], ["class_outputs='some'", "one of 'seen', 'all'"]),
    (["dataset.batch_size=0"], ["dataset.batch_size must be at least 1"]),
]
if not torch.cuda.is_available():
    VALUES.append((["trainer=gpu"], ["trainer.accelerator='gpu'", "trainer=cpu"]))


@pytest.mark.parametrize(("overrides", "phrases"), VALUES, ids=[" ".join(v[0]) for v in VALUES])
def test_a_bad_value_is_named_and_changes_nothing(finished, mnist_root, overrides, phrases, capsys):
    """Even with overwrite=true, which asks to replace the folder's results, a bad value leaves them."""
    before = snapshot(finished)
    refused_here([*_args(mnist_root), *overrides, "overwrite=true"], finished, capsys, *phrases)
    assert snapshot(finished) == before


def test_train_py_itself_exits_2_and_leaves_the_folder_and_its_log(finished, mnist_root):
    """The same refusal from the command line: exit status 2, one line, Hydra's train.log as it was."""
    before = snapshot(finished)
    refused(run_train([*_args(mnist_root), "optimizer.lr=-0.1", "overwrite=true"], finished), "optimizer.lr=-0.1")
    refused(run_train([*_args(mnist_root), "resume=true"], finished), "holds a finished run", "nothing to resume")
    assert snapshot(finished) == before


# ---- checkpoints of another run, damaged ones, files that are not checkpoints ------------------------------------
@pytest.mark.parametrize(
    ("overrides", "phrases"),
    [
        (["method=si"], ["belongs to another run", "method=ewc there, method=si here", "(method=ewc)"]),
        (["model.hidden_sizes=[100,100]"], ["model.hidden_sizes=[400,400] there, [100,100] here"]),
        (["dataset.scenario=task"], ["dataset.scenario=domain there, task here"]),
        (["method.ewc_lambda=5"], ["method.ewc_lambda=60 there, 5 here"]),
    ],
    ids=["another method", "another network", "another scenario", "another lambda"],
)
def test_resuming_with_other_settings_is_refused(unfinished, mnist_root, overrides, phrases, capsys):
    """The issue's case: a run of method=ewc resumed with method=si would write SI's name over EWC's matrix."""
    before = snapshot(unfinished)
    refused_here([*_args(mnist_root), *overrides, "resume=true"], unfinished, capsys, *phrases)
    assert snapshot(unfinished) == before
    assert not (unfinished / "metrics.json").exists()


def _without_config(src: Path, dst: Path) -> Path:
    """A checkpoint without the config lifelong records in it (as another tool, or an old version, writes)."""
    ckpt = load_checkpoint(src)
    del ckpt["lifelong"]
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize(
    ("make", "overrides", "phrases"),
    [
        (lambda c, d: _without_config(c, d / "x.ckpt"), ["method=si"], ["holds the state of EWC", "another method"]),
        (
            lambda c, d: _without_config(c, d / "x.ckpt"),
            ["model.hidden_sizes=[100,100]"],
            ["holds another network", "net.layers.1.weight is (400, 784) there, (100, 784) here"],
        ),
        (
            lambda c, d: (d / "x.ckpt").write_bytes(c.read_bytes()[: c.stat().st_size // 2]) and d / "x.ckpt",
            [],
            ["could not be read as a checkpoint", "damaged"],
        ),
        (lambda c, d: (d / "x.ckpt").write_text("not a checkpoint") and d / "x.ckpt", [], ["could not be read"]),
        (
            lambda c, d: torch.save({"weights": torch.zeros(2)}, d / "x.ckpt") or d / "x.ckpt",
            [],
            ["is not a Lightning checkpoint", "'state_dict'"],
        ),
    ],
    ids=["another method, no config", "another network, no config", "truncated", "text", "a plain torch file"],
)
def test_a_foreign_or_damaged_checkpoint_is_refused(tmp_path, finished, mnist_root, make, overrides, phrases, capsys):
    ckpt = make(finished / "checkpoints" / "task_1.ckpt", tmp_path)
    before, source = snapshot(tmp_path), snapshot(finished)
    refused_here([*_args(mnist_root), *overrides, f"ckpt_path={ckpt}"], tmp_path / "new", capsys, *phrases)
    assert snapshot(tmp_path) == before and snapshot(finished) == source  # not even a log in the new folder


# ---- finished runs and folders that hold another run's results ------------------------------------------------
def test_resuming_a_finished_run_reports_it_and_changes_nothing(finished, mnist_root, capsys):
    before = snapshot(finished)
    phrases = ("holds a finished run (ewc on permuted_mnist, seed 0: average accuracy", "nothing to resume")
    refused_here([*_args(mnist_root), "resume=true"], finished, capsys, *phrases)
    assert snapshot(finished) == before  # metrics.json (wall_time_s), train.log and .hydra/ included


@pytest.mark.parametrize(
    ("folder", "overrides", "phrases"),
    [
        ("finished", [], ["already holds the results of a finished run", "overwrite=true"]),
        ("finished", ["seed=1"], ["already holds the results of a finished run"]),
        ("unfinished", [], ["already holds an unfinished run's checkpoints", "resume=true to continue it"]),
        ("finished", ["resume=true", "overwrite=true"], ["contradict"]),
    ],
    ids=["same settings", "another seed", "unfinished", "resume and overwrite"],
)
def test_a_folder_with_results_is_not_written_over(request, mnist_root, folder, overrides, phrases, capsys):
    run = request.getfixturevalue(folder)
    before = snapshot(run)
    refused_here([*_args(mnist_root), *overrides], run, capsys, *phrases)
    assert snapshot(run) == before


def test_overwrite_replaces_the_results_and_resume_continues(tmp_path, finished, unfinished, mnist_root):
    """overwrite=true, asked for, replaces the earlier results; resume=true finishes an unfinished run and adds
    its training time to the time recorded in the checkpoint."""
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    proc = run_train([*_args(mnist_root), "overwrite=true", "seed=1"], copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(copy)["seed"] == 1 and load_checkpoint(copy / "checkpoints" / "task_2.ckpt")["lifelong"]
    assert json.loads((copy / "metrics.json").read_text())["config"]["overwrite"] is True

    recorded = load_checkpoint(unfinished / "checkpoints" / "last.ckpt")["callbacks"]["StreamReport"]["elapsed_s"]
    proc = run_train([*_args(mnist_root), "resume=true"], unfinished)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, original = read_metrics(unfinished), read_metrics(finished)
    assert resumed["accuracy_matrix"] == original["accuracy_matrix"]
    assert resumed["wall_time_s"] > recorded > 0
