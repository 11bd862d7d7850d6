"""eval.py: a checkpoint evaluated on every task of its stream reproduces the run's own accuracies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import QUIET, REPO, read_metrics, run_train


def _eval(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.integration
def test_eval_reproduces_the_recorded_rows(tmp_path, mnist_root):
    run = tmp_path / "run"
    args = [
        "method=si",
        "dataset=split_mnist",
        "dataset.scenario=class",  # the head depends on the task the checkpoint was written after
        "dataset.class_order=random",  # the stream's own randomness must come back
        "dataset.num_tasks=3",
        "dataset.max_train_samples=800",
        "dataset.max_test_samples=400",
        f"dataset.root={mnist_root}",
        "logger=none",
        *QUIET,
    ]
    proc = run_train(args, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    matrix = read_metrics(run)["accuracy_matrix"]
    for k, name in ((1, "task_2.ckpt"), (2, "last.ckpt")):
        out = tmp_path / f"{name}.json"
        ev = _eval([f"ckpt_path={run / 'checkpoints' / name}", f"out={out}"])
        assert ev.returncode == 0, ev.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["after_task"] == k + 1 and result["scenario"] == "class"
        assert [round(a, 6) for a in result["accuracy"]] == matrix[k]  # exactly the run's row
        assert "the same as the row recorded during training" in ev.stdout


def test_eval_refuses_what_is_not_a_checkpoint(tmp_path):
    ev = _eval([f"ckpt_path={tmp_path / 'none.ckpt'}"])
    assert ev.returncode == 2 and "is not a file" in ev.stderr
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    ev = _eval([f"ckpt_path={bad}"])
    assert ev.returncode == 2 and "could not be read" in ev.stderr and "Traceback" not in ev.stderr
