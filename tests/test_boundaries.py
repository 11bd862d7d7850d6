"""Streams without sharp boundaries (blurry, fuzzy), tasks of different lengths, the online setting, and
``boundaries=hidden`` (no task event reaches a method)."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

from lifelong import train_stream
from lifelong.data import SplitStream, TaskData
from lifelong.data.boundaries import Boundaries, blurry_segments, fuzzy_segments
from lifelong.data.tensors import TensorBatchLoader
from lifelong.errors import ResumeError
from lifelong.methods import ContinualMethod
from lifelong.models import MLP, ContinualClassifier
from tests.conftest import QUIET, run_and_resume, run_train


def _tasks(sizes: list[int]) -> list[TaskData]:
    """Tasks of the given sizes over one base tensor (rows 0..N-1, task t's rows consecutive)."""
    n = sum(sizes)
    images, labels = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n) % 10
    out, start = [], 0
    for t, size in enumerate(sizes):
        rows = torch.arange(start, start + size)
        out.append(TaskData(images, labels, rows, torch.full_like(rows, t), t))
        start += size
    return out


def _pairs(segments: list[TaskData]) -> Counter:
    return Counter((int(r), int(t)) for d in segments for r, t in zip(d.rows, d.tasks, strict=True))


@pytest.mark.parametrize("into", ["others", "neighbours"])
def test_blurry_segments_hold_each_sample_once_and_move_the_share(into):
    tasks = _tasks([1000, 800, 1200, 600])
    segments = blurry_segments(tasks, 0.1, into, seed=0)
    assert _pairs(segments) == _pairs(tasks) and max(_pairs(segments).values()) == 1  # each sample exactly once
    for t, d in enumerate(tasks):
        moved = {u: int((s.tasks == t).sum()) for u, s in enumerate(segments) if u != t}
        assert sum(moved.values()) == round(0.1 * len(d))  # Blurry10: a tenth of each task moves
        receivers = [u for u in moved if moved[u]]
        if into == "others":  # spread evenly over every other task
            assert receivers == [u for u in range(4) if u != t] and max(moved.values()) - min(moved.values()) <= 1
        else:
            assert set(receivers) == {u for u in (t - 1, t + 1) if 0 <= u < 4}
    again = blurry_segments(tasks, 0.1, into, seed=0)
    assert all(
        torch.equal(a.rows, b.rows) and torch.equal(a.tasks, b.tasks) for a, b in zip(segments, again, strict=True)
    )
    other = blurry_segments(tasks, 0.1, into, seed=1)
    assert any(not torch.equal(a.rows, b.rows) for a, b in zip(segments, other, strict=True))


def test_fuzzy_segments_ramp_around_each_boundary_and_keep_each_tasks_length():
    sizes, width = [1000, 800, 1200], 400
    tasks = _tasks(sizes)
    segments = fuzzy_segments(tasks, width, seed=0)
    assert [len(s) for s in segments] == sizes and max(_pairs(segments).values()) == 1
    assert _pairs(segments) == _pairs(tasks)
    half = width // 2
    for t, s in enumerate(segments):  # outside the ramps (a segment's first and last width/2), only its own task
        core = s.tasks[half if t > 0 else 0 : len(s) - half if t < 2 else len(s)]
        assert (core == t).all()
    for t in range(2):
        this, nxt = segments[t].tasks, segments[t + 1].tasks
        ramp = torch.cat([this[-half:], nxt[:half]]) == t + 1  # the ramp: from task t+1, or not
        quarters = ramp.view(4, -1).float().mean(1)
        assert (quarters.diff() > 0).all() and quarters[0] < 0.25 and quarters[-1] > 0.75  # a rising ramp
    # each task's samples keep one seeded order through its ramps
    for t in range(3):
        mine = torch.cat([s.rows[s.tasks == t] for s in segments])
        assert torch.equal(mine.sort().values, tasks[t].rows) and not torch.equal(mine, tasks[t].rows)
    with pytest.raises(ValueError, match=r"dataset\.ramp_width=900 is longer than the smallest task"):
        fuzzy_segments(_tasks([1000, 800]), 900, seed=0)


def test_bad_boundary_options_say_what_they_take():
    with pytest.raises(ValueError, match=r"dataset\.boundary must be one of"):
        Boundaries("soft")
    with pytest.raises(ValueError, match=r"dataset.blur must be in \(0, 1\)"):
        Boundaries("blurry", blur=1.5)
    with pytest.raises(ValueError, match=r"dataset\.blur_into must be one of"):
        Boundaries("blurry", blur_into="all")


def _stream(mnist_root, **kwargs) -> SplitStream:
    dm = SplitStream(
        "mnist", num_tasks=3, root=str(mnist_root), download=False, scenario="class", max_train_samples=600, **kwargs
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.integration
@pytest.mark.parametrize("boundary", ["blurry", "fuzzy"])
def test_a_pass_of_the_real_stream_serves_each_sample_once_in_the_seeded_order_on_every_rank(mnist_root, boundary):
    dm = _stream(mnist_root, boundary=boundary, ramp_width=200, val_fraction=0.1)
    twin = _stream(mnist_root, boundary=boundary, ramp_width=200, val_fraction=0.1)  # another process, same seed
    assert dm.describe()["segment_sha1"] == twin.describe()["segment_sha1"]
    own = Counter((int(r), t) for t in range(3) for r in dm._train[t].rows)
    served: Counter = Counter()
    for t in range(3):
        data = dm.train_data(t)
        shuffle = boundary == "blurry"
        ranks = [
            TensorBatchLoader(data, 32, dm.transform, shuffle=shuffle, epoch=t, rank=r, world_size=2, pad=True,
                              with_rows=True)
            for r in range(2)
        ]  # fmt: skip
        batches = [list(loader) for loader in ranks]
        assert len(batches[0]) == len(batches[1])  # the ranks step together

        # rank 0 took samples 0, 2, 4, ... of the order, rank 1 the others; the padding (repeats) is cut off
        rows, owners = (
            torch.stack([torch.cat([getattr(b, field) for b in bs]) for bs in batches], 1).flatten()[: len(data)]
            for field in ("rows", "task")
        )
        if not shuffle:  # fuzzy: the ramp's order itself, shared out rank by rank
            assert torch.equal(rows, data.rows) and torch.equal(owners, data.tasks)
        served.update(zip(rows.tolist(), owners.tolist(), strict=True))
    assert served == own  # one pass: each training sample exactly once, none of the validation samples
    rebuilt = _stream(mnist_root, boundary=boundary, ramp_width=200, val_fraction=0.1, seed=1)
    with pytest.raises(ResumeError, match="different task stream"):
        rebuilt.check_state(dm.state_dict())


@pytest.mark.integration
def test_a_fuzzy_online_run_with_tasks_of_different_lengths_resumes_exactly(tmp_path, mnist_root):
    args = [
        "method=der",
        "dataset=split_mnist",
        f"dataset.root={mnist_root}",
        "dataset.num_tasks=3",
        "dataset.scenario=class",
        "class_outputs=all",
        "dataset.online=true",
        "dataset.batch_size=10",
        "dataset.task_sizes=[900,300,600]",
        "dataset.boundary=fuzzy",
        "dataset.ramp_width=200",
        "boundaries=hidden",
        "logger=none",
        *QUIET,
    ]
    a, b = run_and_resume(args, tmp_path)
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["examples_seen"] == b["examples_seen"] == 1800
    assert a["stream"]["segment_sizes"] == [900, 300, 600] and a["stream"]["boundary"] == "fuzzy"
    twice = run_train([*args[:-2], "epochs_per_task=2", "logger=none", *QUIET], tmp_path / "twice")
    assert twice.returncode == 2 and "dataset.online=true sees every sample once" in twice.stderr


class TaskFreeRecorder(ContinualMethod):
    """Records every task event it gets; declares itself task-free so that boundaries=hidden accepts it."""

    name = "recorder"
    needs_boundaries = False  # type: ignore[assignment]

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.evaluations = 0

    def on_task_start(self, trainer, module, task) -> None:
        self.events.append(("start", task))

    def on_task_end(self, trainer, module, task, last) -> None:
        self.events.append(("end", task))

    def before_evaluation(self, trainer, module) -> None:
        self.evaluations += 1


@pytest.mark.integration
@pytest.mark.parametrize("boundaries", ["given", "hidden"])
def test_hidden_boundaries_deliver_no_task_event_and_the_scenario_still_evaluates(tmp_path, mnist_root, boundaries):
    dm = _stream(mnist_root, max_test_samples=200)
    method = TaskFreeRecorder()
    net = MLP(dm.input_shape, dm.num_classes, hidden_sizes=(32,))
    module = ContinualClassifier.for_stream(
        net, functools.partial(torch.optim.Adam, lr=1e-3), dm, class_outputs="all", boundaries=boundaries
    )
    metrics = train_stream(dm, module, tmp_path, callbacks=[method], logger=False, progress_bar=False)
    expected = [(e, t) for t in range(3) for e in ("start", "end")] if boundaries == "given" else []
    assert method.events == expected
    assert method.evaluations == 3 and len(metrics["accuracy_matrix"]) == 3  # evaluated at every task end


def test_methods_that_need_boundaries_are_refused_when_hidden(tmp_path, mnist_root):
    common = ["dataset=split_mnist", f"dataset.root={mnist_root}", "dataset.scenario=class", "logger=none", *QUIET]
    for method in ("ewc", "er"):  # one that consolidates at task ends, one that fills its memory there
        proc = run_train([*common, f"method={method}", "boundaries=hidden", "class_outputs=all"], tmp_path / method)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"method={method} needs the task boundaries" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_train([*common, "method=finetune", "dataset.boundary=blurry"], tmp_path / "seen")
    assert proc.returncode == 2 and "use class_outputs=all" in proc.stderr
    assert not any((tmp_path / d / "metrics.json").exists() for d in ("ewc", "seen"))
