"""Speed and memory of lifelong against plain PyTorch, measured side by side in one run.

    python scripts/benchmark.py                       # everything (about 10 minutes on 2 cores)
    python scripts/benchmark.py --sections train fisher tasks
    python scripts/benchmark.py --e2e-tasks 3         # a shorter end-to-end comparison
    python scripts/benchmark.py --device cuda --sections train fisher tasks dwa   # on a GPU (make gpu-check)

Sections (docs/performance.md holds the table of the last full run):

* ``train``: one epoch of permuted MNIST (MLP 2 x 400, batch 128, SGD) through our Lightning path (the real
  TaskStream, ContinualClassifier, Trainer with progress bar and TensorBoard) against a minimal hand-written
  loop over the same in-memory tensors; and EWC against fine-tuning on the Lightning path.
* ``fisher``: the vectorised per-sample Fisher against the per-sample loop (timed on a subset, scaled), its
  cost in training epochs, and its relative error; MLP and CNN, all three Fisher types.
* ``tasks``: separate-mode EWC's per-step cost and state size after 1, 10 and 50 past tasks.
* ``e2e``: ``train.py method=ewc dataset=permuted_mnist dataset.num_tasks=10 epochs_per_task=1``: wall time
  and peak resident memory, against the same protocol through the usual torchvision pipeline (a PIL image
  per sample, ToTensor, a permutation transform, DataLoader).
* ``memory``: what a replay memory of 5120 samples (DER++, the paper's largest buffer, filled on one permuted
  MNIST task) adds to a checkpoint: its size and the time ``Trainer.save_checkpoint`` takes, against the same
  run without a memory (fine-tuning), and the size the memory would have if it held the images themselves.
* ``eval``: continual evaluation (``eval_every``): split MNIST (5 tasks, class scenario, MLP 2 x 400, Adam, batch
  128, one epoch a task), ER with a memory of 2,000 (the stability gap's setting) and fine-tuning (the cheapest
  training step), fitted with and without an evaluation of 1,000 test samples of every seen task every 10 steps
  (and every step), the whole fit timed; the evaluation's share of the training time.
* ``kfac``: EWC with Kronecker-factored Fisher blocks (``method.fisher_structure=kfac``): the estimate's cost in
  training epochs (and beside the diagonal estimate), for the three Fisher types; a training step (batch 128, SGD)
  with its penalty against one with the diagonal EWC penalty, for one consolidated task (one pair a layer, as
  online mode keeps) and for 10 kept pairs (separate mode after 10 tasks); the state's size. MLP and CNN.
* ``dwa``: a training step of DWA's network (per-sample weight masks; lifelong's held-mask DWA at its
  defaults, and the paper's) beside HAT's (per-task unit masks) on the same network, time and the step's peak
  memory (each in a fresh process), for the MLP of the split-MNIST runs and the AlexNet-style network of the
  mixture; and the vectorised masked layers against a per-sample loop (the original code's convolution).

Timings are the minimum over interleaved repeats (the least disturbed by other load on a shared machine);
the median is shown beside it. With ``--device cuda`` the networks, the data and Lightning's trainer are on the
GPU, and every timing waits for the GPU to finish (``torch.cuda.synchronize``) before it is read.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.data import PermutedStream
from lifelong.data.tensors import Batch
from lifelong.methods import (
    DWA,
    EWC,
    HAT,
    DarkExperienceReplay,
    DWANet,
    Finetune,
    HATNet,
    fisher_sums,
    per_sample_loop_fisher,
)
from lifelong.methods.dwa import PAPER_OPTIONS
from lifelong.methods.kfac import KroneckerSums, kfac_sums
from lifelong.models import CNN, MLP, AlexNet, ContinualClassifier
from lifelong.run import stream_trainer

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str, str]] = []  # section, measure, value, target
DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    """Wait for the device, so that a timing read next includes its work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def accelerator() -> str:
    return "gpu" if DEVICE.type == "cuda" else "cpu"


def row(section: str, measure: str, value: str, target: str = "") -> None:
    ROWS.append((section, measure, value, target))
    print(f"  {measure:<62} {value:>22}  {target}", flush=True)


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Run each fn ``repeats`` times, interleaved; a fn may return its own measured seconds (a float)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            inner = fn()
            sync()
            times[name].append(inner if isinstance(inner, float) else time.perf_counter() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def fmt(best_median: tuple[float, float], unit: str = "s") -> str:
    b, m = best_median
    return f"{b:.3f} {unit} (med {m:.3f})"


# ---- training steps ------------------------------------------------------------------------------------
class _EpochTimer(L.Callback):
    """An epoch's training steps: from its start to the end of its last step, before the module's own
    ``on_train_batch_end`` (callbacks' hooks run first) evaluates the task that ends there - the minimal loops
    do not evaluate either."""

    def on_train_epoch_start(self, *args: object) -> None:
        sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        batch_idx = args[-1]
        if batch_idx == trainer.num_training_batches - 1:
            sync()
            self.seconds = time.perf_counter() - self.start


def _stream(root: str | None, num_tasks: int = 1) -> PermutedStream:
    dm = PermutedStream(num_tasks=num_tasks, root=root, download=False, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def lightning_epoch(dm: PermutedStream, method: L.Callback, out: Path) -> float:
    """Seconds of one training epoch through the default Lightning path (progress bar and TensorBoard on)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    timer = _EpochTimer()
    _fit(dm, [method, timer], out, TensorBoardLogger(str(out), name="tb"))
    return timer.seconds


def _fit(dm: PermutedStream, callbacks: list[L.Callback], out: Path, logger: object = False) -> L.Trainer:
    """The stream trained (MLP 2 x 400, SGD) through ``stream_trainer``, without evaluation; its trainer."""
    torch.manual_seed(0)
    net = MLP((1, 28, 28), 10)
    module = ContinualClassifier(net, functools.partial(torch.optim.SGD, lr=0.1), dm.num_tasks, 10)
    trainer_factory = functools.partial(
        L.Trainer, accelerator=accelerator(), devices=1, limit_val_batches=0, enable_model_summary=False
    )
    trainer, _ = stream_trainer(dm, out, trainer=trainer_factory, callbacks=callbacks, logger=logger)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(module, datamodule=dm)
    return trainer


def minimal_epoch(make_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], n: int) -> float:
    """A minimal PyTorch loop: same model, optimizer, batch size and number of steps."""
    torch.manual_seed(0)
    net = MLP((1, 28, 28), 10).to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    sync()
    start = time.perf_counter()
    for idx in order.split(128):
        x, y = make_batch(idx)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - start


class _Batches:
    """An iterable of pre-made batches (a plain list would be taken for a list of loaders)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Bare(L.LightningModule):
    """The least a LightningModule can be: Lightning's own per-step cost, for reference."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.net = MLP((1, 28, 28), 10)
        self.batches = batches

    def train_dataloader(self) -> _Batches:
        return _Batches(self.batches)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def bare_lightning_epoch(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    torch.manual_seed(0)
    timer = _EpochTimer()
    trainer = L.Trainer(
        accelerator=accelerator(),
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(_Bare(batches))
    return timer.seconds


def ewc_with_one_past_task(dm: PermutedStream) -> EWC:
    """An EWC callback holding one consolidated task, so every step pays the penalty.

    The Fisher is a real one (of the freshly initialised network on 2,048 of the task's images): a random
    one of the wrong scale makes SGD at lr 0.1 diverge, and NaN arithmetic would not time the same.
    """
    ewc = EWC(ewc_lambda=60.0)
    torch.manual_seed(0)
    holder = ContinualClassifier(MLP((1, 28, 28), 10), functools.partial(torch.optim.SGD, lr=0.1), dm.num_tasks, 10)
    holder.to(dm.train_data(0).images.device)
    params = dict(holder.named_parameters())
    data = dm.train_data(0).subset(2048, torch.Generator().manual_seed(0))
    ewc.consolidate(fisher_sums(holder, dm.loader(data, train=False)).mean(), params)
    return ewc


def section_train(root: str | None, repeats: int) -> None:
    print("\n[train] one epoch of permuted MNIST, MLP 2 x 400, batch 128, SGD", flush=True)
    dm = _stream(root)
    dm.to(DEVICE)  # the minimal loops' tensors; the Lightning path moves the stream to its module's device itself
    data = dm.train_data(0)
    assert dm.transform is not None
    transform = dm.transform
    images, labels, n = data.images, data.labels, len(data)
    task = torch.zeros(n, dtype=torch.long, device=DEVICE)
    premade = transform(images, task, 0).contiguous()  # the whole task as standardised floats, made once
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    batches = [(premade.index_select(0, i), labels.index_select(0, i)) for i in order.split(128)]
    tmp = Path(tempfile.mkdtemp(prefix="lifelong-bench-"))
    res = timed(
        {
            "same": lambda: minimal_epoch(
                lambda i: (transform(images.index_select(0, i), task[: len(i)], 0), labels.index_select(0, i)), n
            ),
            "premade": lambda: minimal_epoch(lambda i: (premade.index_select(0, i), labels.index_select(0, i)), n),
            "bare": lambda: bare_lightning_epoch(batches),
            "lightning": lambda: lightning_epoch(dm, Finetune(), tmp / "ft"),
            "ewc": lambda: lightning_epoch(dm, ewc_with_one_past_task(dm), tmp / "ewc"),
        },
        repeats,
    )
    row("train", "minimal loop, the same uint8 tensors and batch transform", fmt(res["same"]))
    row("train", "minimal loop, pre-made float tensors (the floor)", fmt(res["premade"]))
    row("train", "bare LightningModule on pre-made batches (Lightning's own cost)", fmt(res["bare"]))
    row("train", "lifelong epoch, fine-tuning (progress bar, TensorBoard)", fmt(res["lightning"]))
    row("train", "lifelong epoch, EWC with a consolidated task", fmt(res["ewc"]))
    best = {k: v[0] for k, v in res.items()}
    row("train", "lifelong / minimal loop on the same tensors", f"{best['lightning'] / best['same']:.2f}x", "<= 1.30x")
    row("train", "lifelong / pre-made floats", f"{best['lightning'] / best['premade']:.2f}x")
    row("train", "bare Lightning / pre-made floats", f"{best['bare'] / best['premade']:.2f}x")
    extra = best["ewc"] / best["lightning"] - 1
    row("train", "EWC step overhead over fine-tuning", f"{100 * extra:+.1f} %", "<= +15 %")


# ---- Fisher --------------------------------------------------------------------------------------------
def _fisher_case(
    name: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, loop_n: dict[str, int], batch: int, repeats: int
) -> None:
    net, x, y = net.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    t = torch.zeros(len(y), dtype=torch.long, device=DEVICE)

    def batches(n: int, size: int = batch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(x[i : min(i + size, n)], y[i : min(i + size, n)], t[i : min(i + size, n)]) for i in range(0, n, size)]

    n = len(y)
    full = batches(n)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def epoch() -> None:
        for xb, yb, _ in batches(n, 128):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()

    ep = timed({"epoch": epoch}, max(1, repeats - 1))["epoch"]
    row("fisher", f"{name}: one training epoch over {n:,} images (minimal loop)", fmt(ep))

    def gen() -> torch.Generator:
        return torch.Generator(device=DEVICE).manual_seed(0)

    for ftype in ("empirical", "sampled", "exact"):
        fast = timed({"f": lambda ft=ftype: fisher_sums(net, full, ft, generator=gen())}, max(1, repeats - 1))["f"]
        m = loop_n[ftype]
        sub = batches(m)
        sync()
        t0 = time.perf_counter()
        ref = per_sample_loop_fisher(net, sub, ftype, generator=gen()).mean()
        sync()
        loop_full = (time.perf_counter() - t0) * n / m
        got = fisher_sums(net, sub, ftype, generator=gen()).mean()
        err = max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
        budget = 11 if ftype == "exact" else 2  # C + 1 epochs for the exact type, C = 10
        row("fisher", f"{name} {ftype}: vectorised, all {n:,} images", fmt(fast))
        row("fisher", f"{name} {ftype}: per-sample loop (on {m}, scaled to {n:,})", f"{loop_full:.1f} s")
        row("fisher", f"{name} {ftype}: speed-up over the loop", f"{loop_full / fast[0]:.0f}x", ">= 50x")
        row("fisher", f"{name} {ftype}: cost in training epochs", f"{fast[0] / ep[0]:.2f}", f"<= {budget}")
        row("fisher", f"{name} {ftype}: relative error vs the loop", f"{err:.1e}", "< 1e-5")


def section_fisher(root: str | None, repeats: int, cnn_images: int) -> None:
    print("\n[fisher] exact per-sample diagonal Fisher", flush=True)
    dm = _stream(root)
    data = dm.train_data(0)
    x = dm.transform(data.images, data.tasks, 0)
    torch.manual_seed(0)
    _fisher_case(
        "MLP 2x400",
        MLP((1, 28, 28), 10),
        x,
        data.labels,
        {"empirical": 300, "sampled": 300, "exact": 60},
        1024,
        repeats,
    )
    _fisher_case(
        "CNN",
        CNN((1, 28, 28), 10),
        x[:cnn_images],
        data.labels[:cnn_images],
        {"empirical": 100, "sampled": 100, "exact": 20},
        256,
        repeats,
    )


# ---- many tasks ----------------------------------------------------------------------------------------
def section_tasks(repeats: int) -> None:
    print("\n[tasks] separate-mode EWC after 1, 10 and 50 past tasks (MLP 2 x 400, batch 128)", flush=True)
    torch.manual_seed(0)
    module = ContinualClassifier(MLP((1, 28, 28), 10), functools.partial(torch.optim.SGD, lr=0.1), 1, 10).to(DEVICE)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    params = dict(module.named_parameters())
    x, y = torch.randn(128, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (128,), device=DEVICE)
    g = torch.Generator().manual_seed(0)
    ewcs = {}
    for k in (1, 10, 50):
        ewc = EWC()
        for _ in range(k):  # Fisher-sized values (1e-4): the steps stay finite, as in a real run
            ewc.consolidate({n: 1e-4 * torch.rand(p.shape, generator=g).to(DEVICE) for n, p in params.items()}, params)
        ewcs[k] = ewc

    def steps(ewc: EWC) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(200):  # the same batch: only the cost is measured
            loss = F.cross_entropy(module(x), y)
            opt.zero_grad()
            loss.backward()
            ewc.add_penalty_grad(module)
            opt.step()
        sync()
        seconds = (time.perf_counter() - start) / 200
        assert all(torch.isfinite(p).all() for p in module.parameters())
        return seconds

    res = timed({k: functools.partial(steps, e) for k, e in ewcs.items()}, repeats)
    for k, ewc in ewcs.items():
        state = ewc.state_dict()
        nbytes = sum(t.numel() * t.element_size() for d in ("importance", "anchor") for t in state[d].values())
        row("tasks", f"{k} past tasks: training step with the penalty", fmt((res[k][0] * 1e3, res[k][1] * 1e3), "ms"))
        row("tasks", f"{k} past tasks: EWC state", f"{nbytes / 2**20:.2f} MiB")
    growth = res[50][0] / res[1][0]
    row("tasks", "step time at 50 past tasks / at 1", f"{growth:.2f}x", "~1.00x (no growth)")


# ---- Kronecker-factored Fisher --------------------------------------------------------------------------
def _kfac_case(name: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, repeats: int) -> None:
    """KFAC's estimate in training epochs (beside the diagonal's), and a training step with its penalty against one
    with the diagonal's: one consolidated task (online: one pair per layer), then 10 kept pairs (separate)."""
    net, x, y = net.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    t = torch.zeros(len(y), dtype=torch.long, device=DEVICE)
    n = len(y)
    full = [(x[i : i + batch], y[i : i + batch], t[i : i + batch]) for i in range(0, n, batch)]
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def epoch() -> None:
        for i in range(0, n, 128):
            loss = F.cross_entropy(net(x[i : i + 128]), y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()

    ep = timed({"epoch": epoch}, max(1, repeats - 1))["epoch"][0]
    row("kfac", f"{name}: one training epoch over {n:,} images (minimal loop)", f"{ep:.3f} s")
    for ftype in ("empirical", "sampled", "exact"):

        def gen() -> torch.Generator:
            return torch.Generator(device=DEVICE).manual_seed(0)

        res = timed(
            {
                "kfac": lambda ft=ftype: kfac_sums(net, full, ft, generator=gen()),
                "diag": lambda ft=ftype: fisher_sums(net, full, ft, generator=gen()),
            },
            max(1, repeats - 1),
        )
        budget = " <= 2" if ftype == "empirical" else ""
        row("kfac", f"{name} {ftype}: KFAC estimate, all {n:,} images", fmt(res["kfac"]))
        row("kfac", f"{name} {ftype}: KFAC estimate in training epochs", f"{res['kfac'][0] / ep:.2f}", budget.strip())
        row("kfac", f"{name} {ftype}: KFAC estimate / the diagonal's", f"{res['kfac'][0] / res['diag'][0]:.2f}x")

    # the step: SGD on one batch of 128 (only the cost is measured), the penalty's gradient added as in training
    params = dict(net.named_parameters())
    sample = full[: max(1, 2048 // batch)]
    sums = kfac_sums(net, sample)
    a, g = ({k: v / sums.count for k, v in d.items()} for d in (sums.a, sums.g))
    diag = EWC(ewc_lambda=60.0)
    diag.consolidate(fisher_sums(net, sample).mean(), params)
    kfacs = {}
    for label, mode, pairs, precision in (
        ("KFAC (1 pair a layer)", "online", 1, "highest"),
        ("KFAC (1 pair a layer), matmul precision medium", "online", 1, "medium"),
        ("KFAC separate, 10 pairs a layer", "separate", 10, "highest"),
    ):
        ewc = EWC(ewc_lambda=60.0, fisher_structure="kfac", mode=mode, kfac_matmul_precision=precision)
        for _ in range(pairs):
            ewc.last_factors = KroneckerSums(a, g, sums.params, sums.diagonal)
            ewc.consolidate({}, params)
        kfacs[label] = ewc
    xb, yb = x[:128], y[:128]

    def steps(ewc: EWC) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(50):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            ewc.add_penalty_grad(net)
            opt.step()
        sync()
        return (time.perf_counter() - start) / 50

    res = timed(
        {"diagonal": functools.partial(steps, diag), **{k: functools.partial(steps, e) for k, e in kfacs.items()}},
        repeats,
    )
    base = res["diagonal"][0]
    row(
        "kfac",
        f"{name}: training step with the diagonal EWC penalty",
        fmt((base * 1e3, res["diagonal"][1] * 1e3), "ms"),
    )
    for label, ewc in kfacs.items():
        best = res[label][0]
        target = "< 1.5x" if label.startswith("KFAC (") and name.startswith("MLP") else ""
        row("kfac", f"{name}: training step with the {label}", fmt((best * 1e3, res[label][1] * 1e3), "ms"))
        row("kfac", f"{name}: {label} step / the diagonal's", f"{best / base:.2f}x", target)
        state = ewc.state_dict()["kfac"]["blocks"]
        nbytes = sum(t.numel() * t.element_size() for kept in state.values() for b in kept for t in b.values())
        row("kfac", f"{name}: {label}: state", f"{nbytes / 2**20:.2f} MiB")
    dstate = diag.state_dict()
    nbytes = sum(t.numel() * t.element_size() for k in ("importance", "anchor") for t in dstate[k].values())
    row("kfac", f"{name}: diagonal EWC state", f"{nbytes / 2**20:.2f} MiB")


def section_kfac(root: str | None, repeats: int, cnn_images: int) -> None:
    print("\n[kfac] EWC with Kronecker-factored Fisher blocks: the estimate and the step", flush=True)
    dm = _stream(root)
    data = dm.train_data(0)
    assert dm.transform is not None
    x = dm.transform(data.images, data.tasks, 0)
    torch.manual_seed(0)
    _kfac_case("MLP 2x400", MLP((1, 28, 28), 10), x, data.labels, 1024, repeats)
    _kfac_case("CNN", CNN((1, 28, 28), 10), x[:cnn_images], data.labels[:cnn_images], 256, repeats)


# ---- end to end ----------------------------------------------------------------------------------------
_RUSAGE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
    "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measure_command(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of ``cmd`` (run under a fresh wrapper so the peak is its own)."""
    out = subprocess.run([sys.executable, "-c", _RUSAGE, *cmd], capture_output=True, text=True, check=True)
    rc, seconds, kib = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}")
    return float(seconds), int(kib) / 1024


def section_e2e(root: str | None, tasks: int) -> None:
    print(f"\n[e2e] EWC on permuted MNIST, {tasks} tasks x 1 epoch, Adam, whole protocol", flush=True)
    out = Path(tempfile.mkdtemp(prefix="lifelong-e2e-"))
    ours = [
        sys.executable,
        str(REPO / "train.py"),
        "method=ewc",
        "dataset=permuted_mnist",
        f"dataset.num_tasks={tasks}",
        "epochs_per_task=1",
        f"hydra.run.dir={out / 'ours'}",
    ] + ([f"dataset.root={root}"] if root else [])
    wall, rss = measure_command(ours)
    acc = json.loads((out / "ours" / "metrics.json").read_text())["avg_accuracy"]
    base = [sys.executable, __file__, "--pipeline-baseline", str(tasks), "--out", str(out / "baseline.json")]
    base += ["--data-root", root] if root else []
    wall_b, rss_b = measure_command(base)
    acc_b = json.loads((out / "baseline.json").read_text())["avg_accuracy"]
    row("e2e", "train.py (this project): wall time", f"{wall:.1f} s")
    row("e2e", "train.py (this project): peak resident memory", f"{rss / 1024:.2f} GiB", "<= 1.5 GiB")
    row("e2e", "train.py (this project): average accuracy", f"{100 * acc:.2f} %")
    row("e2e", "torchvision DataLoader pipeline: wall time", f"{wall_b:.1f} s")
    row("e2e", "torchvision DataLoader pipeline: peak resident memory", f"{rss_b / 1024:.2f} GiB")
    row("e2e", "torchvision DataLoader pipeline: average accuracy", f"{100 * acc_b:.2f} %")
    row("e2e", "speed-up of this project over the pipeline", f"{wall_b / wall:.1f}x")


def pipeline_baseline(tasks: int, root: str | None, out: str) -> None:
    """The same protocol as train.py's default, written the usual way: torchvision transforms per sample.

    Same model (MLP 2 x 400), optimizer (Adam 1e-3, state reset per task), batch size, permutations, EWC
    (lambda 60 in the lambda/2 form, empirical Fisher over the whole task, the same vectorised estimator)
    and evaluation (every task's test set after every task): only the data path differs.
    """
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from lifelong.data import find_image_dataset
    from lifelong.metrics import average_accuracy

    torch.manual_seed(0)
    found = find_image_dataset("mnist", root, download=False)
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(784, generator=g) for _ in range(tasks)]

    def pipeline(perm: torch.Tensor) -> transforms.Compose:
        return transforms.Compose(
            [
                transforms.ToTensor(),  # pixels in [0, 1], as dataset=permuted_mnist feeds them
                transforms.Lambda(lambda img: img.view(-1)[perm].view(1, 28, 28)),
            ]
        )

    def loader(train: bool, perm: torch.Tensor, shuffle: bool, batch: int) -> DataLoader:
        ds = datasets.MNIST(str(found), train=train, transform=pipeline(perm), download=False)
        return DataLoader(ds, batch_size=batch, shuffle=shuffle)

    net = MLP((1, 28, 28), 10)
    ewc = EWC(ewc_lambda=60.0)
    matrix = []
    for task in range(tasks):
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        net.train()
        for x, y in loader(True, perms[task], True, 128):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            if ewc._num_consolidated:
                ewc.add_penalty_grad(net)
            opt.step()
        net.eval()
        row_acc = []
        with torch.no_grad():
            for j in range(tasks):
                correct = total = 0
                for x, y in loader(False, perms[j], False, 1024):
                    correct += (net(x).argmax(-1) == y).sum().item()
                    total += len(y)
                row_acc.append(correct / total)
        matrix.append(row_acc)
        if task < tasks - 1:
            fisher_batches = ((x, y, torch.zeros_like(y)) for x, y in loader(True, perms[task], False, 1024))
            sums = fisher_sums(net, fisher_batches, "empirical")
            params = dict(net.named_parameters())
            ewc.consolidate(sums.mean(), params)
    Path(out).write_text(json.dumps({"accuracy_matrix": matrix, "avg_accuracy": average_accuracy(matrix)}))


# ---- DWA ------------------------------------------------------------------------------------------------
DWA_CASES = {  # name: (network, input shape, classes, batch)
    "MLP 2x400, batch 128": (lambda: MLP((1, 28, 28), 10), (1, 28, 28), 10, 128),
    "AlexNet, 3x32x32, batch 32": (lambda: AlexNet((3, 32, 32), 10, dropout=(0.0, 0.0)), (3, 32, 32), 10, 32),
}


def dwa_step(method: str, case: str, steps: int) -> dict[str, float]:
    """Seconds per training step and the step's peak memory (MiB over the resident set before the steps) of
    ``method``'s network (``hat`` or ``dwa``) on ``case``: Adam, cross-entropy, and each method's own loss terms
    that a step computes (HAT's mask regulariser, DWA's sparsity and Fisher-weighted mask terms)."""
    import resource

    make, shape, classes, batch = DWA_CASES[case]
    torch.manual_seed(0)
    base = make()
    dwa = None if method == "hat" else DWA(**(PAPER_OPTIONS if method == "dwa_paper" else {}))
    net: nn.Module = HATNet(base, 2) if dwa is None else DWANet(base, shape, num_tasks=2, **dwa.net_options)
    net.to(DEVICE)
    if dwa is not None:
        for layer in net.masked:  # type: ignore[union-attr]
            layer.importance = torch.rand_like(layer.weight) * 1e-4  # a second task's mask loss
        if dwa.hard:  # a second task: the first one's weights held, the gate's slope annealed
            dwa.held.used = [torch.rand_like(layer.weight).round() for layer in net.masked]  # type: ignore[union-attr]
            dwa.held.used_out = [u.amax(tuple(range(1, u.ndim))) for u in dwa.held.used]
            dwa.held.finished = 1
            net.context.slope = 200.0  # type: ignore[union-attr]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(batch, *shape, device=DEVICE), torch.randint(0, classes, (batch,), device=DEVICE)
    task = torch.ones(batch, dtype=torch.long, device=DEVICE)
    hat = HAT()
    hat.previous = [torch.zeros(e.shape[1], device=DEVICE) for e in getattr(net, "embeddings", [])]

    def step() -> None:
        out = net(x, task)
        loss = F.cross_entropy(out, y)
        if dwa is not None:
            ctx = net.context  # type: ignore[union-attr]
            loss = loss + dwa.lambda_attention * sum(a.mean() for a in ctx.attention)
            loss = loss + dwa.lambda_sparsity * sum((a - dwa.sparsity_target).clamp_min(0).mean() for a in ctx.activity)
        else:
            holder = nn.Module()
            holder.net = net
            loss = loss + hat.penalty(holder, Batch(x, y, task, None), out)  # type: ignore[arg-type, operator]
        opt.zero_grad()
        loss.backward()
        if dwa is not None and dwa.hard:
            dwa.held.block(net)  # type: ignore[arg-type]
        opt.step()

    step()  # allocate the optimizer's state before the baseline is read
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    if DEVICE.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated(DEVICE) / 2**20
        torch.cuda.reset_peak_memory_stats(DEVICE)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    if DEVICE.type == "cuda":  # the device's memory: what the step allocates over what was held before it
        peak = torch.cuda.max_memory_allocated(DEVICE) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in net.parameters())
    return {"step_s": seconds, "peak_mib": max(0.0, peak - before), "params": params}


def section_dwa(repeats: int) -> None:
    print("\n[dwa] a training step of DWA's network beside HAT's, the same network underneath", flush=True)
    for case in DWA_CASES:
        results = {}
        for method in ("hat", "dwa", "dwa_paper"):
            runs = []
            for _ in range(max(1, repeats // 2)):
                cmd = [sys.executable, __file__, "--dwa-step", method, case, "--device", str(DEVICE)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            results[method] = {k: min(r[k] for r in runs) for k in runs[0]}
        hat, held, paper = results["hat"], results["dwa"], results["dwa_paper"]
        ms = " / ".join(f"{1e3 * r['step_s']:.1f}" for r in (hat, held, paper))
        row("dwa", f"{case}: HAT / DWA / the paper's DWA step", f"{ms} ms")
        row("dwa", f"{case}: DWA / HAT step time", f"{held['step_s'] / hat['step_s']:.1f}x", "< 30x")
        row("dwa", f"{case}: the paper's DWA / HAT step time", f"{paper['step_s'] / hat['step_s']:.0f}x")
        mib = " / ".join(f"{r['peak_mib']:.0f}" for r in (hat, held, paper))
        row("dwa", f"{case}: HAT / DWA / the paper's DWA step peak memory", f"{mib} MiB")
        params = " / ".join(f"{r['params'] / 1e6:.2f}" for r in (hat, held, paper))
        row("dwa", f"{case}: HAT / DWA / the paper's DWA parameters (2 tasks)", f"{params} M")
    # the masked layers, vectorised against a loop over the samples (the original code's convolution)
    torch.manual_seed(0)
    net = DWANet(AlexNet((3, 32, 32), 10, dropout=(0.0, 0.0)), (3, 32, 32)).to(DEVICE)
    conv = net.masked[0]  # 64 -> 128 channels, 3x3
    x = torch.randn(32, 64, 14, 14, device=DEVICE)
    emb = torch.rand(32, 100, device=DEVICE)

    def vectorised() -> None:
        net.context.emb = emb
        conv(x).sum().backward()

    def loop() -> None:
        masks = conv.mask(emb)
        out = torch.cat(
            [F.conv2d(x[b : b + 1], conv.weight * masks[b], conv.bias) for b in range(x.shape[0])]  # type: ignore[union-attr]
        )
        out.sum().backward()

    res = timed({"vec": vectorised, "loop": loop}, repeats)
    row("dwa", "masked Conv2d 64->128 3x3, batch 32: one grouped conv (fwd+bwd)", fmt(res["vec"]))
    row("dwa", "masked Conv2d 64->128 3x3, batch 32: a conv per sample (fwd+bwd)", fmt(res["loop"]))
    row("dwa", "masked Conv2d: speed-up of the grouped convolution", f"{res['loop'][0] / res['vec'][0]:.1f}x")


# ---- continual evaluation ------------------------------------------------------------------------------
def section_eval(root: str | None, repeats: int) -> None:
    from lifelong.data import SplitStream
    from lifelong.evaluation import ContinualEvaluation
    from lifelong.methods import ExperienceReplay

    print("\n[eval] continual evaluation of every seen task on 1,000 test samples, split MNIST (5 tasks)", flush=True)
    dm = SplitStream("mnist", root=root, download=False, seed=0, scenario="class")
    dm.prepare_data()
    dm.setup("fit")
    methods: dict[str, Callable[[], L.Callback]] = {
        "ER, memory 2,000": lambda: ExperienceReplay(buffer_size=2000),  # the stability gap's setting
        "fine-tuning": Finetune,  # the cheapest training step there is: the evaluation's largest share
    }
    spent: dict[tuple[str, int], float] = {}

    def fit(name: str, every: int | None) -> float:
        torch.manual_seed(0)
        module = ContinualClassifier.for_stream(MLP(dm.input_shape, dm.num_classes), torch.optim.Adam, dm)
        curve = [ContinualEvaluation(every, 1000)] if every else []
        factory = functools.partial(L.Trainer, accelerator=accelerator(), devices=1, enable_model_summary=False)
        with tempfile.TemporaryDirectory() as tmp:
            callbacks = [methods[name](), *curve]
            trainer, _ = stream_trainer(dm, tmp, trainer=factory, callbacks=callbacks, progress_bar=False)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sync()
                t0 = time.perf_counter()
                trainer.fit(module, datamodule=dm)
                sync()
                seconds = time.perf_counter() - t0
        if every:
            spent[name, every] = min(spent.get((name, every), math.inf), curve[0].eval_time_s)
        return seconds

    steps = sum(len(dm.loader(dm.train_data(t), train=True)) for t in range(dm.num_tasks))
    for name in methods:
        res = timed({str(e): functools.partial(fit, name, e) for e in (None, 10, 1)}, repeats)
        row("eval", f"{name}: fit of the stream ({steps} steps), task-end evaluation only", fmt(res["None"]))
        for every, target in ((10, "< 30 %" if name.startswith("ER") else ""), (1, "")):
            added = res[str(every)][0] / res["None"][0] - 1
            row("eval", f"{name}: 1,000 a seen task every {every} step{'s' * (every != 1)}", fmt(res[str(every)]))
            row(
                "eval",
                f"{name}, every {every}: added to the fit (its own evaluation time)",
                f"{100 * added:+.1f} % ({100 * spent[name, every] / res['None'][0]:.1f} %)",
                target,
            )


# ---- a replay memory in checkpoints --------------------------------------------------------------------
def section_memory(root: str | None, repeats: int, size: int = 5120) -> None:
    print(f"\n[memory] a checkpoint with a replay memory of {size} samples (DER++) against one without", flush=True)
    dm = _stream(root)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            "finetune": _fit(dm, [Finetune()], Path(tmp, "ft")),
            "derpp": _fit(dm, [DarkExperienceReplay(buffer_size=size, alpha=0.5, beta=1.0)], Path(tmp, "der")),
        }
        method = next(cb for cb in trainers["derpp"].callbacks if isinstance(cb, DarkExperienceReplay))
        assert len(method.buffer) == size, f"the memory holds {len(method.buffer)} samples, not {size}"
        paths = {name: Path(tmp, f"{name}.ckpt") for name in trainers}
        saves = 10  # a save takes milliseconds: time ten in a row

        def save(name: str) -> float:
            t0 = time.perf_counter()
            for _ in range(saves):
                trainers[name].save_checkpoint(paths[name])
            return (time.perf_counter() - t0) / saves

        res = timed({name: functools.partial(save, name) for name in trainers}, repeats)
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    images = size * dm.train_data(0).images[0].numel() * 4  # float32 images, had the memory held them
    row(
        "memory",
        "checkpoint without a memory (fine-tuning): size, save",
        f"{sizes['finetune'] / 2**20:.2f} MiB, " + fmt(res["finetune"]),
    )
    row(
        "memory",
        f"checkpoint with {size} samples (DER++): size, save",
        f"{sizes['derpp'] / 2**20:.2f} MiB, " + fmt(res["derpp"]),
    )
    row("memory", "what the memory adds to the checkpoint", f"{(sizes['derpp'] - sizes['finetune']) / 2**10:.0f} KiB")
    row("memory", f"the same {size} images as float32 tensors", f"{images / 2**20:.1f} MiB")
    added, ratio = res["derpp"][0] - res["finetune"][0], res["derpp"][0] / res["finetune"][0]
    row("memory", "what the memory adds to a save", f"{1e3 * added:+.1f} ms ({ratio:.2f}x)", "< 10 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections", nargs="+", default=["train", "fisher", "tasks", "e2e", "memory", "dwa", "eval", "kfac"]
    )
    parser.add_argument("--data-root", default=os.environ.get("LIFELONG_DATA_DIR") or None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--e2e-tasks", type=int, default=10)
    parser.add_argument("--cnn-images", type=int, default=5000)
    parser.add_argument(
        "--device", default="cpu", help="cpu, or cuda (the sections train, fisher, tasks, dwa, eval and kfac)"
    )
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--pipeline-baseline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dwa-step", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    on_cpu_only = sorted(set(args.sections) & {"e2e", "memory"})
    if DEVICE.type != "cpu" and on_cpu_only and not (args.dwa_step or args.pipeline_baseline):
        parser.error(f"--device {args.device}: the sections {on_cpu_only} measure the CPU path only; leave them out")
    if args.dwa_step:
        print(json.dumps(dwa_step(*args.dwa_step, steps=10)))
        return
    if args.pipeline_baseline:
        pipeline_baseline(args.pipeline_baseline, args.data_root, args.out)
        return
    print(
        f"lifelong benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), lightning {L.__version__}, "
        f"cuda {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}; measured on {DEVICE}"
    )
    if "train" in args.sections:
        section_train(args.data_root, args.repeats)
    if "fisher" in args.sections:
        section_fisher(args.data_root, args.repeats, args.cnn_images)
    if "tasks" in args.sections:
        section_tasks(args.repeats)
    if "e2e" in args.sections:
        section_e2e(args.data_root, args.e2e_tasks)
    if "memory" in args.sections:
        section_memory(args.data_root, args.repeats)
    if "dwa" in args.sections:
        section_dwa(args.repeats)
    if "eval" in args.sections:
        section_eval(args.data_root, args.repeats)
    if "kfac" in args.sections:
        section_kfac(args.data_root, args.repeats, args.cnn_images)
    print("\n| section | measure | value | target |\n| --- | --- | --- | --- |")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
