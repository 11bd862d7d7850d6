import math

import pytest
import torch

from lifelong.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    learning_accuracy,
    summarize,
)


def test_metrics_by_hand():
    r = [
        [0.9, 0.1, 0.1],
        [0.7, 0.8, 0.2],
        [0.6, 0.75, 0.95],
    ]
    assert average_accuracy(r) == pytest.approx((0.6 + 0.75 + 0.95) / 3)
    # BWT: ((0.6 - 0.9) + (0.75 - 0.8)) / 2
    assert backward_transfer(r) == pytest.approx(-0.175)
    # forgetting: task 1 best 0.9 -> 0.6 (0.3); task 2 best 0.8 -> 0.75 (0.05)
    assert forgetting(r) == pytest.approx(0.175)


def test_forgetting_uses_best_not_first():
    r = [[0.5, 0.0], [0.9, 0.9]]  # task 1 improves later: positive transfer, negative forgetting
    assert backward_transfer(r) == pytest.approx(0.4)
    assert forgetting(r) == pytest.approx(-0.4)  # the best is taken over the rows before the last
    r = [[0.5, 0.0, 0.0], [0.9, 0.9, 0.0], [0.7, 0.9, 0.9]]
    assert forgetting(r) == pytest.approx(((0.9 - 0.7) + (0.9 - 0.9)) / 2)


def test_single_task_and_partial_matrix():
    assert summarize([[0.8, 0.1]]) == {
        "avg_accuracy": pytest.approx(0.45),
        "bwt": None,
        "forgetting": None,
        "fwt": None,
        "learning_accuracy": pytest.approx(0.8),
    }
    with pytest.raises(ValueError):
        average_accuracy(torch.zeros(3, 2))
    assert not math.isnan(average_accuracy(torch.eye(3)))


def test_forward_transfer_and_learning_accuracy_by_hand():
    r = [
        [0.9, 0.3, 0.2],
        [0.7, 0.8, 0.5],
        [0.6, 0.75, 0.95],
    ]
    b = [0.1, 0.2, 0.4]  # the untrained network's accuracy on each task
    # FWT (Lopez-Paz & Ranzato 2017): mean over tasks 2..T of R[j-1, j] - b[j] = ((0.3 - 0.2) + (0.5 - 0.4)) / 2
    assert forward_transfer(r, b) == pytest.approx(0.1)
    # learning accuracy: the diagonal's mean, (0.9 + 0.8 + 0.95) / 3
    assert learning_accuracy(r) == pytest.approx(2.65 / 3)
    full = summarize(r, b)
    assert full["fwt"] == pytest.approx(0.1) and full["learning_accuracy"] == pytest.approx(2.65 / 3)
    # a stream stopped after two tasks: the tasks trained so far
    assert forward_transfer(r[:2], b) == pytest.approx(0.3 - 0.2)
    assert learning_accuracy(r[:2]) == pytest.approx(0.85)
    assert summarize(r)["fwt"] is None  # no reference row, no FWT
    with pytest.raises(ValueError, match="one value per task"):
        forward_transfer(r, b[:2])
