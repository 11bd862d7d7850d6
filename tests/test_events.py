"""Task boundaries are events the stream's clock raises at a step: a stream whose boundaries fall inside an epoch
drives every method, and the module's evaluation, with no change to either."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lifelong import train_stream
from lifelong.data import SplitStream, TaskData
from lifelong.data.schedule import Step
from lifelong.data.tensors import Batch, TensorBatchLoader
from lifelong.methods import ContinualMethod
from lifelong.methods.base import stream_needs
from lifelong.models import MLP, ContinualClassifier

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


class _Chained:
    """Loaders one after another, as one loader (what Lightning needs: iteration and a length)."""

    def __init__(self, loaders: list[TensorBatchLoader]) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[Batch]:
        for loader in self.loaders:
            yield from loader


class SinglePassSplit(SplitStream):
    """Split MNIST in one epoch: every task's batches one after another, so each boundary but the last falls in
    the middle of the epoch. Only the clock (``step``) and the training loader differ from the base stream's."""

    @property
    def max_epochs(self) -> int:
        return 1

    def task_of_epoch(self, epoch: int) -> int:
        return self.num_tasks - 1

    def _task_data(self, task: int) -> TaskData:
        needs = self.needs
        data = TaskData.concat(self._train[: task + 1]) if needs.cumulative else self._train[task]
        return needs.training_data(self, data, task, 0) if needs.training_data is not None else data

    def train_dataloader(self) -> _Chained:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        self._loaders = [
            self.loader(self._task_data(t), train=True, epoch=epoch, rows=self.needs.rows)
            for t in range(self.num_tasks)
        ]
        return _Chained(self._loaders)

    def last_steps(self) -> list[int]:
        """The batch index of each task's last step in the epoch."""
        ends = torch.tensor([len(loader) for loader in self._loaders]).cumsum(0) - 1
        return ends.tolist()

    def step(self, epoch: int, batch: int, num_batches: int) -> Step:
        ends = self.last_steps()
        task = next(t for t, end in enumerate(ends) if batch <= end)
        start = ends[task - 1] + 1 if task else 0
        return Step(task=task, epoch_in_task=0, starts_task=batch == start, ends_task=batch == ends[task])


class Recorder(ContinualMethod):
    """Records the events it receives: (event, task, the batch index of the step, last)."""

    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch_idx

    def on_task_start(self, trainer, module, task) -> None:
        self.events.append(("start", task, self._batch, False))

    def on_task_end(self, trainer, module, task, last) -> None:
        self.events.append(("end", task, self._batch, last))


def _method(name: str) -> ContinualMethod:
    """``conf/method/<name>.yaml``, composed as train.py composes it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return instantiate(compose(config_name="train", overrides=[f"method={name}"]).method)


@pytest.mark.integration
@pytest.mark.parametrize("name", METHODS)
def test_every_method_gets_its_task_end_at_a_boundary_inside_the_epoch(name, mnist_root, tmp_path):
    stream = SinglePassSplit(
        num_tasks=3, root=str(mnist_root), scenario="task", max_train_samples=256, max_test_samples=100, batch_size=32
    )
    stream.prepare_data()
    stream.setup("fit")
    method, recorder = _method(name), Recorder()
    ends: list[tuple[int, int, bool]] = []
    original = method.on_task_end

    def on_task_end(trainer, module, task, last):
        ends.append((task, recorder._batch, last))
        original(trainer, module, task, last)

    method.on_task_end = on_task_end  # type: ignore[method-assign]
    net = method.configure_network(MLP(stream.input_shape, stream.num_classes, hidden_sizes=(64, 64)), stream)
    module = ContinualClassifier.for_stream(net, functools.partial(torch.optim.Adam, lr=1e-3), stream)
    metrics = train_stream(stream, module, tmp_path, callbacks=[method, recorder], logger=False, progress_bar=False)

    last_steps = stream.last_steps()
    assert last_steps[0] > 0 and last_steps[1] < last_steps[-1]  # boundaries inside the one epoch
    assert ends == [(t, end, t == 2) for t, end in enumerate(last_steps)]
    starts = [0, last_steps[0] + 1, last_steps[1] + 1]
    assert [e for e in recorder.events if e[0] == "start"] == [("start", t, s, False) for t, s in enumerate(starts)]
    matrix = metrics["accuracy_matrix"]
    assert len(matrix) == 3 and all(0 <= a <= 1 for row in matrix for a in row)  # a row at each boundary
    assert matrix[0][1:] != matrix[1][1:] or matrix[0][0] != matrix[1][0]  # measured after different steps


def test_two_methods_that_choose_the_training_data_are_refused_together():
    with pytest.raises(ValueError, match="methods icarl and dwa each choose the training data"):
        stream_needs([_method("icarl"), _method("dwa")])
    needs = stream_needs([_method("joint"), _method("der")])
    assert needs.cumulative and needs.rows and needs.training_data is None
