"""Data sources, tensor-resident batching and the permuted stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lifelong.data import (
    CorruptDataError,
    DataNotFoundError,
    PermutedStream,
    TaskData,
    TensorBatchLoader,
    load_image_dataset,
    sources,
)
from lifelong.errors import ResumeError
from tests.conftest import write_idx


def _identity(images, tasks, task):
    return images.float()


def _data(n: int = 10, task: int = 0) -> TaskData:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return TaskData.whole(images, torch.arange(n), task)


# ---- the loader ---------------------------------------------------------------------------------------
def test_loader_visits_every_sample_once_in_order_without_shuffle():
    loader = TensorBatchLoader(_data(10), 4, _identity)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert torch.cat([y for _, y, _, _ in batches]).tolist() == list(range(10))
    x, t = batches[0].x, batches[0].task
    assert x.shape == (4, 1, 1, 1) and x.dtype == torch.float32 and t.tolist() == [0] * 4


def test_shuffle_is_seeded_per_epoch():
    a = TensorBatchLoader(_data(50), 7, _identity, shuffle=True, seed=3)
    b = TensorBatchLoader(_data(50), 7, _identity, shuffle=True, seed=3)
    first_a, first_b = (torch.cat([y for _, y, _, _ in loader]) for loader in (a, b))
    assert first_a.tolist() == first_b.tolist()
    assert sorted(first_a.tolist()) == list(range(50))
    second_a = torch.cat([y for _, y, _, _ in a])  # the next epoch reshuffles
    assert second_a.tolist() != first_a.tolist()
    resumed = TensorBatchLoader(_data(50), 7, _identity, shuffle=True, seed=3, epoch=1)
    assert torch.cat([y for _, y, _, _ in resumed]).tolist() == second_a.tolist()


def test_ranks_partition_evaluation_and_pad_training():
    data = _data(11)
    evals = [TensorBatchLoader(data, 4, _identity, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([y for _, y, _, _ in loader]) for loader in evals]
    assert sorted(torch.cat(seen).tolist()) == list(range(11))  # each sample exactly once
    train = [TensorBatchLoader(data, 4, _identity, shuffle=True, rank=r, world_size=2, pad=True) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 2  # equal step counts on every rank (6 samples each)
    assert set(torch.cat([torch.cat([y for _, y, _, _ in loader]) for loader in train]).tolist()) == set(range(11))


def test_concat_and_subset():
    base = _data(6)
    both = TaskData.concat([base, TaskData.whole(base.images, base.labels, 1)])
    assert len(both) == 12 and both.task is None and both.tasks.tolist() == [0] * 6 + [1] * 6
    sub = both.subset(5, torch.Generator().manual_seed(0))
    assert len(sub) == 5 and len(set(zip(sub.rows.tolist(), sub.tasks.tolist(), strict=True))) == 5
    with pytest.raises(ValueError):
        TaskData.concat([base, _data(6)])  # other base tensors


# ---- sources ------------------------------------------------------------------------------------------
@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No environment folders and an empty system folder: only what a test puts there is found."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (system,))
    return tmp_path


def test_reads_debian_gz_layout_into_a_writable_root(isolated):
    write_idx(isolated / "system" / "fashion-mnist", 20, gz=True)
    train, test = load_image_dataset("fashion_mnist", isolated / "root", download=False)
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 10 and test.labels.tolist() == list(range(10))
    assert (isolated / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_env_var_is_searched(isolated, monkeypatch):
    write_idx(isolated / "env" / "MNIST" / "raw", 20, gz=False)
    monkeypatch.setenv(sources.ENV_VAR, str(isolated / "env"))
    train, _ = load_image_dataset("mnist", isolated / "root", download=False)
    assert len(train) == 20


def test_missing_data_names_every_folder_searched(isolated):
    with pytest.raises(DataNotFoundError) as info:
        load_image_dataset("mnist", isolated / "root", download=False)
    message = str(info.value)
    assert str(isolated / "root" / "MNIST" / "raw") in message
    assert str(isolated / "system") in message
    assert "LIFELONG_DATA_DIR" in message and "dataset.root" in message


def test_corrupt_files_are_reported(isolated):
    raw = isolated / "root" / "MNIST" / "raw"
    write_idx(raw, 20, gz=False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte is cut short"):
        load_image_dataset("mnist", isolated / "root", download=False)


# ---- the permuted stream ------------------------------------------------------------------------------
def _stream(root: Path, **kw) -> PermutedStream:
    dm = PermutedStream(source="mnist", root=str(root), download=False, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_permutations_are_reproducible_and_applied(mnist_root):
    a = _stream(mnist_root, num_tasks=3, seed=4)
    b = _stream(mnist_root, num_tasks=3, seed=4)
    c = _stream(mnist_root, num_tasks=3, seed=5)
    assert torch.equal(a.perms, b.perms) and not torch.equal(a.perms, c.perms)
    assert all(sorted(p.tolist()) == list(range(784)) for p in a.perms)
    assert a.describe() == b.describe()
    # a batch of task 2 is the standardised images with their pixels permuted by perms[2]
    x, y, t, _ = next(iter(a.loader(a.test_data(2), train=False)))
    raw = a.test_data(2).images[: len(y)].float().view(len(y), -1) / 255
    plain = (raw - raw.mean()) / raw.std()
    assert t.unique().tolist() == [2] and x.shape == (1024, 1, 28, 28)
    assert torch.corrcoef(torch.stack([x.view(len(y), -1).flatten(), plain[:, a.perms[2]].flatten()]))[0, 1] > 0.999
    # the joint baseline's mixed batches permute each sample by its own task
    mixed = TaskData.concat([a.test_data(0), a.test_data(1)])
    rows = torch.tensor([0, 10_000])  # sample 0 as task 0 and as task 1
    mixed = TaskData(mixed.images, mixed.labels, mixed.rows[rows], mixed.tasks[rows], None)
    xm, _, tm, _ = next(iter(TensorBatchLoader(mixed, 2, a.transform)))
    x0, _, _, _ = next(iter(TensorBatchLoader(a.test_data(0), 1, a.transform)))
    x1, _, _, _ = next(iter(TensorBatchLoader(a.test_data(1), 1, a.transform)))
    assert tm.tolist() == [0, 1] and torch.equal(xm[0], x0[0]) and torch.equal(xm[1], x1[0])


def test_unstandardised_pixels_stay_in_unit_range_with_black_at_zero(mnist_root):
    a = _stream(mnist_root, num_tasks=2, seed=4, standardize=False)
    x, _, _, _ = next(iter(a.loader(a.test_data(1), train=False)))
    raw = a.test_data(1).images[: x.shape[0]].float().view(x.shape[0], -1) / 255
    torch.testing.assert_close(x.view(x.shape[0], -1), raw[:, a.perms[1]])
    assert x.min() == 0 and x.max() == 1
    assert a.describe()["standardize"] is False and _stream(mnist_root, num_tasks=2).describe()["standardize"]
    with pytest.raises(ValueError, match="standardize must be true or false"):
        PermutedStream(num_tasks=2, standardize="no")


def test_resume_accepts_a_checkpoint_from_before_a_stream_field_existed(mnist_root):
    a = _stream(mnist_root, num_tasks=2)
    older = {k: v for k, v in a.describe().items() if k != "standardize"}  # written before the option existed
    a.load_state_dict({"describe": older})
    with pytest.raises(ResumeError, match="different task stream"):
        a.load_state_dict({"describe": {**older, "seed": 99}})


def test_stream_clock(mnist_root):
    dm = PermutedStream(num_tasks=3, epochs_per_task=2, root=str(mnist_root))
    assert dm.max_epochs == 6
    assert [dm.task_of_epoch(e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    steps = [dm.step(e, b, 3) for e in range(6) for b in range(3)]  # 3 batches an epoch
    assert [(s.task, s.epoch_in_task) for s in steps[::3]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [i for i, s in enumerate(steps) if s.starts_task] == [0, 6, 12]  # a task's first batch
    assert [i for i, s in enumerate(steps) if s.ends_task] == [5, 11, 17]  # the last batch of its last epoch
    with pytest.raises(ValueError, match="num_tasks"):
        PermutedStream(num_tasks=0)
    with pytest.raises(ValueError, match="epochs_per_task"):
        PermutedStream(num_tasks=2, epochs_per_task=0)
