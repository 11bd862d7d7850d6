"""Continual evaluation (eval_every): the stability-gap metrics against hand computations and the original code's
definitions, and the curve on real data: the stability gap itself, training left unchanged, resume, DDP."""

from __future__ import annotations

import math
from collections import defaultdict, deque

import pytest
import torch

from lifelong.data import SplitStream
from lifelong.evaluation import ContinualEvaluation
from lifelong.metrics.stability import (
    min_accuracy,
    stability_summary,
    windowed_forgetting,
    windowed_plasticity,
    worst_case_accuracy,
)
from lifelong.models import MLP, ContinualClassifier
from lifelong.seeding import generator
from tests.conftest import QUIET, load_checkpoint, read_metrics, run_and_resume, run_train

NAN = math.nan
# five evaluations of a two-task stream: task 2 starts at the third
CURVE = [[0.5, NAN], [0.9, NAN], [0.8, 0.1], [0.6, 0.7], [0.85, 0.9]]
TRAINED = [0, 0, 1, 1, 1]


def test_stability_metrics_by_hand():
    # task 1 once task 2 trains: 0.8, 0.6, 0.85 -> its minimum 0.6; task 2 is still trained: no minimum
    assert min_accuracy(CURVE, TRAINED) == pytest.approx(0.6)
    assert worst_case_accuracy(CURVE, TRAINED) == pytest.approx((0.9 + 0.6) / 2)
    # task 1's largest drop: 0.9 -> 0.6 (two apart); task 2 only rises (0 forgetting)
    assert windowed_forgetting(CURVE, 10) == pytest.approx((0.3 + 0.0) / 2)
    assert windowed_forgetting(CURVE, 2) == pytest.approx((0.2 + 0.0) / 2)  # neighbours only: 0.8 -> 0.6
    assert windowed_plasticity(CURVE, 10) == pytest.approx((0.4 + 0.8) / 2)  # 0.5 -> 0.9; 0.1 -> 0.9
    # one task trained so far: nothing is earlier than the current task
    assert min_accuracy(CURVE[:2], TRAINED[:2]) is None
    assert worst_case_accuracy(CURVE[:2], TRAINED[:2]) == pytest.approx(0.9)


def _reference_windowed(curve: list[list[float]], window: int, rise: bool) -> float:
    """De Lange et al.'s WindowedForgettingPluginMetric (Mattdl/ContinualEvaluation, continual_eval_metrics.py),
    as written there: a deque of each task's last ``window`` accuracies, the largest delta within it after every
    evaluation, the maximum over the run; then the mean over tasks."""
    windows: dict[int, deque] = defaultdict(deque)
    best: dict[int, float] = defaultdict(float)
    for row in curve:
        for task, acc in enumerate(row):
            if math.isnan(acc):
                continue
            w = windows[task]
            w.append(acc)
            if len(w) > window:
                w.popleft()
            delta = (
                0.0
                if len(w) <= 1
                else max((b - a) if rise else (a - b) for i, a in enumerate(w) for b in list(w)[i + 1 :])
            )
            best[task] = max(best[task], delta)
    return sum(best.values()) / len(best)


@pytest.mark.parametrize("window", [1, 3, 10])
def test_windowed_metrics_match_the_original_code_on_random_curves(window):
    g = torch.Generator().manual_seed(window)
    for _ in range(20):
        n, t = 30, 3
        trained = torch.arange(n) * t // n
        curve = torch.rand(n, t, generator=g, dtype=torch.float64)
        curve[torch.arange(t) > trained.unsqueeze(1)] = NAN  # unseen tasks are not evaluated
        rows = curve.tolist()
        assert windowed_forgetting(rows, window) == pytest.approx(_reference_windowed(rows, window, rise=False))
        assert windowed_plasticity(rows, window) == pytest.approx(_reference_windowed(rows, window, rise=True))
        summary = stability_summary(rows, trained.tolist())
        # the original's min-ACC: each task's minimum over the evaluations where it is not the one trained
        mins = [min(r[j] for r, k in zip(rows, trained.tolist(), strict=True) if k > j) for j in range(t - 1)]
        assert summary["min_acc"] == pytest.approx(sum(mins) / len(mins))
        assert summary["wc_acc"] == pytest.approx((rows[-1][t - 1] + sum(mins)) / t)


def test_bad_values_are_refused_with_what_they_take():
    with pytest.raises(ValueError, match="eval_every must be a number of training steps >= 1, got 0"):
        ContinualEvaluation(0)
    with pytest.raises(ValueError, match="eval_subset must be"):
        ContinualEvaluation(10, subset=0)
    with pytest.raises(ValueError, match="eval_split must be one of"):
        ContinualEvaluation(10, split="train")


def _args(mnist_root, *extra: str) -> list[str]:
    return [
        "dataset=split_mnist",
        f"dataset.root={mnist_root}",
        "dataset.num_tasks=2",
        "dataset.max_train_samples=3000",
        "logger=csv",
        *QUIET,
        *extra,
    ]


@pytest.mark.integration
def test_the_curve_shows_the_stability_gap_and_leaves_training_unchanged(tmp_path, mnist_root):
    """Split MNIST, class scenario, ER with a memory of 2,000, every step on 500 test samples a task: task 1 drops
    right after task 2 starts and recovers, so min-ACC lies below its task-end accuracy (De Lange et al. 2023)."""
    er = ["method=er", "method.buffer_size=2000", "dataset.scenario=class"]
    proc = run_train(_args(mnist_root, *er, "eval_every=1", "eval_subset=500"), tmp_path / "curve")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "curve")
    curve = m["continual_eval"]
    end_1, end_2 = curve["task_end_steps"]
    assert curve["steps"] == list(range(end_2 + 1))  # every step, and once before the first
    task_1 = [row[0] for row in curve["accuracy"]]
    assert all(row[1] is None for row, k in zip(curve["accuracy"], curve["trained"], strict=True) if k == 0)
    at_end_1 = task_1[end_1]
    first_steps = task_1[end_1 + 1 : end_1 + 16]
    gap = min(first_steps)
    assert at_end_1 > 0.97 and gap < at_end_1 - 0.1, (at_end_1, first_steps)  # the drop, right after the boundary
    assert task_1[-1] > gap + 0.1  # and the recovery
    assert m["min_acc"] == pytest.approx(min(task_1[end_1 + 1 :]), abs=1e-6)
    assert m["min_acc"] < m["accuracy_matrix"][1][0] - 0.1  # below the task-end evaluation's accuracy
    assert m["wc_acc"] == pytest.approx((curve["accuracy"][-1][1] + m["min_acc"]) / 2, abs=1e-5)
    assert m["wf10"] > 0.1 and m["eval_time_s"] > 0
    log = (tmp_path / "curve" / "train.log").read_text()  # the run's closing summary names them too
    assert f"min-ACC {100 * m['min_acc']:.2f} %" in log and "continual evaluation (test, every 1 steps" in log
    # the files: the CSV holds the curve; the CSV logger the same values at their steps
    lines = (tmp_path / "curve" / "eval_curve.csv").read_text().splitlines()
    assert lines[0] == "step,trained_task,task_1,task_2" and len(lines) == len(curve["steps"]) + 1
    assert (tmp_path / "curve" / "eval_curve.png").stat().st_size > 10_000
    (logged,) = (tmp_path / "curve").glob("csv/**/metrics.csv")
    header, *rows = [line.split(",") for line in logged.read_text().splitlines()]
    col, step = header.index("test_curve/acc/task_1"), header.index("step")
    values = {int(r[step]): float(r[col]) for r in rows if r[col]}
    assert values == {s: pytest.approx(a, abs=1e-6) for s, a in zip(curve["steps"], task_1, strict=True)}

    # evaluating changes nothing that is learnt: the same matrices as without it
    plain = run_train(_args(mnist_root, *er), tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    p = read_metrics(tmp_path / "plain")
    assert p["accuracy_matrix"] == m["accuracy_matrix"] and p["val_accuracy_matrix"] == m["val_accuracy_matrix"]
    assert "continual_eval" not in p and "min_acc" not in p


@pytest.mark.integration
def test_a_resumed_run_continues_the_curve_exactly(tmp_path, mnist_root):
    args = _args(mnist_root, "method=finetune", "dataset.num_tasks=3", "eval_every=4", "eval_subset=300")
    args += ["eval_redraw=true", "logger=none"]  # the redrawn subsets must resume too
    a, b = run_and_resume(args, tmp_path)
    ckpt = tmp_path / "full" / "checkpoints" / "task_1.ckpt"
    assert b["continual_eval"] == a["continual_eval"] and len(a["continual_eval"]["task_end_steps"]) == 3
    assert b["min_acc"] == a["min_acc"] and b["wf100"] == a["wf100"]
    # another evaluation schedule than the checkpoint's is refused, with what to do
    other = run_train([*args[:-2], "eval_every=5", f"ckpt_path={ckpt}"], tmp_path / "other")
    assert other.returncode == 2 and "eval_every" in other.stderr, other.stderr[-2000:]


def test_a_refused_value_names_the_key(tmp_path, mnist_root):
    proc = run_train(_args(mnist_root, "eval_every=0"), tmp_path / "zero")
    assert proc.returncode == 2 and "eval_every must be a number of training steps >= 1, got 0" in proc.stderr
    proc = run_train(_args(mnist_root, "eval_every=5", "eval_split=val", "dataset.val_fraction=0"), tmp_path / "val")
    assert proc.returncode == 2 and "eval_split=val needs validation data" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "val" / "metrics.json").exists()


SUBSET = 333  # odd: the two ranks' shards differ in size


@pytest.mark.integration
def test_ddp_ranks_evaluate_their_shards_and_sum_them(tmp_path, mnist_root):
    """Two gloo processes each evaluate half of every subset; the summed counts are the whole subset's: the last
    point of the curve equals this process's evaluation of the final weights on the same subsets."""
    args = _args(mnist_root, "method=finetune", "trainer=ddp_cpu", "eval_every=7", f"eval_subset={SUBSET}")
    args += ["logger=none", "dataset.scenario=class"]
    proc = run_train(args, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "ddp")
    last = m["continual_eval"]["accuracy"][-1]
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    dm = SplitStream(
        "mnist",
        num_tasks=2,
        root=str(mnist_root),
        download=False,
        max_train_samples=3000,
        scenario="class",
        val_fraction=0.1,
    )
    dm.prepare_data()
    dm.setup("fit")
    module = ContinualClassifier.for_stream(MLP(dm.input_shape, dm.num_classes), torch.optim.Adam, dm)
    module.load_state_dict(ckpt["state_dict"])
    module.current_task = 1
    module.eval()
    for j in range(2):
        data = dm.test_data(j).subset(SUBSET, generator(0, "eval_subset", task=j))
        correct = sum(int((module.predict(b.x, b.task).argmax(-1) == b.y).sum()) for b in dm.loader(data, train=False))
        assert last[j] == pytest.approx(correct / SUBSET, abs=1e-6)
