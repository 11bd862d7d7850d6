"""The task streams (split, rotated, dataset sequences, CIFAR, SVHN) and the three scenarios."""

from __future__ import annotations

import functools

import pytest
import torch

from lifelong.data import SequenceStream, SplitStream, TaskStream, load_image_dataset
from lifelong.data import sources as sources_module
from lifelong.data.catalog import RotatedStream
from lifelong.data.transforms import RandomCropFlip
from lifelong.models import MLP, ContinualClassifier
from tests.conftest import compose_run, load_checkpoint, write_vision_fixtures


def _ready(dm: TaskStream) -> TaskStream:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _labels(dm: TaskStream, task: int, train: bool = True) -> torch.Tensor:
    data = dm.train_data(task) if train else dm.test_data(task)
    return data.labels[data.rows]


def _targets(dm: TaskStream, task: int) -> torch.Tensor:
    return torch.cat([y for _, y, _, _ in dm.loader(dm.test_data(task), train=False)])


# ---- split streams --------------------------------------------------------------------------------------
def test_split_tasks_partition_the_labels(mnist_root):
    dm = _ready(SplitStream("mnist", root=str(mnist_root), download=False))
    assert dm.num_tasks == 5 and dm.scenario == "task"
    seen: set[int] = set()
    for t in range(5):
        for train in (True, False):
            assert set(_labels(dm, t, train).unique().tolist()) == {2 * t, 2 * t + 1}
        seen |= set(_labels(dm, t).unique().tolist())
    assert seen == set(range(10))
    assert sum(len(dm.train_data(t)) for t in range(5)) == 60_000
    assert sum(len(dm.test_data(t)) for t in range(5)) == 10_000
    assert dm.describe()["task_labels"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def test_class_orders_are_reproducible_from_the_seed(mnist_root):
    def order(seed: int, class_order="random") -> list[int]:
        return SplitStream("mnist", root=str(mnist_root), class_order=class_order, seed=seed).class_order

    assert order(3) == order(3) and order(3) != order(4) and sorted(order(3)) == list(range(10))
    assert order(0, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0])[:2] == [9, 8]
    for bad in ([1, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1], "shuffled", [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]):
        with pytest.raises(ValueError, match="class_order"):
            order(0, bad)
    with pytest.raises(ValueError, match="6 tasks of 2 classes need 12"):
        SplitStream("mnist", num_tasks=6)
    with pytest.raises(ValueError, match="scenario must be one of"):
        SplitStream("mnist", scenario="instance")


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_scenarios_map_labels_to_their_heads(mnist_root, scenario):
    dm = _ready(
        SplitStream(
            "mnist", root=str(mnist_root), class_order="random", seed=1, scenario=scenario, max_test_samples=300
        )
    )
    order = dm.class_order
    if scenario == "domain":
        assert dm.num_classes == 2 and dm.task_classes == [[0, 1]] * 5
    else:
        assert dm.num_classes == 10 and dm.task_classes == [[2 * t, 2 * t + 1] for t in range(5)]
    for t in range(5):
        base = _labels(dm, t, train=False)
        local = torch.tensor([order[2 * t : 2 * t + 2].index(c) for c in base.tolist()])
        expected = local if scenario == "domain" else local + 2 * t
        assert torch.equal(_targets(dm, t), expected)


# ---- rotated MNIST --------------------------------------------------------------------------------------
def test_rotations_are_seeded_and_rotate_the_images(mnist_root):
    a = RotatedStream(root=str(mnist_root), num_tasks=4, seed=2)
    assert torch.equal(a.angles, RotatedStream(num_tasks=4, seed=2).angles)
    assert not torch.equal(a.angles, RotatedStream(num_tasks=4, seed=3).angles)
    assert bool(((a.angles >= 0) & (a.angles < 180)).all())
    dm = _ready(RotatedStream(root=str(mnist_root), num_tasks=2, angles=[0, 90], max_test_samples=64))
    x0, y0, _, _ = next(iter(dm.loader(dm.test_data(0), train=False)))
    x1, y1, _, _ = next(iter(dm.loader(dm.test_data(1), train=False)))
    assert torch.equal(y0, y1)
    # 90 degrees counter-clockwise maps pixel centres onto pixel centres: exactly torch.rot90
    assert torch.allclose(x1, torch.rot90(x0, 1, dims=(2, 3)), atol=1e-4)
    assert dm.describe()["angles"] == [0.0, 90.0]
    with pytest.raises(ValueError, match="one per task"):
        RotatedStream(num_tasks=3, angles=[0, 10])


# ---- MNIST then USPS ------------------------------------------------------------------------------------
def test_mnist_then_usps(mnist_root):
    usps = load_image_dataset("usps", mnist_root, download=False)[1]
    dm = _ready(SequenceStream(["mnist", "usps"], root=str(mnist_root), image_size=[28, 28], scenario="task"))
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 20
    assert len(dm.test_data(0)) == 10_000 and len(dm.test_data(1)) == len(usps) == 2007
    assert torch.equal(_targets(dm, 1), usps.labels + 10)  # USPS's own head
    # each task is standardised by its own dataset's statistics
    x, _, _, _ = next(iter(dm.loader(dm.train_data(1), train=False)))
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    rev = _ready(SequenceStream(["mnist", "usps"], root=str(mnist_root), image_size=[28, 28], reverse=True))
    assert rev.datasets == ["usps", "mnist"] and len(rev.test_data(0)) == 2007 and rev.num_classes == 20
    dom = _ready(SequenceStream(["mnist", "usps"], root=str(mnist_root), image_size=[28, 28], scenario="domain"))
    assert dom.num_classes == 10 and dom.targets is None


# ---- CIFAR and SVHN, from fixtures in their real formats -----------------------------------------------
@pytest.fixture
def vision_fixtures(tmp_path, monkeypatch):
    """CIFAR-10, CIFAR-100 and SVHN written in their real on-disk formats under one data folder."""
    root = tmp_path / "data"
    write_vision_fixtures(root, monkeypatch)
    monkeypatch.setattr(sources_module, "SYSTEM_DIRS", ())
    monkeypatch.delenv(sources_module.ENV_VAR, raising=False)
    return root


@pytest.mark.parametrize(("name", "num_classes", "train_size"), [("cifar10", 10, 300), ("cifar100", 100, 600)])
def test_cifar_loads_from_its_pickled_batches(vision_fixtures, name, num_classes, train_size):
    train, test = load_image_dataset(name, vision_fixtures, download=False)
    assert train.images.shape == (train_size, 3, 32, 32) and train.images.dtype == torch.uint8
    assert sorted(train.labels.unique().tolist()) == list(range(num_classes))
    # the fixture wrote each label into the top-left corner of every channel: the layout survived loading
    assert torch.equal(train.images[:, :, 0, 0], (train.labels * 2).unsqueeze(1).expand(-1, 3).to(torch.uint8))
    assert len(test) == 2 * num_classes


def test_svhn_loads_from_its_mat_files(vision_fixtures):
    train, test = load_image_dataset("svhn", vision_fixtures, download=False)
    assert train.images.shape == (200, 3, 32, 32)
    assert sorted(train.labels.unique().tolist()) == list(range(10))  # SVHN's label 10 is the digit 0
    assert torch.equal(train.images[:, 1, 0, 0], (train.labels * 2).to(torch.uint8))
    assert len(test) == 40


def test_corrupt_cifar_is_reported(vision_fixtures):
    (vision_fixtures / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(sources_module.CorruptDataError, match=r"data_batch_1 fails torchvision's MD5 check"):
        load_image_dataset("cifar10", vision_fixtures, download=False)


def test_split_cifar100_in_twenty_tasks(vision_fixtures):
    dm = _ready(SplitStream("cifar100", classes_per_task=5, root=str(vision_fixtures), download=False))
    assert dm.num_tasks == 20 and dm.input_shape == (3, 32, 32)
    assert set(_labels(dm, 19).tolist()) == {95, 96, 97, 98, 99}
    # standardised per channel by the training set's statistics
    x = torch.cat([x for t in range(20) for x, _, _, _ in dm.loader(dm.train_data(t), train=False)])
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_random_crop_flip():
    aug = RandomCropFlip(padding=4)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, aug(x, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):  # every output is an 8 x 8 window of the padded image, possibly mirrored
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    outs = {tuple(aug(x, torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(6)}
    assert len(outs) > 1


# ---- the heads ------------------------------------------------------------------------------------------
def _module(scenario: str, net: torch.nn.Module | None = None, **kwargs) -> ContinualClassifier:
    net = net or MLP((1, 4, 4), 6, hidden_sizes=[8])
    opt = functools.partial(torch.optim.SGD, lr=0.1)
    return ContinualClassifier(net, opt, 3, 6, scenario=scenario, task_classes=[[0, 1], [2, 3], [4, 5]], **kwargs)


def test_class_scenario_head_covers_the_classes_seen_so_far():
    module = _module("class")
    everything = _module("class", class_outputs="all")  # the official code's convention (Buzzega et al.)
    x = torch.randn(5, 1, 4, 4)
    for task, width in ((0, 2), (1, 4), (2, 6)):
        module.current_task = everything.current_task = task
        assert module(x, torch.zeros(5, dtype=torch.long)).shape == (5, width)
        assert everything(x, torch.zeros(5, dtype=torch.long)).shape == (5, 6)
    with pytest.raises(ValueError, match="class_outputs must be one of"):
        _module("class", class_outputs="future")


@pytest.mark.parametrize("class_outputs", ["seen", "all"])
def test_class_scenario_also_measures_each_sample_among_its_own_tasks_classes(class_outputs):
    module = _module("class", net=torch.nn.Flatten(), class_outputs=class_outputs)  # the input is the logits
    module.current_task = 1  # classes 0-3 seen
    logits = torch.tensor(
        [
            [0.0, 1.0, 5.0, 0.0, 9.0, 0.0],  # task 0, label 1: class-IL says 2 (or 4 with all outputs), task-aware 1
            [3.0, 1.0, 0.0, 2.0, 0.0, 0.0],  # task 1, label 3: class-IL says 0, task-aware 3
            [0.0, 0.0, 4.0, 1.0, 0.0, 0.0],  # task 1, label 2: right either way
        ]
    )
    module._measure(0, logits, torch.tensor([1, 3, 2]), torch.tensor([0, 1, 1]))  # the test set of task 1 (loader 0)
    _, test, aware = module._computed_rows()
    assert test[0] == pytest.approx(1 / 3) and aware[0] == 1.0
    assert len(_module("task").task_aware_acc) == len(_module("domain").task_aware_acc) == 0  # nothing to add


def test_task_scenario_uses_each_samples_own_head():
    module = _module("task")
    x, task = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    logits = module(x, task)
    pred = logits.argmax(-1)
    assert torch.equal(pred // 2, task)  # every prediction is a class of the sample's own task
    loss = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([1]))  # one sample of task 0
    loss.backward()
    head = module.net.layers[-1]
    assert head.weight.grad[2:].abs().sum() == 0 and head.weight.grad[:2].abs().sum() > 0
    assert torch.isfinite(torch.log_softmax(logits, -1)[logits > -1e30]).all()


# ---- every stream runs through train.py ----------------------------------------------------------------
SMALL = ["dataset.max_train_samples=300", "dataset.max_test_samples=100", "logger=none"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset=split_mnist", "dataset.num_tasks=2", "dataset.scenario=task"],
        ["dataset=split_mnist", "dataset.num_tasks=2", "dataset.scenario=domain", "method=joint"],
        ["dataset=split_mnist", "dataset.num_tasks=2", "dataset.scenario=class", "dataset.class_order=random"],
        ["dataset=rotated_mnist", "dataset.num_tasks=2", "model=cnn"],
        ["dataset=rotated_mnist", "dataset.num_tasks=2", "dataset.scenario=task", "method=online_ewc"],
        ["dataset=permuted_mnist", "dataset.num_tasks=2", "dataset.scenario=class"],
        ["dataset=mnist_usps", "model=mlp6"],
        ["dataset=mnist_usps", "dataset.scenario=task", "dataset.reverse=true", "method=joint"],
        ["dataset=mnist_usps", "dataset.scenario=class"],
    ],
    ids=lambda o: "-".join(v.split("=")[1] for v in o),
)
def test_streams_run_on_real_data(mnist_root, tmp_path, overrides):
    m = compose_run([*overrides, *SMALL, f"dataset.root={mnist_root}"], tmp_path)
    _check_run(m, tmp_path)


@pytest.mark.integration
def test_split_fashion_mnist_runs(fashion_available, tmp_path):
    m = compose_run(["dataset=split_fashion_mnist", "dataset.num_tasks=2", *SMALL], tmp_path)
    _check_run(m, tmp_path)
    assert m["stream"]["source"] == "fashion_mnist"


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        ["dataset=split_cifar10", "dataset.num_tasks=2", "model=resnet18_reduced", "dataset.augment=true"],
        ["dataset=split_cifar100", "dataset.classes_per_task=5", "dataset.num_tasks=2", "model=alexnet"],
        ["dataset=dataset_sequence", "dataset.datasets=[svhn,cifar10]", "model=alexnet"],
        ["dataset=dataset_sequence", "dataset.datasets=[cifar100,svhn]", "dataset.scenario=class", "model=cnn"],
    ],
    ids=["split_cifar10", "split_cifar100", "sequence", "sequence-class"],
)
def test_streams_run_on_fixtures(vision_fixtures, tmp_path, overrides):
    m = compose_run([*overrides, "logger=none", "dataset.batch_size=32", f"dataset.root={vision_fixtures}"], tmp_path)
    _check_run(m, tmp_path)


def test_sequence_stream_mixture_with_grey_and_colour(vision_fixtures, mnist_root, monkeypatch):
    monkeypatch.setenv(sources_module.ENV_VAR, str(mnist_root))
    dm = _ready(SequenceStream(["mnist", "svhn", "cifar100"], root=str(vision_fixtures), max_train_samples=50))
    assert dm.input_shape == (3, 28, 28)  # the first dataset's size, the most channels of any
    assert dm.task_classes[2] == list(range(20, 120)) and dm.num_classes == 120
    x, _, _, _ = next(iter(dm.loader(dm.train_data(0), train=True)))
    assert x.shape[1:] == (3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 2])  # grey MNIST repeated into three channels
    with pytest.raises(ValueError, match="same number of classes"):
        _ready(SequenceStream(["mnist", "cifar100"], root=str(vision_fixtures), scenario="domain"))


def _check_run(m: dict, run_dir) -> None:
    """Two tasks: a 2 x 2 matrix, the scenario and the stream's randomness recorded, checkpoints written."""
    assert len(m["accuracy_matrix"]) == 2 and all(len(r) == 2 for r in m["accuracy_matrix"])
    assert all(0 <= v <= 1 for r in m["accuracy_matrix"] for v in r)
    assert m["scenario"] == m["stream"]["scenario"]
    if m["scenario"] == "class":  # the second task's classes are not in the head until it is trained
        assert m["accuracy_matrix"][0][1] == 0.0
        # the Task-IL view of the run: ranking among fewer classes turns no right answer wrong
        aware, matrix = torch.tensor(m["task_aware_accuracy_matrix"]), torch.tensor(m["accuracy_matrix"])
        assert (aware >= matrix).all() and m["task_aware_avg_accuracy"] == pytest.approx(aware[-1].mean().item())
    else:
        assert "task_aware_avg_accuracy" not in m
    assert (run_dir / "accuracy_matrix.png").is_file() and (run_dir / "accuracy_matrix.csv").is_file()
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (stream_state,) = [v for k, v in ckpt.items() if k.endswith("Stream")]
    assert stream_state["describe"] == m["stream"]


# ---- the known results, on real data --------------------------------------------------------------------
@pytest.mark.integration
def test_mnist_usps_ewc_keeps_more_mnist(mnist_root, tmp_path):
    # lambda 600: the second task (USPS, 7,291 images) is small, so the default 60 protects MNIST only a little
    common = ["dataset=mnist_usps", "model=mlp6", "logger=none", "seed=0"]
    runs = {
        "finetune": compose_run(["method=finetune", *common], tmp_path / "finetune"),
        "ewc": compose_run(["method=ewc", "method.ewc_lambda=600", *common], tmp_path / "ewc"),
    }
    ewc, ft = runs["ewc"]["accuracy_matrix"], runs["finetune"]["accuracy_matrix"]
    assert len(ewc) == 2 and len(ewc[0]) == 2 and (tmp_path / "ewc" / "accuracy_matrix.csv").is_file()
    assert ewc[1][0] > ft[1][0] + 0.10, (ewc[1][0], ft[1][0])  # MNIST after USPS
    assert ewc[1][1] > 0.85  # while still learning USPS
