"""Data-parallel training on the CPU: 2 processes over gloo, launched by train.py as a user would."""

from __future__ import annotations

import functools

import pytest
import torch

from lifelong.data import PermutedStream, SplitStream
from lifelong.methods import fisher_sums, mas_sums
from lifelong.methods.kfac import kfac_sums
from lifelong.methods.kfac_penalty import stacked
from lifelong.models import MLP, ContinualClassifier
from tests.conftest import ewc_state, load_checkpoint, read_metrics, run_train

STREAM = {"num_tasks": 2, "seed": 0, "max_train_samples": 2001, "max_test_samples": 999}  # odd: uneven shards


@pytest.mark.integration
def _subset_labels(dm: PermutedStream) -> torch.Tensor:
    """The labels of task 1's samples before the validation split (its training and validation parts together)."""
    rows = torch.cat([dm.train_data(0).rows, dm.val_data(0).rows])
    return dm.train_data(0).labels[rows]


def _ewc_on_two_processes(run_dir, mnist_root, stream: dict, *extra: str) -> dict:
    """train.py (EWC, permuted MNIST, ``stream``) on 2 gloo processes into ``run_dir``; task 1's checkpoint."""
    args = [
        *extra,
        "trainer=ddp_cpu",
        f"dataset.root={mnist_root}",
        *(f"dataset.{k}={v}" for k, v in stream.items() if k != "seed"),
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    proc = run_train(args, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "task_1.ckpt")


def test_ddp_fisher_equals_the_single_process_fisher(tmp_path, mnist_root):
    ckpt = _ewc_on_two_processes(tmp_path / "run", mnist_root, STREAM)
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics["accuracy_matrix"]) == 2
    assert metrics["accuracy_matrix"][0][0] > 0.6  # 1 epoch on about 1,800 images (10 % held out for validation)

    # The first consolidation's importance is task 1's Fisher, estimated by two ranks on halves of the data
    ewc = ewc_state(ckpt)
    dataset = ckpt["lifelong"]["info"]["config"]["dataset"]  # the run's input and training split, rebuilt
    assert dataset["val_fraction"] > 0  # a validation split every rank agreed on (checked at setup)
    options = {k: dataset[k] for k in ("standardize", "val_fraction")}
    dm = PermutedStream(root=str(mnist_root), download=False, **options, **STREAM)
    dm.prepare_data()
    dm.setup("fit")
    module = ContinualClassifier(MLP(dm.input_shape, 10), functools.partial(torch.optim.Adam), 2, 10)
    module.load_state_dict(ckpt["state_dict"])
    single = fisher_sums(module, dm.loader(dm.train_data(0), train=False), "empirical")
    held_out = sum(max(1, round(0.1 * int(n))) for n in torch.bincount(_subset_labels(dm)))  # 10 % of each digit
    assert single.count == len(dm.train_data(0)) == 2001 - held_out  # the Fisher is over the training part only
    for name, f in single.mean().items():
        err = ((ewc["importance"][name] - f).norm() / f.norm()).item()
        assert err < 1e-6, (name, err)
        torch.testing.assert_close(ewc["anchor"][name], dict(module.named_parameters())[name].detach())


@pytest.mark.integration
def test_ddp_kfac_factors_equal_the_single_process_factors(tmp_path, mnist_root):
    """EWC with Kronecker factors on 2 gloo processes: each rank sums A and G over its shard, the sums and counts are
    all-reduced, so the consolidated factors are those one process finds on the whole task."""
    stream = {**STREAM, "val_fraction": 0}
    ckpt = _ewc_on_two_processes(tmp_path / "run", mnist_root, stream, "method.fisher_structure=kfac")
    kfac = ewc_state(ckpt)["kfac"]
    standardize = ckpt["lifelong"]["info"]["config"]["dataset"]["standardize"]  # the run's input, rebuilt
    dm = PermutedStream(root=str(mnist_root), download=False, standardize=standardize, **stream)
    dm.prepare_data()
    dm.setup("fit")
    module = ContinualClassifier(MLP(dm.input_shape, 10), functools.partial(torch.optim.Adam), 2, 10)
    module.load_state_dict(ckpt["state_dict"])
    single = kfac_sums(module, dm.loader(dm.train_data(0), train=False), "empirical")
    assert single.count == 2001 and set(kfac["blocks"]) == set(single.a) == {f"net.layers.{i}" for i in (1, 3, 5)}
    params = dict(module.named_parameters())
    for layer, (block,) in kfac["blocks"].items():
        for name, total in (("a", single.a[layer]), ("g", single.g[layer])):
            want = total / single.count
            err = ((block[name] - want).norm() / want.norm()).item()
            assert err < 1e-5, (layer, name, err)
        torch.testing.assert_close(block["anchor"], stacked(params[f"{layer}.weight"], params[f"{layer}.bias"]))


@pytest.mark.integration
def test_ddp_mas_importance_and_replay_memory_match_one_process(tmp_path, mnist_root):
    """MAS's importance is the single-process one; the replay memory is the same as a one-process run's."""
    common = [
        "method=mas",
        "replay=reservoir",
        "replay.buffer_size=300",
        "dataset=split_mnist",
        "dataset.num_tasks=2",
        f"dataset.root={mnist_root}",
        "dataset.max_train_samples=1001",
        "dataset.max_test_samples=200",
        "dataset.val_fraction=0",  # the recomputation below uses the whole training set
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    ddp = run_train([*common, "trainer=ddp_cpu"], tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_train(common, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    states = [load_checkpoint(tmp_path / d / "checkpoints" / "task_1.ckpt") for d in ("ddp", "one")]
    buffers = [next(v for k, v in s["callbacks"].items() if k.startswith("ExperienceReplay"))["buffer"] for s in states]
    assert torch.equal(buffers[0]["rows"], buffers[1]["rows"]) and len(buffers[0]["rows"]) == 300

    ckpt = states[0]
    mas = next(v for k, v in ckpt["callbacks"].items() if k.startswith("MAS"))
    dm = SplitStream("mnist", num_tasks=2, root=str(mnist_root), max_train_samples=1001, max_test_samples=200)
    dm.prepare_data()
    dm.setup("fit")
    module = ContinualClassifier.for_stream(MLP(dm.input_shape, dm.num_classes), torch.optim.Adam, dm)
    module.load_state_dict(ckpt["state_dict"])
    single = mas_sums(module, dm.loader(dm.train_data(0), train=False))
    assert single.count == 1001
    for name, omega in single.mean().items():
        err = ((mas["importance"][name] - omega).norm() / omega.norm().clamp_min(1e-12)).item()
        assert err < 1e-6, (name, err)


DWA_STREAM = {"num_tasks": 2, "max_train_samples": 501, "max_test_samples": 200}  # odd: uneven shards


def _dwa_under_ddp(method_args: list[str], dwa, tmp_path, mnist_root):
    """Run DWA on 2 gloo processes, then rebuild its network in this process from the first task's checkpoint:
    the checkpoints of tasks 1 and 2, the method's state after task 1, and the rebuilt stream and module."""
    args = [
        *method_args,
        "dataset=split_mnist",
        f"dataset.root={mnist_root}",
        *(f"dataset.{k}={v}" for k, v in DWA_STREAM.items()),
        "dataset.val_fraction=0",  # the recomputation trains on the whole training set
        "trainer=ddp_cpu",
        "logger=none",
        "trainer.enable_progress_bar=false",
    ]
    proc = run_train(args, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = (load_checkpoint(tmp_path / "run" / "checkpoints" / f"task_{k}.ckpt") for k in (1, 2))
    state = next(v for k, v in first["callbacks"].items() if k.startswith("DWA"))
    dm = SplitStream("mnist", root=str(mnist_root), download=False, **DWA_STREAM)
    dm.prepare_data()
    dm.setup("fit")
    net = dwa.configure_network(MLP(dm.input_shape, dm.num_classes), dm)
    module = ContinualClassifier.for_stream(net, torch.optim.Adam, dm)
    module.load_state_dict(first["state_dict"])
    return first, last, state, dm, module


@pytest.mark.integration
def test_ddp_dwa_fisher_and_anchor_match_one_process(tmp_path, mnist_root):
    """The paper's DWA under DDP: the merged Fisher and the stored anchor are sums over both ranks' shards,
    all-reduced, so they equal what one process computes from the same weights."""
    from types import SimpleNamespace

    from lifelong.methods import DWA
    from lifelong.methods.dwa import PAPER_OPTIONS

    dwa = DWA(**{**PAPER_OPTIONS, "curriculum": False, "anchor_samples": 101})
    args = ["method=dwa_paper", "method.curriculum=false", "method.anchor_samples=101"]
    _, _, state, dm, module = _dwa_under_ddp(args, dwa, tmp_path, mnist_root)
    single = SimpleNamespace(world_size=1)
    fisher = dwa.task_fisher(SimpleNamespace(datamodule=dm, world_size=1), module, 0)
    assert set(fisher) == set(state["fisher"]) == {"net.net.layers.3.weight"}
    for name, f in fisher.items():
        err = ((state["fisher"][name] - f).norm() / f.norm()).item()
        assert err < 1e-5, (name, err)
    module.eval()
    with torch.no_grad():
        anchor = dwa._mean_embedding(single, module, dm, dwa._anchor_data(dm, 0, 0))
    torch.testing.assert_close(state["task_anchors"][0], anchor, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_ddp_held_dwa_holds_what_every_ranks_samples_use(tmp_path, mnist_root):
    """method=dwa under DDP: what a finished task's masks use is the union over both ranks' shards (all-reduced),
    the same as one process finds on the whole task; the held weights do not move on any rank."""
    from types import SimpleNamespace

    from lifelong.methods import DWA

    dwa = DWA()
    first, last, state, dm, module = _dwa_under_ddp(["method=dwa"], dwa, tmp_path, mnist_root)
    held = state["held"]
    net = dwa._net(module)
    dwa.held.record(SimpleNamespace(datamodule=dm, world_size=1), module, net, 0)
    for ddp, single in zip(held["used"], dwa.held.used, strict=True):
        assert torch.equal(ddp, single)
    names = {id(p): n for n, p in module.named_parameters()}
    for layer, used in zip(net.masked, dwa.held.used, strict=True):
        name = names[id(layer.weight)]
        moved = first["state_dict"][name] != last["state_dict"][name]
        assert not (moved & used.bool()).any() and moved.any()


@pytest.mark.integration
@pytest.mark.parametrize("method", ["derpp", "agem"])
def test_ddp_replay_family_keeps_ranks_in_step(tmp_path, mnist_root, method):
    """DER++'s memory takes every rank's samples (gathered, so it is the same on every rank); A-GEM's ranks
    project the same all-reduced gradients, so their weights stay equal (A-GEM checks it every epoch)."""
    args = [
        f"method={method}",
        "method.buffer_size=300",
        "dataset=split_mnist",
        "dataset.num_tasks=2",
        f"dataset.root={mnist_root}",
        "dataset.max_train_samples=1001",
        "dataset.max_test_samples=200",
        "dataset.val_fraction=0",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer=ddp_cpu",
    ]
    proc = run_train(args, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "ddp")["accuracy_matrix"][1][1] > 0.8
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "task_1.ckpt")
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith(("AGEM", "DarkExperienceReplay"))]
    buffer = state["buffer"]
    if method == "derpp":  # rank 0 offered both ranks' halves of the task (1,001 padded to 1,002); 2 tasks x 2 outputs
        assert buffer["seen"] == 1002 and len(buffer["rows"]) == 300 and buffer["logits"].shape == (300, 4)
    else:
        assert len(buffer["rows"]) == 150  # 300 // 2 tasks, drawn from task 1
