"""What a run costs (examples seen, the bytes its methods keep, peak memory) and the paired test over seeds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lifelong.metrics.compare import compare
from lifelong.metrics.cost import tensor_bytes, tensors_in
from lifelong.metrics.summary import collect, main, markdown
from tests.conftest import QUIET, load_checkpoint, run_and_resume


def _write(folder, method, seed, acc, extra=None):
    folder.mkdir(parents=True)
    metrics = {
        "accuracy_matrix": [[acc]],
        "avg_accuracy": acc,
        "bwt": 0.0,
        "forgetting": 0.0,
        "num_tasks": 5,
        "tasks_completed": 5,
        "method": method,
        "dataset": "split_mnist",
        "scenario": "class",
        "seed": seed,
        "config": {"seed": seed},
        **(extra or {}),
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def seeds(tmp_path):
    root = tmp_path / "multirun"
    for seed, acc in enumerate([0.90, 0.94, 0.92]):
        _write(root / "ewc" / str(seed), "ewc", seed, acc, {"wall_time_s": 10.0 + seed, "examples_seen": 54_000})
    for seed, acc in enumerate([0.60, 0.70, 0.65, 0.50]):
        _write(root / "ft" / str(seed), "finetune", seed, acc, {"method_state_bytes_max": 2**20, "min_acc": 0.25})
    return root


def test_the_paired_test_against_a_hand_computation(seeds, capsys):
    (c,) = compare(collect(seeds)[0], "ewc", "finetune")
    assert c.seeds == [0, 1, 2] and c.unpaired == ([], [3])  # seed 3 has no ewc run: left out of the pairs
    # differences 0.30, 0.24, 0.27: mean 0.27, sd 0.03, t = 0.27 / (0.03 / sqrt(3)) with 2 degrees of freedom
    t, p = c.t_test()
    assert t == pytest.approx(0.27 / (0.03 / math.sqrt(3)))
    # Student's t with 2 degrees of freedom has the CDF 1/2 + t / (2 sqrt(2 + t^2)): p = 1 - |t| / sqrt(2 + t^2)
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert c.wilcoxon() == pytest.approx(0.25)  # 3 positive differences: 2 of the 2^3 sign patterns as extreme
    assert main([str(seeds), "--compare", "ewc", "finetune"]) == 0
    out = capsys.readouterr().out
    assert "seeds paired: 0, 1, 2; only B ran seed(s) 3" in out
    assert "seed 1: A 94.00, B 70.00, A - B +24.00" in out
    assert f"t(2) = {t:.3f}, p = {p:.4f}" in out and "mean difference A - B: +27.00 points (sd 3.00, n = 3)" in out


def test_a_comparison_says_what_is_missing(seeds, capsys):
    assert main([str(seeds), "--compare", "ewc", "si"]) == 2
    assert "no runs of 'si' below the folder; the methods there: ewc, finetune" in capsys.readouterr().err
    _write(seeds / "ewc" / "9", "ewc", 0, 0.5, {"config": {"seed": 0, "method": {"ewc_lambda": 1}}})
    assert main([str(seeds), "--compare", "ewc", "finetune"]) == 2
    assert "ran with several settings on one stream: name one" in capsys.readouterr().err


def test_the_table_shows_what_the_runs_cost_where_recorded(seeds):
    table = markdown(collect(seeds)[0])
    head, _, ft, ewc = table.splitlines()  # fine-tuning first: the baseline
    assert "time (s)" in head and "examples (k)" in head and "method state (MiB)" in head
    assert "peak memory" not in head and "WC-ACC" not in head  # no run recorded them
    assert ewc.endswith("| n/a | 11.0 | 54.0 | n/a |") and ft.endswith("| 25.00 ± 0.00 | n/a | n/a | 1.00 |")


def test_tensor_bytes_counts_a_shared_storage_once():
    base = torch.zeros(10, 4)
    state = {"a": base, "b": [base[:2], (torch.ones(3, dtype=torch.int64), "text", 1)]}
    assert tensor_bytes(state) == 10 * 4 * 4 + 3 * 8


@pytest.mark.integration
def test_the_bytes_a_method_keeps_are_the_tensors_it_checkpoints(tmp_path, mnist_root):
    """EWC beside a replay memory: after each task, the bytes in metrics.json are those of the tensors in the
    methods' state in that task's checkpoint (each tensor's own size: none of them shares a storage); examples seen
    count every training sample; a resumed run goes on counting from its checkpoint."""
    args = ["method=ewc", "replay=reservoir", "replay.buffer_size=300", "dataset=split_mnist", "dataset.num_tasks=3"]
    args += [f"dataset.root={mnist_root}", "dataset.max_train_samples=1000", "logger=none", *QUIET]
    m, r = run_and_resume(args, tmp_path)
    assert m["examples_seen"] == sum(m["stream"]["train_sizes"])  # one epoch a task, one process
    assert len(m["method_state_bytes"]) == 3 and m["method_state_bytes_max"] == max(m["method_state_bytes"])
    assert m["peak_memory_kind"] == "process_max_rss" and m["peak_memory_bytes"] > 100 * 2**20
    params = None
    for k in (1, 2, 3):
        ckpt = load_checkpoint(tmp_path / "full" / "checkpoints" / f"task_{k}.ckpt")
        states = [v for key, v in ckpt["callbacks"].items() if key.startswith(("EWC", "ExperienceReplay"))]
        assert len(states) == 2
        tensors = [t for s in states for t in tensors_in(s)]
        assert m["method_state_bytes"][k - 1] == sum(t.numel() * t.element_size() for t in tensors)
        params = params or sum(t.numel() for t in ckpt["state_dict"].values() if t.is_floating_point())
    # EWC's importance and anchor (float32, one each per weight) are most of it; the memory holds 300 indices
    ewc_bytes = 2 * 4 * params
    assert ewc_bytes < m["method_state_bytes"][0] < ewc_bytes + 300 * 32 + 1024
    assert r["examples_seen"] == m["examples_seen"] and r["method_state_bytes"] == m["method_state_bytes"]
