"""The sweep summary tool on a folder of synthetic metrics.json files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from lifelong.metrics.summary import collect, main, markdown, select
from tests.conftest import REPO


def _write(folder, method, seed, acc, bwt, forgetting, scenario="task", done=3, val=None, config=None, extra=None):
    folder.mkdir(parents=True)
    metrics = {
        "accuracy_matrix": [[acc]],
        "avg_accuracy": acc,
        "bwt": bwt,
        "forgetting": forgetting,
        "num_tasks": 3,
        "tasks_completed": done,
        "method": method,
        "dataset": "split_mnist",
        "scenario": scenario,
        "seed": seed,
        "config": {"seed": seed, "dataset": {"seed": seed, "root": f"/data/{seed}"}, **(config or {})},
    }
    if val is not None:
        metrics["val_avg_accuracy"] = val
    metrics.update(extra or {})
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    _write(root / "a" / "0", "ewc", 0, 0.90, -0.02, 0.03)
    _write(root / "a" / "1", "ewc", 1, 0.94, -0.04, 0.05)
    _write(root / "a" / "2", "ewc", 2, 0.92, -0.06, 0.07)
    _write(root / "b" / "0", "finetune", 0, 0.60, -0.30, 0.30)
    _write(root / "b" / "1", "finetune", 1, 0.70, -0.20, 0.20)
    _write(root / "c" / "0", "finetune", 0, 0.19, -0.99, 0.99, scenario="class")
    _write(root / "d" / "0", "ewc", 3, 0.10, -0.50, 0.50, done=1)  # an unfinished run is left out
    (root / "e").mkdir()
    (root / "e" / "metrics.json").write_text("{not json")
    return root


def test_means_and_stds_by_hand(sweep):
    groups, skipped = collect(sweep)
    assert len(skipped) == 2 and any("unfinished" in s for s in skipped)
    by = {(g.method, g.scenario): g for g in groups}
    ewc = by["ewc", "task"]
    assert ewc.seeds == [0, 1, 2]
    assert ewc.mean("avg_accuracy") == pytest.approx(0.92)
    assert ewc.std("avg_accuracy") == pytest.approx(0.02)  # sqrt(((-.02)^2 + 0 + .02^2) / 2)
    assert ewc.mean("bwt") == pytest.approx(-0.04) and ewc.std("forgetting") == pytest.approx(0.02)
    ft = by["finetune", "task"]
    assert ft.mean("avg_accuracy") == pytest.approx(0.65)
    assert ft.std("avg_accuracy") == pytest.approx(0.0707107, abs=1e-6)  # |0.6 - 0.7| / sqrt(2)
    assert by["finetune", "class"].std("avg_accuracy") == 0.0
    table = markdown(groups)
    assert "| split_mnist | task | 3 | `ewc` | 3 | 92.00 ± 2.00 | -4.00 ± 2.00 | 5.00 ± 2.00 | n/a | n/a |" in table
    assert "| split_mnist | class | 3 | `finetune` | 1 | 19.00 | -99.00 | 99.00 | n/a | n/a |" in table
    assert all(g.setting == () for g in groups)  # seeds (and paths that differ with them) are not settings


def test_class_scenario_runs_add_their_task_aware_accuracy(sweep):
    _write(sweep / "f" / "0", "der", 0, 0.80, -0.2, 0.2, scenario="class", extra={"task_aware_avg_accuracy": 0.97})
    _write(sweep / "f" / "1", "der", 1, 0.84, -0.1, 0.1, scenario="class", extra={"task_aware_avg_accuracy": 0.99})
    table = markdown(collect(sweep)[0])
    assert table.splitlines()[0].endswith("| LA (%) | Task-IL ACC (%) |")
    assert "| `der` | 2 | 82.00 ± 2.83 | -15.00 ± 7.07 | 15.00 ± 7.07 | n/a | n/a | 98.00 ± 1.41 |" in table
    assert "| `ewc` | 3 | 92.00 ± 2.00 | -4.00 ± 2.00 | 5.00 ± 2.00 | n/a | n/a | n/a |" in table  # no such view


def test_command_prints_the_table_and_writes_csv_and_plot(sweep, capsys):
    assert main([str(sweep), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "92.00 ± 2.00" in out and "6 runs in 3 groups" in out
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    ewc = next(r for r in rows if r["method"] == "ewc")
    assert float(ewc["avg_accuracy_mean"]) == pytest.approx(0.92) and ewc["seeds"] == "0 1 2"
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_empty_or_missing_folder_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no finished run" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "summarize.py"), str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


@pytest.fixture
def lambda_sweep(tmp_path):
    """Three lambdas x two seeds where validation and test disagree: lambda 10 is best on validation, 100 on test."""
    root = tmp_path / "lambdas"
    #               lambda: (val, test) for seeds 0 and 1
    results = {1: [(0.80, 0.80), (0.82, 0.81)], 10: [(0.90, 0.84), (0.88, 0.86)], 100: [(0.86, 0.95), (0.85, 0.97)]}
    for lam, pairs in results.items():
        for seed, (val, test) in enumerate(pairs):
            config = {"method": {"ewc_lambda": lam, "mode": "separate"}, "trainer": {"devices": seed + 1}}
            _write(root / f"{lam}_{seed}", "ewc", seed, test, -0.05, 0.05, val=val, config=config)
    return root


def test_select_picks_by_validation_not_by_test(lambda_sweep, capsys):
    groups, _ = collect(lambda_sweep)
    assert [g.setting for g in groups] == [(("method.ewc_lambda", v),) for v in ("1", "10", "100")]
    (chosen,), notes = select(groups)
    assert notes == [] and chosen.best.setting == (("method.ewc_lambda", "10"),)  # not 100, the best on test
    assert chosen.best.mean("avg_accuracy") == pytest.approx(0.85) and len(chosen.candidates) == 3
    assert main([str(lambda_sweep), "--select"]) == 0
    out = capsys.readouterr().out
    row = "| split_mnist | task | 3 | `ewc` method.ewc_lambda=10 | 3 | 2 | 89.00 ± 1.41 | 85.00 ± 1.41 |"
    assert row in out
    assert "Hyperparameters (config keys that vary between runs of a method): method.ewc_lambda" in out
    with open(lambda_sweep / "selection.csv") as f:
        (selected,) = list(csv.DictReader(f))
    assert selected["setting"] == "method.ewc_lambda=10" and selected["seeds"] == "0 1"


def test_select_refuses_runs_without_validation(sweep, capsys):
    assert main([str(sweep), "--select"]) == 2
    err = capsys.readouterr().err
    assert "without validation accuracy" in err and "dataset.val_fraction=0.1" in err
    assert not (sweep / "selection.csv").exists()


def test_accuracy_curves_average_the_tasks_seen(tmp_path):
    from lifelong.metrics.summary import seen_accuracy

    nan = float("nan")
    run = {"accuracy_matrix": [[0.9, nan, nan], [0.7, 0.8, nan], [0.6, 0.5, 0.7]]}
    assert seen_accuracy(run) == pytest.approx([0.9, 0.75, 0.6])
    root = tmp_path / "multirun"
    for seed in (0, 1):
        _write(root / str(seed), "ewc", seed, 0.6, -0.1, 0.1, extra={"accuracy_matrix": run["accuracy_matrix"]})
    assert main([str(root), "--curves", "--reference", "90=a paper"]) == 0
    assert (root / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main([str(root), "--curves", "--reference", "ninety"])
