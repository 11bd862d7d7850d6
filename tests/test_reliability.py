"""Reliability: kill-and-resume, determinism, NaN losses and bad input, through train.py as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import QUIET as NO_BAR
from tests.conftest import REPO, ewc_state, load_checkpoint, read_metrics, refused_run, run_train

QUIET = ["logger=none", *NO_BAR]


@pytest.mark.integration
def test_killed_run_resumes_to_the_same_result(tmp_path, mnist_root):
    """SIGKILL during task 2 of 3, then `resume=true` in the same folder: the uninterrupted run's matrix."""
    args = [f"dataset.root={mnist_root}", "dataset.num_tasks=3", "dataset.max_test_samples=2000", *QUIET]
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "task_1.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside task 2 (an epoch takes seconds)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir / "checkpoints" / "task_2.ckpt").exists(), "the kill came too late to test anything"
    assert not (run_dir / "metrics.json").exists()

    resumed = run_train([*args, "resume=true"], run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the stream from" in resumed.stdout
    uninterrupted = run_train(args, tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert read_metrics(run_dir)["accuracy_matrix"] == read_metrics(tmp_path / "uninterrupted")["accuracy_matrix"]
    ckpts = [load_checkpoint(d / "checkpoints" / "task_2.ckpt") for d in (run_dir, tmp_path / "uninterrupted")]
    for a, b in zip(*(c["state_dict"].values() for c in ckpts), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit for bit
    ewc = [ewc_state(c) for c in ckpts]
    for key in ("importance", "anchor"):
        for name, t in ewc[0][key].items():
            assert torch.equal(t, ewc[1][key][name]), (key, name)


@pytest.mark.integration
def test_same_seed_sameread_metrics(tmp_path, mnist_root):
    args = [f"dataset.root={mnist_root}", "dataset.num_tasks=2", "dataset.max_train_samples=2000", *QUIET]
    runs = [run_train(args, tmp_path / name) for name in ("a", "b")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    a, b = (read_metrics(tmp_path / name) for name in ("a", "b"))
    for key in ("accuracy_matrix", "avg_accuracy", "bwt", "forgetting", "stream"):
        assert a[key] == b[key]


@pytest.mark.integration
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, mnist_root):
    args = [
        f"dataset.root={mnist_root}",
        "dataset.num_tasks=2",
        "dataset.max_train_samples=2000",
        "optimizer=sgd",
        "method.ewc_lambda=1e38",  # the weights overflow as soon as task 2 moves them
        *QUIET,
    ]
    proc = run_train(args, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training loss is nan" in proc.stderr and "task 2/2" in proc.stderr
    assert "intact" in proc.stderr and "Traceback" not in proc.stderr
    good = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    weights = {k: t for k, t in good["state_dict"].items() if k.startswith("net.")}
    assert good["epoch"] == 0 and weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_the_loss_watch_finds_the_first_non_finite_loss():
    """The accelerator's NaN check (noted on the device, read at log steps, task ends and epoch ends), here on
    CPU tensors: it reports the first bad loss, with its batch and step."""
    from lifelong.models.module import LossWatch

    watch = LossWatch()
    watch.note(torch.tensor(0.5), 0, 10)
    assert watch.found() is None
    watch.note(torch.tensor(float("inf")), 3, 13)
    watch.note(torch.tensor(float("nan")), 4, 14)
    assert watch.found() == (float("inf"), 3, 13)


BAD = [
    (["method=ewcc"], 1, ["Could not find 'method/ewcc'", "Available options"]),
    (["dataset=permuted_cifar"], 1, ["Could not find 'dataset/permuted_cifar'", "permuted_mnist"]),
    (["method.ewc_lamda=3"], 1, ["ewc_lamda", "not in struct"]),
    (["method.ewc_lambda=-1"], 2, ["ewc_lambda must be >= 0", "-1"]),
    (["method=online_ewc", "method.decay=1.5"], 2, ["decay must be in [0, 1]"]),
    (["method.fisher_type=diag"], 2, ["fisher_type must be one of"]),
    (["dataset.num_tasks=0"], 2, ["num_tasks must be at least 1"]),
    (["epochs_per_task=0"], 2, ["epochs_per_task must be at least 1"]),
    (["ckpt_path=/nonexistent/last.ckpt"], 2, ["is not a file"]),
    (["dataset=split_mnist", "dataset.scenario=instance"], 2, ["scenario must be one of ['task', 'domain', 'class']"]),
    (["dataset=split_mnist", "dataset.num_tasks=6"], 2, ["6 tasks of 2 classes need 12 classes"]),
    (["dataset=rotated_mnist", "dataset.num_tasks=3", "dataset.angles=[0,10]"], 2, ["give one per task"]),
    (["dataset=split_cifar10", "dataset.download=false"], 2, ["CIFAR10 was not found", "cifar-10-batches-py"]),
]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "code", "phrases"), [b for b in BAD if b[1] == 1], ids=[" ".join(b[0]) for b in BAD if b[1] == 1]
)
def test_a_config_hydra_cannot_compose_fails_early_and_clearly(tmp_path, mnist_root, overrides, code, phrases):
    """Hydra's own refusals (an unknown option of a group, a key not in the config), from the command line."""
    proc = run_train([f"dataset.root={mnist_root}", *overrides, *QUIET], tmp_path / "run")
    assert proc.returncode == code, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training


@pytest.mark.parametrize(
    ("overrides", "code", "phrases"), [b for b in BAD if b[1] == 2], ids=[" ".join(b[0]) for b in BAD if b[1] == 2]
)
def test_bad_input_fails_early_and_clearly(tmp_path, mnist_root, overrides, code, phrases, capsys):
    """Values lifelong refuses, the composed config run in this process as train.py runs it."""
    line = refused_run([f"dataset.root={mnist_root}", *overrides, *QUIET], tmp_path / "run", capsys, code)
    for phrase in phrases:
        assert phrase in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training


@pytest.mark.integration
def test_unwritable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_train(QUIET, blocker / "run")
    assert proc.returncode == 2
    assert "cannot write the run's outputs" in proc.stderr and "hydra.run.dir=DIR" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_corrupt_data_is_reported(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03not an idx file")
    proc = run_train([f"dataset.root={tmp_path / 'data'}", *QUIET], tmp_path / "run", env={"LIFELONG_DATA_DIR": ""})
    assert proc.returncode == 2
    assert f"{raw / 'train-images-idx3-ubyte'} is cut short" in proc.stderr
    assert "Traceback" not in proc.stderr
