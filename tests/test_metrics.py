import math

import pytest
import torch

from lifelong.metrics import average_accuracy, backward_transfer, forgetting, summarize


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
    assert summarize([[0.8, 0.1]]) == {"avg_accuracy": pytest.approx(0.45), "bwt": None, "forgetting": None}
    with pytest.raises(ValueError):
        average_accuracy(torch.zeros(3, 2))
    assert not math.isnan(average_accuracy(torch.eye(3)))
