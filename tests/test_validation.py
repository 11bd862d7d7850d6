"""The validation split: held out of each task's training data, stratified, seeded, checked on resume."""

from __future__ import annotations

import pytest
import torch

from lifelong.data import PermutedStream, SplitStream, TaskStream
from lifelong.data.tensors import TaskData
from lifelong.errors import ResumeError


def _ready(dm: TaskStream) -> TaskStream:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _counts(data: TaskData) -> torch.Tensor:
    return torch.bincount(data.labels[data.rows], minlength=10)


def test_split_is_disjoint_stratified_and_seeded(mnist_root):
    dm = _ready(SplitStream("mnist", root=str(mnist_root), download=False, val_fraction=0.1, scenario="class"))
    whole_tasks = _ready(SplitStream("mnist", root=str(mnist_root), download=False, scenario="class"))
    assert dm.has_validation and not whole_tasks.has_validation
    for t in range(dm.num_tasks):
        train, val, test = dm.train_data(t), dm.val_data(t), dm.test_data(t)
        assert val.images is train.images and test.images is not train.images  # val: training images only
        assert not set(val.rows.tolist()) & set(train.rows.tolist())
        whole = _counts(train) + _counts(val)
        everything = whole_tasks.train_data(t).rows.tolist()  # every sample of the task is in one of the parts
        assert sorted(train.rows.tolist() + val.rows.tolist()) == sorted(everything)
        share = _counts(val)[whole > 0].double() / whole[whole > 0]
        assert torch.allclose(share, torch.full_like(share, 0.1), atol=1e-3)  # each class keeps its 10 %
        assert bool((val.tasks == t).all()) and val.task == t
    again = _ready(SplitStream("mnist", root=str(mnist_root), download=False, val_fraction=0.1, scenario="class"))
    other = _ready(SplitStream("mnist", root=str(mnist_root), download=False, val_fraction=0.1, seed=1))
    assert all(torch.equal(dm.val_data(t).rows, again.val_data(t).rows) for t in range(5))
    assert not torch.equal(dm.val_data(0).rows, other.val_data(0).rows)
    assert dm.describe()["val_sha1"] == again.describe()["val_sha1"] != other.describe()["val_sha1"]
    # the evaluation loaders: every task's validation set, then every task's test set
    loaders = dm.eval_loaders()
    assert [len(ld.data) for ld in loaders] == [len(dm.val_data(t)) for t in range(5)] + [
        len(dm.test_data(t)) for t in range(5)
    ]


def test_permuted_tasks_hold_out_their_own_rows_and_limits_apply_first(mnist_root):
    dm = _ready(
        PermutedStream(num_tasks=2, root=str(mnist_root), download=False, val_fraction=0.2, max_train_samples=1000)
    )
    for t in range(2):  # the 1,000 kept first, then 20 % of each digit of them held out (rounded per digit)
        digits = torch.bincount(dm.train_data(t).labels[torch.cat([dm.train_data(t).rows, dm.val_data(t).rows])])
        held_out = sum(max(1, round(0.2 * int(n))) for n in digits)
        assert (len(dm.train_data(t)), len(dm.val_data(t))) == (1000 - held_out, held_out)
        assert abs(held_out - 200) <= 5
    assert not torch.equal(dm.val_data(0).rows, dm.val_data(1).rows)  # each task draws its own split


def test_no_split_by_default_in_the_library(mnist_root):
    dm = _ready(SplitStream("mnist", num_tasks=1, root=str(mnist_root), download=False, max_train_samples=100))
    assert not dm.has_validation and len(dm.eval_loaders()) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        dm.val_data(0)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1", float("nan")])
def test_impossible_fractions_are_refused(bad):
    with pytest.raises(ValueError, match=r"dataset.val_fraction must be a number in \[0, 1\)"):
        SplitStream("mnist", val_fraction=bad)


def test_a_split_that_leaves_nothing_is_refused(mnist_root):
    dm = SplitStream("mnist", num_tasks=1, root=str(mnist_root), download=False, max_train_samples=1, val_fraction=0.5)
    dm.prepare_data()
    with pytest.raises(ValueError, match="leaves task 1 with 1 training and 0 validation samples"):
        dm.setup("fit")


def test_a_checkpoint_with_another_split_is_refused(mnist_root):
    kwargs = {"num_tasks": 2, "root": str(mnist_root), "download": False, "max_train_samples": 500}
    saved = _ready(SplitStream("mnist", val_fraction=0.1, **kwargs)).state_dict()
    same = _ready(SplitStream("mnist", val_fraction=0.1, **kwargs))
    same.load_state_dict(saved)
    for other in (SplitStream("mnist", val_fraction=0.2, **kwargs), SplitStream("mnist", **kwargs)):
        with pytest.raises(ResumeError, match="different task stream"):
            _ready(other).load_state_dict(saved)


def test_split_of_tiny_classes():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2])
    data = TaskData.whole(torch.zeros(14, 1, 1, 1, dtype=torch.uint8), labels, task=0)
    rest, held = data.split(0.25, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[held.rows], minlength=3).tolist() == [2, 1, 0]  # round(2.5) = 2; at least 1; a
    assert torch.bincount(labels[rest.rows], minlength=3).tolist() == [8, 2, 1]  # lone sample stays in training
    assert torch.equal(torch.cat([rest.rows, held.rows]).sort().values, torch.arange(14))
