"""Datasets of one image file per sample: GTSRB through torchvision's class, and any ImageFolder dataset as
``image_folder:PATH`` (notMNIST, FaceScrub, a user's own data); the mixture names whatever is missing."""

from __future__ import annotations

import pytest
import torch

from lifelong.data import SequenceStream, load_image_dataset
from lifelong.data.sources import load_image_folder
from lifelong.errors import CorruptDataError, DataNotFoundError
from tests.conftest import (
    QUIET,
    compose_run,
    run_train,
    write_gtsrb,
    write_idx,
    write_image_folder,
    write_vision_fixtures,
)


def test_gtsrb_loads_from_its_ppm_files(tmp_path):
    write_gtsrb(tmp_path)
    train, test = load_image_dataset("gtsrb", tmp_path, download=False)
    assert train.images.shape == (86, 3, 32, 32) and test.images.shape == (86, 3, 32, 32)
    assert train.labels.tolist() == [c for c in range(43) for _ in range(2)]
    assert test.labels.tolist() == [i % 43 for i in range(86)]
    # the label survives the resize in the encoded quarter (40 * label)
    expected = (40 * train.labels % 256).float()
    torch.testing.assert_close(train.images[:, 0, 2, 2].float(), expected, atol=3, rtol=0)
    small, _ = load_image_dataset("gtsrb", tmp_path, download=False, size=(16, 16))
    assert small.images.shape == (86, 3, 16, 16)


def test_image_folder_split_is_fixed_and_stratified(tmp_path):
    write_image_folder(tmp_path / "digits", classes=3, per_class=10)
    train, test = load_image_dataset("image_folder:digits", tmp_path, download=False)
    assert train.images.shape == (24, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)  # grey read as RGB
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]  # 20 % of every class
    again = load_image_dataset(f"image_folder:{tmp_path / 'digits'}", None, download=False)[1]  # absolute path
    assert torch.equal(again.images, test.images)  # the split does not depend on anything but the folder
    # a folder with its own split keeps it
    write_image_folder(tmp_path / "own" / "train", per_class=4)
    write_image_folder(tmp_path / "own" / "test", per_class=2, seed=1)
    train, test = load_image_folder(tmp_path / "own", (8, 8))
    assert (len(train), len(test), tuple(train.images.shape[2:])) == (12, 6, (8, 8))


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"ImageFolder layout") as err:
        load_image_dataset("image_folder:no_such_folder", tmp_path, download=False)
    assert str(tmp_path / "no_such_folder") in str(err.value)
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(CorruptDataError, match=r"the image .*broken/a/x\.png cannot be read"):
        load_image_dataset("image_folder:broken", tmp_path, download=False)
    with pytest.raises(ValueError, match="image_folder:PATH"):
        SequenceStream(["mnist", "image_folder:"])
    with pytest.raises(ValueError, match="unknown dataset source"):
        SequenceStream(["mnist", "notmnist"])


def test_sequence_names_every_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("LIFELONG_DATA_DIR", raising=False)
    dm = SequenceStream(["gtsrb", "image_folder:notmnist", "svhn"], root=str(tmp_path), download=False)
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert message.startswith("3 of the 3 datasets of this sequence are missing: gtsrb, image_folder:notmnist, svhn")
    assert str(tmp_path / "notmnist") in message and "gtsrb/GTSRB/Training" in message


def test_mixture_preset_reports_its_missing_datasets(tmp_path, mnist_root):
    write_gtsrb(tmp_path / "data")
    # Fashion-MNIST as a fixture of its own: the count below must not depend on Debian's package being installed
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw")
    proc = run_train(
        ["dataset=mixture", "model=alexnet", f"dataset.root={tmp_path / 'data'}", "dataset.download=false", *QUIET],
        tmp_path / "run",
        env={"LIFELONG_DATA_DIR": str(mnist_root)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    first = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    # MNIST (LIFELONG_DATA_DIR) and the GTSRB fixture are found; the others are named
    assert "5 of the 8 datasets" in first
    for name in ("image_folder:facescrub", "cifar100", "image_folder:notmnist", "svhn", "cifar10"):
        assert name in first
    assert "gtsrb," not in first and " mnist" not in first


def test_seed_shuffles_the_mixture_order():
    listed = ["mnist", "cifar10", "svhn", "usps", "cifar100", "gtsrb", "fashion_mnist", "image_folder:x"]
    assert SequenceStream(listed, shuffle=True, seed=0).datasets == listed  # the published seed-0 order
    other = SequenceStream(listed, shuffle=True, seed=3).datasets
    assert sorted(other) == sorted(listed) and other != listed
    assert other == SequenceStream(listed, shuffle=True, seed=3).datasets


@pytest.mark.integration
def test_dwa_on_a_sequence_with_an_image_folder(mnist_root, tmp_path):
    write_image_folder(tmp_path / "shapes", classes=3, per_class=60)
    m = compose_run(
        [
            "method=dwa",
            "dataset=dataset_sequence",
            f"dataset.datasets=[mnist,image_folder:{tmp_path / 'shapes'}]",
            "dataset.image_size=[28,28]",
            "dataset.channels=1",
            f"dataset.root={mnist_root}",
            "dataset.max_train_samples=300",
            "dataset.max_test_samples=100",
            "dataset.batch_size=8",
            "epochs_per_task=2",
            "dataset.val_fraction=0",  # the folder's few images all train
            "logger=none",
        ],
        tmp_path / "run",
    )
    assert m["stream"]["datasets"][1] == f"image_folder:{tmp_path / 'shapes'}"
    assert m["stream"]["task_classes"] == [list(range(10)), list(range(10, 13))]
    assert m["accuracy_matrix"][1][1] > 0.9, m["accuracy_matrix"]  # the label is in the images: it is learnt


@pytest.fixture
def mixture_root(tmp_path, monkeypatch, mnist_root, fashion_available):
    """All eight datasets of the mixture: CIFAR-10/100, SVHN, GTSRB, FaceScrub (100 classes) and notMNIST as
    fixtures in their real on-disk formats, MNIST (LIFELONG_DATA_DIR) and Fashion-MNIST (Debian) real."""
    root = tmp_path / "data"
    write_vision_fixtures(root, monkeypatch)
    write_gtsrb(root)
    write_image_folder(root / "facescrub", classes=100, per_class=5, grey=False)
    write_image_folder(root / "notmnist", classes=10, per_class=10)
    monkeypatch.setenv("LIFELONG_DATA_DIR", str(mnist_root))
    return root


def test_mixture_builds_from_its_eight_sources(mixture_root):
    from hydra.utils import instantiate

    from tests.test_config import _compose

    cfg = _compose(
        mixture_root,
        ["dataset=mixture", f"dataset.root={mixture_root}", "dataset.max_train_samples=20", "dataset.val_fraction=0"],
    )
    dm = instantiate(cfg.dataset)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.datasets[:2] == ["image_folder:facescrub", "mnist"] and dm.num_tasks == 8
    assert dm.input_shape == (3, 32, 32)
    assert [len(c) for c in dm.task_classes] == [100, 10, 100, 10, 10, 10, 43, 10]
    assert len(dm.test_data(0)) == 100 and len(dm.train_data(6)) == 20  # FaceScrub's 20 % held out; a subset


@pytest.mark.slow
def test_dwa_runs_on_the_mixture_with_alexnet(mixture_root, tmp_path):
    """``python train.py method=dwa dataset=mixture model=alexnet``, on fixtures and tiny subsets."""
    m = compose_run(
        [
            "method=dwa",
            "dataset=mixture",
            "model=alexnet",
            f"dataset.root={mixture_root}",
            "dataset.max_train_samples=16",
            "dataset.max_test_samples=8",
            "dataset.val_fraction=0",  # 16 samples of up to 100 classes: too few to hold any out
            "dataset.batch_size=8",
            "method.anchor_samples=8",
            "logger=none",
        ],
        tmp_path / "run",
    )
    assert len(m["accuracy_matrix"]) == 8 and m["stream"]["datasets"][-1] == "fashion_mnist"
