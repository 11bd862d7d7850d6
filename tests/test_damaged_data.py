"""Damaged or inconsistent data files: every source (IDX, CIFAR, SVHN, GTSRB, image folders) is checked when it
is loaded, and train.py refuses the run with one message naming the file, exit 2, before anything trains.

Each case writes a real on-disk fixture, damages it the way files get damaged (the other split's file, a cut
copy, a wrong label, an empty class, mixed-up names), and runs train.py on it in this process.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from tests.conftest import (
    QUIET,
    patch_checksums,
    refused_run,
    run_train,
    write_cifar,
    write_gtsrb,
    write_idx,
    write_image_folder,
    write_svhn,
)

NO_LOGS = ["logger=none", "dataset.download=false"]


@pytest.fixture
def root(tmp_path, monkeypatch):
    """The data folder of the case; no other folder is searched."""
    monkeypatch.setenv("LIFELONG_DATA_DIR", "")
    from lifelong.data import sources

    monkeypatch.setattr(sources, "SYSTEM_DIRS", ())
    return tmp_path / "data"


def _mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    write_idx(raw)
    return raw


def _idx_labels(path: Path, labels: list[int]) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + bytes(labels))


# ---- IDX (MNIST) -------------------------------------------------------------------------------------------------
def idx_other_splits_labels(root: Path) -> tuple[list[str], list[str]]:
    """The issue's example: the training labels are the test set's label file."""
    raw = _mnist(root)
    shutil.copy(raw / "t10k-labels-idx1-ubyte", raw / "train-labels-idx1-ubyte")
    return [], [f"{raw / 'train-labels-idx1-ubyte'} holds 10 labels", f"{raw / 'train-images-idx3-ubyte'} holds 20"]


def idx_cut_short(root: Path) -> tuple[list[str], list[str]]:
    raw = _mnist(root)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    return [], [f"{images} is cut short", "7,856 bytes with the header", "holds 7,756 bytes"]


def idx_mixed_up_names(root: Path) -> tuple[list[str], list[str]]:
    raw = _mnist(root)
    shutil.copy(raw / "train-labels-idx1-ubyte", raw / "train-images-idx3-ubyte")
    return [], [f"{raw / 'train-images-idx3-ubyte'} is a labels file", "mixed up"]


def idx_label_out_of_range(root: Path) -> tuple[list[str], list[str]]:
    raw = _mnist(root)
    _idx_labels(raw / "train-labels-idx1-ubyte", [c % 10 for c in range(19)] + [12])
    return [], ["1 label outside its class range [0, 10) (e.g. 12)", str(raw / "train-labels-idx1-ubyte")]


def idx_class_with_no_image(root: Path) -> tuple[list[str], list[str]]:
    raw = _mnist(root)
    _idx_labels(raw / "t10k-labels-idx1-ubyte", [c % 9 for c in range(10)])  # no 9 in the test split
    return [], ["test split has no image of class 9 (of 10)", str(raw / "t10k-labels-idx1-ubyte")]


def idx_test_of_another_size(root: Path) -> tuple[list[str], list[str]]:
    raw = _mnist(root)
    other = root / "other"
    write_idx(other, size=32)
    shutil.copy(other / "t10k-images-idx3-ubyte", raw / "t10k-images-idx3-ubyte")
    return [], [f"test images ({raw / 't10k-images-idx3-ubyte'}) are 1 x 32 x 32", "training images 1 x 28 x 28"]


def idx_images_too_small(root: Path) -> tuple[list[str], list[str]]:
    write_idx(root / "MNIST" / "raw", size=2)
    return [], ["images of 2 x 2 pixels", str(root / "MNIST" / "raw" / "train-images-idx3-ubyte"), "at least 4 x 4"]


# ---- CIFAR and SVHN (checksummed formats) --------------------------------------------------------------------------
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_fails_its_md5(root: Path, monkeypatch) -> tuple[list[str], list[str]]:
    patch_checksums(monkeypatch, cifar10=write_cifar(root, hundred=False))
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-50])  # a copy cut short
    return ["dataset=split_cifar10"], [f"{batch} fails torchvision's MD5 check"]


def cifar_batch_with_fewer_labels(root: Path, monkeypatch) -> tuple[list[str], list[str]]:
    sums = write_cifar(root, hundred=False)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.loads(batch.read_bytes())
    entry["labels"] = entry["labels"][:-4]
    batch.write_bytes(pickle.dumps(entry, protocol=2))
    sums["train_list"] = [[name, _md5(root / "cifar-10-batches-py" / name)] for name, _ in sums["train_list"]]
    patch_checksums(monkeypatch, cifar10=sums)  # an intact file of a wrong dataset: its sums match
    return ["dataset=split_cifar10"], [f"{batch} holds 60 images but 56 labels"]


def cifar100_label_out_of_range(root: Path, monkeypatch) -> tuple[list[str], list[str]]:
    sums = write_cifar(root, hundred=True)
    test = root / "cifar-100-python" / "test"
    entry = pickle.loads(test.read_bytes())
    entry["fine_labels"][0] = 100
    test.write_bytes(pickle.dumps(entry, protocol=2))
    sums["test_list"] = [["test", _md5(test)]]
    patch_checksums(monkeypatch, cifar100=sums)
    return ["dataset=split_cifar100"], ["outside its class range [0, 100) (e.g. 100)", str(test)]


def _svhn_with(root: Path, monkeypatch, change) -> Path:
    split_list = write_svhn(root)
    path = root / "SVHN" / "train_32x32.mat"
    mat = scipy.io.loadmat(path)
    scipy.io.savemat(path, change({"X": mat["X"], "y": mat["y"]}))
    split_list["train"][2] = _md5(path)
    patch_checksums(monkeypatch, svhn=split_list)
    return path


def svhn_count_mismatch(root: Path, monkeypatch) -> tuple[list[str], list[str]]:
    path = _svhn_with(root, monkeypatch, lambda m: {"X": m["X"], "y": m["y"][:-5]})
    return ["dataset=dataset_sequence", "dataset.datasets=[svhn]"], ["200 images but 195 labels", str(path)]


def svhn_four_channels(root: Path, monkeypatch) -> tuple[list[str], list[str]]:
    path = _svhn_with(root, monkeypatch, lambda m: {"X": np.concatenate([m["X"], m["X"][:, :, :1]], 2), "y": m["y"]})
    return ["dataset=dataset_sequence", "dataset.datasets=[svhn]"], ["shape (4, 32, 32)", str(path), "1 (grey) or 3"]


def usps_label_out_of_range(root: Path) -> tuple[list[str], list[str]]:
    """USPS's LIBSVM text (``label 1:v ... 256:v``, labels 1-10), bz2-compressed; a label 0 reads as -1."""
    import bz2

    folder = root / "USPS"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, labels in (("usps.bz2", [0] + [c % 10 + 1 for c in range(1, 20)]), ("usps.t.bz2", list(range(1, 11)))):
        lines = [f"{k} " + " ".join(f"{i + 1}:{v:.4f}" for i, v in enumerate(rng.uniform(-1, 1, 256))) for k in labels]
        (folder / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return ["dataset=dataset_sequence", "dataset.datasets=[usps]"], ["(e.g. -1) in", str(folder / "usps.bz2")]


# ---- one file per image: GTSRB and image folders --------------------------------------------------------------
def gtsrb_csv_class_out_of_range(root: Path) -> tuple[list[str], list[str]]:
    write_gtsrb(root)
    csv = root / "gtsrb" / "GT-final_test.csv"
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].rsplit(";", 1)[0] + ";50"
    csv.write_text("\n".join(lines) + "\n")
    return ["dataset=dataset_sequence", "dataset.datasets=[gtsrb]"], ["[0, 43) (e.g. 50)", str(csv)]


def gtsrb_image_that_cannot_be_decoded(root: Path) -> tuple[list[str], list[str]]:
    write_gtsrb(root)
    bad = root / "gtsrb" / "GTSRB" / "Training" / "00007" / "00000_00001.ppm"
    bad.write_bytes(b"P6\n32 32\n255\n" + b"\x00" * 10)  # a header, and a body cut short
    return ["dataset=dataset_sequence", "dataset.datasets=[gtsrb]"], [f"the image {bad} cannot be read"]


def folder_image_that_cannot_be_decoded(root: Path) -> tuple[list[str], list[str]]:
    write_image_folder(root / "shapes")
    bad = root / "shapes" / "class_1" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ["dataset=dataset_sequence", "dataset.datasets=[image_folder:shapes]"], [f"the image {bad} cannot be read"]


def folder_class_with_no_image(root: Path) -> tuple[list[str], list[str]]:
    write_image_folder(root / "shapes")
    empty = root / "shapes" / "class_2"
    for f in empty.iterdir():
        f.rename(f.with_suffix(".txt"))
    return ["dataset=dataset_sequence", "dataset.datasets=[image_folder:shapes]"], [f"no image ({empty}", ".png"]


CASES = [
    idx_other_splits_labels,
    idx_cut_short,
    idx_mixed_up_names,
    idx_label_out_of_range,
    idx_class_with_no_image,
    idx_test_of_another_size,
    idx_images_too_small,
    cifar_fails_its_md5,
    cifar_batch_with_fewer_labels,
    cifar100_label_out_of_range,
    svhn_count_mismatch,
    svhn_four_channels,
    usps_label_out_of_range,
    gtsrb_csv_class_out_of_range,
    gtsrb_image_that_cannot_be_decoded,
    folder_image_that_cannot_be_decoded,
    folder_class_with_no_image,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_damaged_data_is_refused_naming_the_file(case, root, tmp_path, monkeypatch, capsys):
    needs_patch = "monkeypatch" in case.__code__.co_varnames[: case.__code__.co_argcount]
    overrides, phrases = case(root, monkeypatch) if needs_patch else case(root)
    message = refused_run([*overrides, f"dataset.root={root}", *NO_LOGS], tmp_path / "run", capsys)
    for phrase in phrases:
        assert phrase in message, message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


@pytest.mark.integration
def test_the_other_splits_labels_are_refused_by_train_py(tmp_path):
    """The issue's example through ``python train.py``: exit 2, one message, no traceback, no folder."""
    root = tmp_path / "data"
    idx_other_splits_labels(root)
    proc = run_train([f"dataset.root={root}", *NO_LOGS, *QUIET], tmp_path / "run", env={"LIFELONG_DATA_DIR": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train-labels-idx1-ubyte holds 10 labels" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_conversions_are_said(root, caplog):
    """Images read at another size or channel count are converted, and the log says so."""
    import logging

    from lifelong.data import SequenceStream

    write_image_folder(root / "shapes")  # 20 x 24 and 28 x 28 grey images
    _mnist(root)
    dm = SequenceStream(["mnist", "image_folder:shapes"], root=str(root), download=False, val_fraction=0)
    with caplog.at_level(logging.INFO, logger="lifelong"):
        dm.prepare_data()
        dm.setup("fit")
    said = caplog.text
    assert f"{root / 'shapes'}: 30 images of 2 sizes (20-28 x 24-28 pixels) read at 32 x 32" in said, said
    assert "image_folder:shapes: 3 x 32 x 32 images converted to the stream's 3 x 28 x 28" in said
    assert "mnist: 1 x 28 x 28 images converted to the stream's 3 x 28 x 28" in said
