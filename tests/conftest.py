"""Shared fixtures: where the real data is, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

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
