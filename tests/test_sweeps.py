"""Hydra sweeps through train.py: the basic launcher with the summary, joblib in parallel, and Optuna."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import QUIET, REPO

SMALL = [
    "dataset=split_mnist",
    "dataset.num_tasks=2",
    "dataset.max_train_samples=300",
    "dataset.max_test_samples=100",
    "logger=none",
    *QUIET,
]


def _sweep(args: list[str], sweep_dir) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_sweep_then_summary(tmp_path, mnist_root):
    sweep = tmp_path / "sweep"
    proc = _sweep(["method=finetune,si", "seed=0,1", f"dataset.root={mnist_root}", *SMALL], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.rglob("metrics.json"))
    assert runs == [
        "split_mnist/finetune/0_seed0",
        "split_mnist/finetune/1_seed1",
        "split_mnist/si/2_seed0",
        "split_mnist/si/3_seed1",
    ]
    summary = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), str(sweep), "--plot"], capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    assert "| split_mnist | task | 2 | `si` | 2 |" in summary.stdout
    assert (sweep / "summary.csv").is_file() and (sweep / "summary.png").is_file()


@pytest.mark.integration
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, mnist_root):
    """Two processes; without validation data the sweep warns, once, that what it returns is test accuracy."""
    sweep = tmp_path / "sweep"
    args = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=finetune,ewc", f"dataset.root={mnist_root}"]
    proc = _sweep([*args, *SMALL, "dataset.val_fraction=0"], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.rglob("metrics.json"))) == 2
    warning = "is TEST accuracy, so a setting chosen by it is chosen on test"
    job_logs = [p.read_text() for p in sweep.rglob("*.log")]  # each job's own log: only one of them warned
    assert len(job_logs) == 2 and sum(log.count(warning) for log in job_logs) == 1


@pytest.mark.integration
def test_optuna_searches_lambda_and_learning_rate(tmp_path, mnist_root):
    sweep = tmp_path / "sweep"
    args = ["hydra/sweeper=ewc_search", "hydra.sweeper.n_trials=2", f"dataset.root={mnist_root}"]
    proc = _sweep([*args, *SMALL], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"method.ewc_lambda", "optimizer.lr"}
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(runs) == 2
    # what Optuna maximised is validation accuracy, never test: its best value is the best run's validation ACC
    assert result["best_value"] == max(r["val_avg_accuracy"] for r in runs)
    assert any(r["val_avg_accuracy"] != r["avg_accuracy"] for r in runs)  # two measures (on 100 images they may tie)
    assert "chosen on test" not in proc.stdout + proc.stderr


@pytest.mark.integration
def test_a_failed_job_does_not_stop_the_sweep_and_a_relaunch_skips_finished_jobs(tmp_path, mnist_root):
    """A job whose loss becomes NaN is reported and the next job runs; the sweep relaunched with resume=true
    leaves the finished job's files as they were and retries the failed one."""
    sweep = tmp_path / "sweep"
    args = ["optimizer=sgd", "method.ewc_lambda=1e38,60", f"dataset.root={mnist_root}", *SMALL]
    proc = _sweep(args, sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (finished,) = [p.parent for p in sweep.rglob("metrics.json")]
    assert finished.name == "1_seed0" and "Traceback" not in proc.stderr
    failed_log = next(sweep.rglob("0_seed0/train.log")).read_text()
    assert "training loss is nan" in failed_log and "the sweep goes on" in failed_log
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()}

    again = _sweep([*args, "resume=true"], sweep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped" in again.stderr and "holds a finished run" in again.stderr
    assert {p: p.read_bytes() for p in finished.rglob("*") if p.is_file()} == before
    assert "resuming the stream from" in next(sweep.rglob("0_seed0/train.log")).read_text()
