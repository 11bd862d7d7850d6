"""Task-free methods: ER-ACE's asymmetric loss, GDumb's greedy memory and training, the quadratic family's triggers;
each with boundaries=hidden on real data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lifelong.data.tensors import Batch
from lifelong.methods import ERACE, GDumb
from lifelong.methods.trigger import ConsolidationTrigger
from tests.conftest import QUIET, load_checkpoint, read_metrics, run_and_resume, run_train


def test_er_ace_masks_the_classes_neither_present_nor_unseen():
    method = ERACE(buffer_size=10)
    method._seen = torch.tensor([True, True, True, True, False, False])  # classes 0-3 seen before this batch
    logits = torch.randn(4, 6, requires_grad=True)
    batch = Batch(torch.zeros(4, 1), torch.tensor([2, 3, 3, 2]), torch.zeros(4, dtype=torch.long))
    module = SimpleNamespace(heads=lambda out, task: out)
    loss = method.classification_loss(module, batch, logits)  # type: ignore[arg-type]
    # present {2, 3}; from the highest seen class (3) on: {3, 4, 5}; so 0 and 1 are out
    allowed = [2, 3, 4, 5]
    expected = F.cross_entropy(logits[:, allowed], torch.tensor([0, 1, 1, 0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[:, :2] == 0).all() and (grad[:, 2:] != 0).all()  # no gradient pushes the absent old classes down


def test_gdumb_memory_is_the_greedy_class_balanced_sampler():
    method = GDumb(buffer_size=4)
    method._rng = __import__("random").Random(0)
    for row, cls in enumerate([0, 0, 0, 0, 1, 1, 1]):
        method._offer(row, 0, cls)
    # full with four 0s; then each 1 under k/|classes seen| = 2 replaces a 0, the third 1 is turned away
    assert sorted(method.classes) == [0, 0, 1, 1] and {4, 5} <= set(method.rows)
    for row, cls in enumerate([2] * 5, start=10):
        method._offer(row, 0, cls)
    counts = {c: method.classes.count(c) for c in set(method.classes)}
    assert len(method.rows) == 4 and counts[2] == 2 and sorted(counts.values()) == [1, 1, 2]  # 4/3: class 2 takes 2


def test_the_every_trigger_and_the_plateau_trigger_by_hand():
    trainer = SimpleNamespace(global_step=0, world_size=1)
    rows, tasks = torch.arange(4), torch.zeros(4, dtype=torch.long)
    every = ConsolidationTrigger("every", every=3, recent_samples=6)
    fired = []
    for step in range(1, 8):
        trainer.global_step = step
        if every.observe(trainer, rows + 4 * step, tasks, torch.tensor(1.0)):  # type: ignore[arg-type]
            fired.append(step)
    assert fired == [3, 6]
    assert every._filled == 6 and sorted(every._rows.tolist()) == [26, 27, 28, 29, 30, 31]  # the last 6 samples
    # plateau: observations of 2 steps, a window of 3; high losses (a peak), then low and flat ones
    plateau = ConsolidationTrigger("plateau", plateau_steps=2, plateau_window=3, plateau_mean=0.2, plateau_var=0.01)
    losses = [2.0, 2.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5]
    losses += [0.05] * 6
    why = []
    for step, loss in enumerate(losses, start=1):
        trainer.global_step = step
        reason = plateau.observe(trainer, rows, tasks, torch.tensor(loss))  # type: ignore[arg-type]
        if reason:
            why.append((step, reason))
    # observations (2-step means) at steps 2, 4, ...: 2, 1, .1, .1, .1 (step 10: the first flat, low window),
    # .1, .1 (no new plateau without a peak), 1.5, 1.5, 1.5 (the peak), .05, .05, .05 (step 26: the second)
    assert [s for s, _ in why] == [10, 26] and why[0][1].startswith("plateau (window mean 0.1000")


def _common(mnist_root) -> list[str]:
    return [f"dataset.root={mnist_root}", "boundaries=hidden", "logger=none", *QUIET]


@pytest.mark.integration
def test_task_free_ewc_on_a_plateau_forgets_less_than_finetuning(tmp_path, mnist_root):
    """Permuted MNIST, no task event: EWC consolidating at each loss plateau keeps the first task, fine-tuning
    does not; its consolidations are logged and recorded in the checkpoint."""
    args = ["dataset=permuted_mnist", "dataset.num_tasks=2", *_common(mnist_root)]
    ewc = run_train([*args, "method=ewc", "method.consolidate=plateau"], tmp_path / "ewc")
    assert ewc.returncode == 0, ewc.stderr[-3000:]
    ft = run_train([*args, "method=finetune"], tmp_path / "ft")
    assert ft.returncode == 0, ft.stderr[-3000:]
    e, f = read_metrics(tmp_path / "ewc"), read_metrics(tmp_path / "ft")
    assert e["bwt"] > f["bwt"] + 0.03 and e["avg_accuracy"] > f["avg_accuracy"] + 0.01, (e["bwt"], f["bwt"])
    state = next(v for k, v in load_checkpoint(tmp_path / "ewc" / "checkpoints" / "last.ckpt")["callbacks"].items()
                 if k.startswith("EWC"))  # fmt: skip
    fired = state["trigger"]["fired"]
    assert fired and all(s["why"].startswith("plateau") for s in fired) and state["num_consolidated"] == len(fired)
    assert "ewc: consolidated at step" in (tmp_path / "ewc" / "train.log").read_text()


@pytest.mark.integration
@pytest.mark.parametrize(
    "method",
    [
        ["method=er_ace", "method.buffer_size=200"],
        ["method=gdumb", "method.buffer_size=200", "method.epochs=3", "model.norm=batch"],
        ["method=si", "method.consolidate=every", "method.consolidate_every=7"],
    ],
    ids=["er_ace", "gdumb", "si_every"],
)
def test_task_free_methods_run_online_without_boundaries_and_resume_exactly(tmp_path, mnist_root, method):
    args = [*method, "dataset=split_mnist", "dataset.num_tasks=3", "dataset.scenario=class", "class_outputs=all"]
    args += ["dataset.max_train_samples=400", "dataset.online=true", "dataset.batch_size=10", *_common(mnist_root)]
    a, b = run_and_resume(args, tmp_path)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    if method[0] != "method=si":  # replay-based: well above the third a class-incremental net keeps alone
        assert a["avg_accuracy"] > 0.5, a["avg_accuracy"]
    if method[0] == "method=gdumb":  # the stream trained nothing: GDumb's network is its memory's
        state = load_checkpoint(tmp_path / "full" / "checkpoints" / "task_3.ckpt")["callbacks"]
        gd = next(v for k, v in state.items() if k.startswith("GDumb"))
        counts = torch.bincount(gd["classes"])
        assert len(gd["rows"]) == 200 and counts.max() - counts[counts > 0].min() <= 1 and gd["trainings"] == 3


@pytest.mark.integration
@pytest.mark.parametrize(
    "method",
    [
        ["method=gdumb", "method.buffer_size=100", "method.epochs=2", "model.norm=batch"],
        ["method=ewc", "method.consolidate=every", "method.consolidate_every=1"],
    ],
    ids=["gdumb", "ewc_every"],
)
def test_task_free_methods_under_ddp(tmp_path, mnist_root, method):
    """Two gloo processes: GDumb's memory (every rank's samples) and network (rank 0's, broadcast) and the task-free
    EWC's consolidations (the recent samples of both ranks) go through the collectives and agree."""
    args = [*method, "dataset=split_mnist", "dataset.num_tasks=2", "dataset.scenario=class", "class_outputs=all"]
    args += ["dataset.max_train_samples=301", "trainer=ddp_cpu", *_common(mnist_root)]
    proc = run_train(args, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(tmp_path / "ddp")
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "task_2.ckpt")
    states = ckpt["callbacks"]
    if method[0] == "method=gdumb":
        gd = next(v for k, v in states.items() if k.startswith("GDumb"))
        assert len(gd["rows"]) == 100 and gd["trainings"] == 2 and m["avg_accuracy"] > 0.6
    else:
        ewc = next(v for k, v in states.items() if k.startswith("EWC"))
        steps = ckpt["global_step"]
        assert steps >= 4 and [f["step"] for f in ewc["trigger"]["fired"]] == list(range(1, steps + 1))
        assert ewc["num_consolidated"] == steps
