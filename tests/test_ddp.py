"""Data-parallel training on the CPU: 2 processes over gloo, launched by train.py as a user would."""

from __future__ import annotations

import functools

import pytest
import torch

from lifelong.data import PermutedStream
from lifelong.methods import fisher_sums
from lifelong.models import MLP, ContinualClassifier
from tests.conftest import ewc_state, load_checkpoint, read_metrics, run_train

STREAM = {"num_tasks": 2, "seed": 0, "max_train_samples": 2001, "max_test_samples": 999}  # odd: uneven shards


@pytest.mark.integration
def test_ddp_fisher_equals_the_single_process_fisher(tmp_path, mnist_root):
    args = [
        "trainer=ddp_cpu",
        f"dataset.root={mnist_root}",
        *(f"dataset.{k}={v}" for k, v in STREAM.items() if k != "seed"),
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    proc = run_train(args, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics["accuracy_matrix"]) == 2
    assert metrics["accuracy_matrix"][0][0] > 0.7

    # The first consolidation's importance is task 1's Fisher, estimated by two ranks on halves of the data
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "task_1.ckpt")
    ewc = ewc_state(ckpt)
    dm = PermutedStream(root=str(mnist_root), download=False, **STREAM)
    dm.prepare_data()
    dm.setup("fit")
    module = ContinualClassifier(MLP(dm.input_shape, 10), functools.partial(torch.optim.Adam), 2, 10)
    module.load_state_dict(ckpt["state_dict"])
    single = fisher_sums(module, dm.loader(dm.train_data(0), train=False), "empirical")
    assert single.count == 2001
    for name, f in single.mean().items():
        err = ((ewc["importance"][name] - f).norm() / f.norm()).item()
        assert err < 1e-6, (name, err)
        torch.testing.assert_close(ewc["anchor"][name], dict(module.named_parameters())[name].detach())
