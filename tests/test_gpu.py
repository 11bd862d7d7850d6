"""On a CUDA GPU: the GPU run equals the CPU run, mixed precision keeps EWC's penalty exact, training steps make
no host sync, and data-parallel training runs on the GPUs there are.

Marked ``gpu``; skipped, with the reason, where no CUDA device is visible. ``make gpu-check`` runs them with the
benchmark and writes one report (docs/performance.md, "On a GPU"). The tolerances are stated where they are
used: a GPU sums in another order than a CPU, so the two runs agree to rounding, not bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import QUIET, compose_run, read_metrics, run_train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")
pytestmark = [pytest.mark.gpu, needs_cuda]

STREAM = ["dataset.num_tasks=3", "dataset.max_train_samples=10000", "dataset.max_test_samples=2000", "logger=none"]
ENTRY_TOLERANCE = 0.01  # GPU against CPU: each accuracy within 1 point (rounding differences, not a bug's size)


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, mnist_root) -> dict:
    """EWC on permuted MNIST on one GPU, full precision."""
    return compose_run([f"dataset.root={mnist_root}", *STREAM, "trainer=gpu"], tmp_path_factory.mktemp("gpu"))


def test_the_gpu_run_equals_the_cpu_run(gpu_run, tmp_path, mnist_root):
    cpu = compose_run([f"dataset.root={mnist_root}", *STREAM, "trainer=cpu"], tmp_path / "cpu")
    difference = _max_difference(gpu_run["accuracy_matrix"], cpu["accuracy_matrix"])
    print(f"GPU against CPU: largest accuracy difference {100 * difference:.2f} points")
    assert difference <= ENTRY_TOLERANCE, (gpu_run["accuracy_matrix"], cpu["accuracy_matrix"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_the_ewc_penalty_exact(precision, gpu_run, tmp_path, mnist_root, monkeypatch):
    """Under autocast (and 16-mixed's loss scaling) EWC adds exactly ``lambda F (theta - theta*)`` to gradients
    that are already unscaled: each added term is checked in float64, and the gradient it is added to against
    the same batch's float32 gradient (a scaled one would be 2^16 times larger)."""
    from lifelong.methods import EWC
    from lifelong.models import ContinualClassifier

    seen: dict[str, list[float]] = {"penalty": [], "scale": []}
    batches: list[tuple[torch.Tensor, ...]] = []
    step, add = ContinualClassifier.training_step, EWC.add_penalty_grad

    def keep_batch(self, batch, batch_idx):
        batches[:] = [batch]
        return step(self, batch, batch_idx)

    def checked_add(self, pl_module, scale=1.0):
        if not self._num_consolidated or len(seen["penalty"]) >= 5:
            return add(self, pl_module, scale)
        named = {n: p for n, p in pl_module.named_parameters() if n in self._anchor}
        before = {n: p.grad.detach().double().clone() for n, p in named.items()}
        x, y, task = batches[0][:3]
        with torch.autocast("cuda", enabled=False):
            loss = F.cross_entropy(pl_module.heads(pl_module.outputs(x.float(), task), task), y)
            exact = torch.autograd.grad(loss, list(named.values()))
        got, want = torch.cat([g.flatten() for g in before.values()]), torch.cat([g.double().flatten() for g in exact])
        if not torch.isfinite(got).all():  # 16-mixed: an overflowing step, which the scaler skips
            return add(self, pl_module, scale)
        seen["scale"].append((got.norm() / want.norm()).item())
        add(self, pl_module, scale)
        for n, p in named.items():
            term = 2 * self.coefficient * scale * self._importance[n].double()
            term = term * (p.detach().double() - self._anchor[n].double())
            added = p.grad.detach().double() - before[n]
            seen["penalty"].append(((added - term).norm() / term.norm().clamp_min(1e-30)).item())
        return None

    monkeypatch.setattr(ContinualClassifier, "training_step", keep_batch)
    monkeypatch.setattr(EWC, "add_penalty_grad", checked_add)
    run = compose_run(
        [f"dataset.root={mnist_root}", *STREAM, "trainer=gpu", f"+trainer.precision={precision}"], tmp_path / "run"
    )
    assert seen["penalty"], "EWC added no penalty"
    assert max(seen["penalty"]) < 1e-5, seen["penalty"]  # float32 arithmetic of a float64 formula
    assert all(0.8 < s < 1.25 for s in seen["scale"]), seen["scale"]  # unscaled (half-precision forward: ~1)
    gap = abs(run["avg_accuracy"] - gpu_run["avg_accuracy"])
    print(
        f"{precision}: average accuracy {100 * run['avg_accuracy']:.2f} % (full precision: "
        f"{100 * gpu_run['avg_accuracy']:.2f} %); penalty error {max(seen['penalty']):.1e}"
    )
    assert gap < 0.03  # the same training to within half precision's rounding


@pytest.mark.parametrize("structure", ["diagonal", "kfac"])
def test_training_steps_make_no_host_sync(tmp_path, mnist_root, monkeypatch, structure):
    """From the first batch to the task's last, no step waits for the GPU: torch raises on any synchronising
    call (an ``.item()``, a copy to the host, a ``nonzero``). Steps that log do sync, so none logs here. With the
    diagonal Fisher's penalty and with the Kronecker factors' (``method.fisher_structure=kfac``)."""
    from lifelong.models import ContinualClassifier

    start, end = ContinualClassifier.on_train_batch_start, ContinualClassifier.on_train_batch_end
    steps: list[int] = []

    def watch(self, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("error")
        steps.append(batch_idx)
        return start(self, batch, batch_idx)

    def stop_at_the_last(self, outputs, batch, batch_idx):
        result = end(self, outputs, batch, batch_idx)
        if batch_idx == self.trainer.num_training_batches - 1:
            torch.cuda.set_sync_debug_mode("default")  # the task's evaluation and checkpoint follow
        return result

    monkeypatch.setattr(ContinualClassifier, "on_train_batch_start", watch)
    monkeypatch.setattr(ContinualClassifier, "on_train_batch_end", stop_at_the_last)
    try:
        compose_run(
            [
                f"dataset.root={mnist_root}",
                *STREAM,
                "trainer=gpu",
                "trainer.log_every_n_steps=100000",
                f"method.fisher_structure={structure}",
            ],
            tmp_path / "run",
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(steps) > 100


def test_data_parallel_on_the_gpus(gpu_run, tmp_path, mnist_root):
    """``trainer=ddp`` on every GPU of the machine, launched by train.py as a user would."""
    proc = run_train([f"dataset.root={mnist_root}", *STREAM, *QUIET, "trainer=ddp"], tmp_path / "run", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    difference = _max_difference(metrics["accuracy_matrix"], gpu_run["accuracy_matrix"])
    print(
        f"DDP on {torch.cuda.device_count()} GPU(s) against one GPU: largest difference {100 * difference:.2f} points"
    )
    # one GPU: the same steps; several: each rank takes a shard, an equivalent but not identical schedule
    assert difference <= (ENTRY_TOLERANCE if torch.cuda.device_count() == 1 else 0.05)
