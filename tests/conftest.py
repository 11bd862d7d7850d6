"""Shared fixtures: where the real data is, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch  # noqa: F401  # before any test captures stderr: Lightning's log handler keeps the stream it sees
import pytest

REPO = Path(__file__).resolve().parents[1]


def _mnist_root() -> Path | None:
    candidates = [
        *os.environ.get("LIFELONG_DATA_DIR", "").split(os.pathsep),
        str(REPO.parent / "shared" / "data"),
    ]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return Path(c).resolve()
    return None


def _require(found: bool, what: str) -> None:
    # On CI the data must be there: a missing file is a failure, not a skip.
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing on CI")
        pytest.skip(f"{what} not found on this machine")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A folder with MNIST in torchvision's layout (``MNIST/raw/``)."""
    root = _mnist_root()
    _require(root is not None, "MNIST (set LIFELONG_DATA_DIR or check out shared/ beside the repo)")
    assert root is not None
    return root


FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_available() -> None:
    """Fashion-MNIST from Debian's dataset-fashion-mnist package."""
    _require((FASHION_DEBIAN / "train-images-idx3-ubyte.gz").is_file(), "Debian's dataset-fashion-mnist")


def run_train(args: list[str], run_dir: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """``python train.py ARGS hydra.run.dir=RUN_DIR`` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


QUIET = ["trainer.enable_progress_bar=false"]


def run_and_resume(args: list[str], tmp_path: Path, task: int = 1) -> tuple[dict, dict]:
    """``train.py ARGS`` in ``tmp_path/full``, then again in ``tmp_path/resumed`` from the first run's checkpoint of
    ``task``; both must succeed. Returns both runs' metrics.json."""
    full = run_train(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = tmp_path / "full" / "checkpoints" / f"task_{task}.ckpt"
    resumed = run_train([*args, f"ckpt_path={ckpt}"], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")


def read_metrics(run_dir: Path) -> dict:
    """A run folder's metrics.json."""
    import json

    return json.loads((run_dir / "metrics.json").read_text())


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def ewc_state(checkpoint: dict) -> dict:
    """The EWC callback's state in a Lightning checkpoint (keyed by the callback's state key)."""
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("EWC")]
    return state


def compose_train(overrides: list[str], run_dir: Path):
    """``conf/train.yaml`` composed with ``overrides`` as ``train.py`` receives it; returns ``(cfg, choices)``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "trainer.enable_progress_bar=false"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.output_dir} in the logger's config
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def compose_run(overrides: list[str], run_dir: Path) -> dict:
    """Compose ``conf/train.yaml`` with ``overrides`` and run it in this process (as ``train.py`` does);
    returns the run's ``metrics.json``. In-process, so monkeypatched fixtures apply and no interpreter starts.
    """
    import train

    cfg, choices = compose_train(overrides, run_dir)
    train.run(cfg, run_dir, choices)
    return read_metrics(run_dir)


def refused_run(overrides: list[str], run_dir: Path, capsys, code: int = 2) -> str:
    """Run in this process as :func:`compose_run` does, expecting train.py's refusal: exit ``code`` and one
    ``error:`` message on stderr, which is returned (from its ``error:`` line on)."""
    import train

    cfg, choices = compose_train(overrides, run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.run(cfg, run_dir, choices)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return err[err.index(lines[0]) :].rstrip()  # the message, with the folders it lists below its first line


METHODS = ("finetune", "ewc", "l2", "si", "mas", "lwf", "er", "hat")


@pytest.fixture(scope="session")
def split_fashion_runs(tmp_path_factory, fashion_available) -> dict:
    """Every method on real split Fashion-MNIST, 5 tasks x 1 epoch, seed 0: ``{(scenario, method): metrics}``.

    The task scenario for all of them, the class scenario for all but HAT (which is defined for tasks only).
    """
    base = tmp_path_factory.mktemp("split_fashion")
    runs = {}
    for scenario in ("task", "class"):
        for method in METHODS:
            if method == "hat" and scenario == "class":
                continue
            overrides = [f"method={method}", "dataset=split_fashion_mnist", f"dataset.scenario={scenario}", "seed=0"]
            runs[scenario, method] = compose_run([*overrides, "logger=none"], base / f"{scenario}_{method}")
    return runs


# ---- small fixtures in the real on-disk formats of MNIST and Fashion-MNIST (IDX) ---------------------------------
def write_idx(folder: Path, n: int = 20, gz: bool = False, size: int = 28, seed: int = 0) -> None:
    """A tiny dataset in the real IDX format (what torchvision's MNIST classes read): ``n`` training and
    ``n // 2`` test images of ``size`` x ``size``, labels cycling through the 10 classes."""
    import gzip
    import struct

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", n), ("t10k", n // 2)):
        images = torch.randint(0, 256, (count, size, size), generator=g, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        files = {
            f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, count, size, size) + images.numpy().tobytes(),
            f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, count) + labels.numpy().tobytes(),
        }
        for name, payload in files.items():
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(payload)
            else:
                (folder / name).write_bytes(payload)


# ---- one image file per sample: GTSRB and torchvision's ImageFolder layout -----------------------------------------
def _image(rng, label: int, size: tuple[int, int], grey: bool = False):
    """Noise of ``size`` (W, H) whose top-left quarter encodes the label (so tests can check labels and layout)."""
    import numpy as np
    from PIL import Image

    w, h = size
    pixels = rng.integers(0, 256, size=(h, w) if grey else (h, w, 3), dtype=np.uint8)
    pixels[: h // 2, : w // 2] = (40 * label) % 256
    return Image.fromarray(pixels, mode="L" if grey else "RGB")


def write_image_folder(folder, classes: int = 3, per_class: int = 10, grey: bool = True, seed: int = 0) -> None:
    """torchvision's ImageFolder layout: ``folder/<class>/<i>.png``, images of two different sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(rng, c, (20, 24) if i % 2 else (28, 28), grey).save(folder / f"class_{c}" / f"{i}.png")


def write_gtsrb(root, classes: int = 43, per_class: int = 2, seed: int = 0) -> None:
    """GTSRB as torchvision reads it: ``gtsrb/GTSRB/Training/<class:05d>/*.ppm`` and the final test set's images
    with ``GT-final_test.csv`` (semicolon-separated, one ClassId per file); sizes vary as in the real data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = root / "gtsrb"
    for c in range(classes):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            _image(rng, c, (30 + 3 * i, 32 + 2 * i)).save(folder / f"00000_{i:05d}.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(2 * classes):
        name = f"{i:05d}.ppm"
        _image(rng, i % classes, (40, 36)).save(test / name)
        rows.append(f"{name};40;36;5;5;35;31;{i % classes}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


# ---- small fixtures in the real on-disk formats of CIFAR-10/100 (pickled batches) and SVHN (.mat) ------------
def _images_for(labels, rng):
    """uint8 (N, 3, 32, 32) noise whose first pixel encodes the label (so tests can check the layout)."""
    import numpy as np

    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    images[:, :, :8, :8] = (np.asarray(labels, dtype=np.uint8) * 2)[:, None, None, None]  # learnable too
    return images


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, hundred: bool, per_class: int = 6, seed: int = 0) -> dict:
    """CIFAR-10 (``cifar-10-batches-py/``) or CIFAR-100 (``cifar-100-python/``) as torchvision reads them.

    Returns the md5 sums, in the shape of the class attributes ``train_list``, ``test_list`` and ``meta``.
    """
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    num_classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(name: str, n_per_class: int) -> list[str]:
        labels = [c for c in range(num_classes) for _ in range(n_per_class)]
        rng.shuffle(labels)
        entry = {"batch_label": name, label_key: labels, "data": _images_for(labels, rng).reshape(len(labels), -1)}
        if hundred:
            entry["coarse_labels"] = [c // 5 for c in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        return [name, _md5(folder / name)]

    if hundred:
        train_list, test_list = [batch("train", per_class)], [batch("test", 2)]
        meta_name, key = "meta", "fine_label_names"
    else:
        train_list = [batch(f"data_batch_{i}", per_class) for i in range(1, 6)]
        test_list = [batch("test_batch", 2)]
        meta_name, key = "batches.meta", "label_names"
    with open(folder / meta_name, "wb") as f:
        pickle.dump({key: [f"class_{c}" for c in range(num_classes)]}, f, protocol=2)
    meta = {"filename": meta_name, "key": key, "md5": _md5(folder / meta_name)}
    return {"train_list": train_list, "test_list": test_list, "meta": meta}


def write_svhn(root: Path, per_class: int = 20, seed: int = 0) -> dict:
    """SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` under ``root/SVHN`` (X: 32x32x3xN, y: Nx1, 10 = digit 0).

    Returns ``split_list`` with the fixture's md5 sums.
    """
    import numpy as np
    import scipy.io
    from torchvision.datasets import SVHN

    rng = np.random.default_rng(seed)
    folder = root / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    split_list = {}
    for split, n in (("train", per_class), ("test", 4)):
        labels = [c for c in range(10) for _ in range(n)]
        images = _images_for(labels, rng)  # (N, 3, 32, 32)
        y = np.asarray([c if c else 10 for c in labels], dtype=np.uint8).reshape(-1, 1)
        name = SVHN.split_list[split][1]
        scipy.io.savemat(folder / name, {"X": images.transpose(2, 3, 1, 0), "y": y})
        split_list[split] = [SVHN.split_list[split][0], name, _md5(folder / name)]
    return split_list


def patch_checksums(monkeypatch, cifar10: dict | None = None, cifar100: dict | None = None, svhn=None) -> None:
    """Point torchvision's integrity checks at the fixtures' md5 sums (the loading code itself is unchanged)."""
    from torchvision import datasets

    for cls, sums in ((datasets.CIFAR10, cifar10), (datasets.CIFAR100, cifar100)):
        for key, value in (sums or {}).items():
            monkeypatch.setattr(cls, key, value)
    if svhn is not None:
        monkeypatch.setattr(datasets.SVHN, "split_list", svhn)


def write_vision_fixtures(root: Path, monkeypatch) -> None:
    """CIFAR-10, CIFAR-100 and SVHN fixtures under ``root``, with torchvision's checks pointed at their sums."""
    patch_checksums(
        monkeypatch,
        cifar10=write_cifar(root, hundred=False),
        cifar100=write_cifar(root, hundred=True),
        svhn=write_svhn(root),
    )
