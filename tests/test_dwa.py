"""DWA (dynamic weight allocation): its layers, losses and complexity score against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lifelong.data import SplitStream
from lifelong.data.complexity import disk_offsets, entropy_complexity, local_entropy
from lifelong.data.tensors import Batch
from lifelong.methods import DWA, DWANet, fisher_sums, per_sample_loop_fisher
from lifelong.methods.dwa import MaskedConv2d, MaskedLinear, factor_pair, triplet
from lifelong.models import CNN, MLP, AlexNet, ReducedResNet18
from tests.conftest import compose_run, load_checkpoint


def _net(model: nn.Module, shape: tuple[int, ...], **kwargs) -> DWANet:
    torch.manual_seed(0)
    return DWANet(model, shape, **kwargs)


# ---- the network -----------------------------------------------------------------------------------------
def test_masked_linear_is_the_per_sample_product():
    net = _net(MLP((1, 4, 4), 5, hidden_sizes=[12, 6]), (1, 4, 4), emb_size=7)
    (layer,) = net.masked
    assert isinstance(layer, MaskedLinear) and layer.weight.shape == (6, 12)
    x = torch.randn(5, 1, 4, 4)
    inputs = []
    layer.register_forward_hook(lambda m, i, o: inputs.append((i[0], o)))
    net.eval()
    net(x)
    a, out = inputs[0]
    masks = layer.mask(net.embedding)
    expected = torch.stack([F.linear(a[b], layer.weight * masks[b], layer.bias) for b in range(5)])
    torch.testing.assert_close(out, expected)
    # the dense mask is the gated outer product of the two generated factors
    f1, f2 = factor_pair(72)
    assert (f1, f2) == (9, 8) and layer.factors_shape == (9, 8)  # f1: the largest divisor <= sqrt(72) + 1
    u, v = layer.gen1(net.embedding), layer.gen2(net.embedding)  # (B, f1), (B, f2)
    for b in range(5):
        torch.testing.assert_close(masks[b], torch.tanh(torch.outer(v[b], u[b]).reshape(6, 12)))
    assert factor_pair(400 * 400) == (400, 400) and factor_pair(13) == (1, 13)


@pytest.mark.parametrize("chunk", [2**24, 300])  # one pass, and chunks of 2 samples under checkpointing
def test_masked_conv_is_the_per_sample_convolution(chunk):
    net = _net(CNN((1, 12, 12), 4, channels=[3, 5], hidden_size=8), (1, 12, 12), chunk_elements=chunk)
    conv, dense = net.masked
    assert isinstance(conv, MaskedConv2d) and isinstance(dense, MaskedLinear)
    x = torch.randn(5, 1, 12, 12)
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    net.train()
    logits = net(x)
    a, out = seen[0]
    masks = conv.mask(net.embedding)
    expected = torch.cat(
        [F.conv2d(a[b : b + 1], conv.weight * masks[b], conv.bias, padding=conv.padding) for b in range(5)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # gradients flow to the weights, the generators and the processor, also through checkpointed chunks
    (logits.sum() + sum(a.sum() for a in net.context.activity)).backward()
    for p in (conv.weight, conv.gen.weight, dense.gen1.weight, net.processor.layers[1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_factored_masks_are_the_per_sample_product_without_forming_it(model):
    """``mask_form=factored``: ``(W * a c^T) x = a * (W (c * x))``; its loss terms from the two gates alone."""
    if model == "mlp":
        net = _net(MLP((1, 4, 4), 5, hidden_sizes=[12, 6]), (1, 4, 4), emb_size=7, mask_form="factored")
        x = torch.randn(5, 1, 4, 4)
    else:
        net = _net(CNN((1, 12, 12), 4, channels=[3, 5], hidden_size=8), (1, 12, 12), mask_form="factored")
        x = torch.randn(5, 1, 12, 12)
    layer = net.masked[0]
    layer.importance = torch.rand_like(layer.weight)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    net.train()
    net(x)
    a, out = seen[0]
    masks = layer.mask(net.embedding)
    assert masks.shape == (5, *layer.weight.shape) and masks.min() >= -1
    torch.testing.assert_close(out, layer.masked_call(a, layer.weight * masks), rtol=1e-5, atol=1e-5)
    flat = masks.flatten(1)
    torch.testing.assert_close(net.context.attention[0], flat.abs() @ layer.importance.flatten(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.context.activity[0], flat.relu().mean(1), rtol=1e-5, atol=1e-6)


def test_task_context_gives_each_task_its_own_masks_and_gradients():
    """``context=task``: a sample's processor and generators are its task's; the others get zero gradients."""
    net = _net(MLP((1, 4, 4), 5, hidden_sizes=[12, 6]), (1, 4, 4), emb_size=7, context="task", num_tasks=3)
    net.train()
    x, task = torch.randn(4, 1, 4, 4), torch.tensor([0, 2, 0, 2])
    net(x, task).sum().backward()
    (layer,) = net.masked
    for copies in (net.processor.copies, layer.gen1.copies):
        grads = [sum(p.grad.abs().sum() for p in c.parameters()) for c in copies]
        assert grads[0] > 0 and grads[1] == 0 and grads[2] > 0
    with torch.no_grad():  # sample 0 alone with task 0: the same as in the mixed batch
        alone = net.masks(x[:1], torch.tensor([0]))[0]
        mixed = net.masks(x, task)[0]
    torch.testing.assert_close(alone[0], mixed[0])
    assert not torch.allclose(net.masks(x[:1], torch.tensor([1]))[0], alone)


def test_stem_processor_and_refusals():
    alex = _net(AlexNet((3, 32, 32), 10), (3, 32, 32))
    # stem: the first conv; masked: the other two convs and both dense layers; the output is not masked
    assert alex.masked_names == ["features.4", "features.8", "classifier.0", "classifier.3"]
    assert [type(m).__name__ for m in alex.masked] == ["MaskedConv2d", "MaskedConv2d", "MaskedLinear", "MaskedLinear"]
    assert isinstance(alex.processor.layers[0], nn.MaxPool2d)  # the stem's 14 x 14 map is pooled first
    assert alex(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    names = {n for n, _ in alex.named_parameters()}
    assert "net.features.4.weight" in names and "net.features.4.gen.weight" in names  # names kept
    with pytest.raises(ValueError, match="stem_layers"):
        DWANet(MLP((1, 4, 4), 3, hidden_sizes=[5]), (1, 4, 4), stem_layers=1)  # nothing left to mask
    with pytest.raises(ValueError, match="normalisation"):
        DWANet(ReducedResNet18((3, 32, 32), 10), (3, 32, 32))
    with pytest.raises(ValueError, match="gate"):
        DWA(gate="relu")
    with pytest.raises(ValueError, match="lambda_sparsity"):
        DWA(lambda_sparsity=-1)


def test_dwa_refuses_other_scenarios(mnist_root):
    dm = SplitStream("mnist", root=str(mnist_root), scenario="class")
    with pytest.raises(ValueError, match=r"dataset\.scenario=task"):
        DWA().configure_network(MLP((1, 28, 28), 10), dm)


def test_masked_fisher_matches_the_per_sample_loop():
    """The engine's fast rule for masked layers (plain per-sample gradient times the sample's mask) is exact."""
    torch.manual_seed(1)
    net = _net(CNN((1, 8, 8), 3, channels=[2, 3], hidden_size=5), (1, 8, 8), chunk_elements=100)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    batches = [(x, y, torch.zeros(6, dtype=torch.long))]
    params = {n: p for n, p in net.named_parameters() if not n.startswith(("processor", "net.features.0"))}
    params = {n: p for n, p in params.items() if ".gen" not in n}
    fast = fisher_sums(net, batches, "empirical", params=params)
    assert set(fast.fast) == set(params) and not fast.fallback
    ref = per_sample_loop_fisher(net, batches, "empirical", params=params)
    for name in params:
        torch.testing.assert_close(fast.sums[name], ref.sums[name], rtol=1e-4, atol=1e-8)


# ---- the losses --------------------------------------------------------------------------------------------
def test_triplet_and_mask_losses_by_hand():
    e = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    pos, neg = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # sample 0: |e-p|^2 = 1, |e-n|^2 = 4 -> [1 - 4 + 1.5]_+ = 0; sample 1: 1 - 2 + 1.5 = 0.5
    torch.testing.assert_close(triplet(e, pos, neg, 1.5), torch.tensor([0.0, 0.5]))

    net = _net(MLP((1, 2, 2), 3, hidden_sizes=[4, 3]), (1, 2, 2), emb_size=5)
    (layer,) = net.masked
    fisher = torch.rand(3, 4)
    layer.importance = fisher
    net.train()
    net(torch.randn(4, 1, 2, 2))
    masks = layer.mask(net.embedding)  # (4, 3, 4)
    (attention,), (activity,) = net.context.attention, net.context.activity
    torch.testing.assert_close(attention, (masks.abs() * fisher).sum((1, 2)))  # sum_i F_i |M_b,i|
    torch.testing.assert_close(activity, masks.clamp_min(0).mean((1, 2)))  # the soft active fraction

    dwa = DWA(lambda_emb=2.0, lambda_attention=3.0, lambda_sparsity=5.0, sparsity_target=0.01, margin=1.0)
    dwa.anchors = {"pos": torch.zeros(5), "neg": torch.ones(5), "task_neg": -torch.ones(5)}
    holder = nn.Module()
    holder.net, holder.current_task, holder.trainer = net, 1, _Trainer()
    got = dwa.penalty(holder, Batch(torch.zeros(4, 1, 2, 2), None, None), None)
    emb = net.embedding
    emb_term = (triplet(emb, *[dwa.anchors[k] for k in ("pos", "neg")], 1.0)) + triplet(
        emb, dwa.anchors["pos"], dwa.anchors["task_neg"], 1.0
    )
    expected = 2.0 * emb_term.mean() + 3.0 * attention.mean() + 5.0 * (activity - 0.01).clamp_min(0).mean()
    torch.testing.assert_close(got, expected)


def test_the_papers_dwa_is_a_named_option_with_every_value_the_papers():
    """conf/method/dwa_paper.yaml is ``DWA(**PAPER_OPTIONS)``; method=dwa is the class's defaults."""
    import inspect
    from pathlib import Path

    import yaml

    from lifelong.methods.dwa import PAPER_OPTIONS

    conf = Path(__file__).parents[1] / "conf" / "method"
    paper = yaml.safe_load((conf / "dwa_paper.yaml").read_text())
    assert paper.pop("_target_") == "lifelong.methods.DWA" and paper == PAPER_OPTIONS
    defaults = {k: v.default for k, v in inspect.signature(DWA).parameters.items()}
    ours = yaml.safe_load((conf / "dwa.yaml").read_text())
    ours.pop("_target_")
    assert ours == {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    assert set(PAPER_OPTIONS) == set(defaults)


def test_the_codes_sparsity_counts_the_inactive_fraction():
    """``sparsity=code``: the original code's default term, ``[mean_i (1 - |M_b,i|) - mu]_+`` per sample."""
    net = _net(MLP((1, 2, 2), 3, hidden_sizes=[4, 3]), (1, 2, 2), emb_size=5, sparsity="code")
    (layer,) = net.masked
    net.train()
    net(torch.randn(4, 1, 2, 2))
    masks = layer.mask(net.embedding)
    (activity,) = net.context.activity
    torch.testing.assert_close(activity, (1 - masks.abs()).mean((1, 2)))
    with pytest.raises(ValueError, match=r"method\.sparsity_target"):
        DWA(sparsity=0.2)  # the old meaning of sparsity=: the message names where mu went
    with pytest.raises(ValueError, match=r"one of \['paper', 'code'\]"):
        DWA(sparsity="binary")


class _Trainer:
    global_step = 0
    log_every_n_steps = 1000


# ---- the curriculum ----------------------------------------------------------------------------------------
def test_local_entropy_against_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 13, 11), generator=g, dtype=torch.uint8)
    images[1] = images[1] // 80 * 80  # few grey values: repeated counts
    images[1, :4] = 7
    ours = local_entropy(images)
    offsets = disk_offsets(5)
    assert len(offsets) == 81  # scikit-image's disk(5)
    for n in range(2):
        for y in range(13):
            for x in range(11):
                values = [
                    int(images[n, y + dy, x + dx])
                    for dy, dx in offsets
                    if 0 <= y + dy < 13 and 0 <= x + dx < 11  # only pixels inside the image count
                ]
                p = np.unique(values, return_counts=True)[1] / len(values)
                assert ours[n, y, x].item() == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-5)


def test_complexity_is_the_normalised_mean_squared_entropy():
    flat = torch.full((1, 1, 12, 12), 50, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1, 3, 12, 12), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    half = noise.clone()
    half[..., :6] = 0
    images = torch.cat([flat.expand(1, 3, 12, 12), noise, half])
    scores = entropy_complexity(images)
    assert scores[0] == 0 and scores[1] == 1 and 0 < scores[2] < 1  # the flat image is the simplest
    grey = images.float().mean(1).round().to(torch.uint8)
    raw = local_entropy(grey).square().mean((1, 2))
    torch.testing.assert_close(scores, (raw - raw.min()) / (raw.max() - raw.min()))


def test_curriculum_threshold_rises_linearly():
    dwa = DWA(curriculum_start=0.2, curriculum_epochs=100)
    assert [dwa.curriculum.threshold(e) for e in (0, 50, 100, 150)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


# ---- real runs --------------------------------------------------------------------------------------------
DWA_RUN = [
    "method=dwa_paper",
    "dataset=split_mnist",
    "dataset.num_tasks=3",
    "dataset.max_train_samples=400",
    "dataset.max_test_samples=200",
    "dataset.batch_size=64",
    "epochs_per_task=2",
    "method.curriculum_epochs=1",  # epoch 1 of a task: threshold 0.2, epoch 2: every sample
    "method.anchor_samples=64",
    "dataset.val_fraction=0",  # every one of the 400 samples trains (the curriculum counts them)
    "logger=none",
]


@pytest.mark.integration
def test_dwa_resumes_to_the_same_result(mnist_root, tmp_path):
    args = [*DWA_RUN, f"dataset.root={mnist_root}"]
    full = compose_run(args, tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "task_1.ckpt"
    state = next(v for k, v in load_checkpoint(ckpt)["callbacks"].items() if k.startswith("DWA"))
    assert len(state["task_anchors"]) == 1 and state["num_fishers"] == 1
    assert state["anchors"] == {}  # the first task trains without the triplet loss
    assert state["curriculum"]["threshold"] == 1.0 and state["curriculum"]["samples"] == 400
    resumed = compose_run([*args, f"ckpt_path={ckpt}"], tmp_path / "resumed")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    ends = [
        next(
            v for k, v in load_checkpoint(d / "checkpoints" / "task_2.ckpt")["callbacks"].items() if k.startswith("DWA")
        )
        for d in (tmp_path / "full", tmp_path / "resumed")
    ]
    assert set(ends[0]["anchors"]) == {"pos", "neg", "task_neg"}  # the second task: N_T is the first's anchor
    torch.testing.assert_close(ends[0]["anchors"]["task_neg"], ends[0]["task_anchors"][0])
    for a, b in zip(ends[0]["task_anchors"], ends[1]["task_anchors"], strict=True):
        torch.testing.assert_close(a, b)
    for name, f in ends[0]["fisher"].items():
        torch.testing.assert_close(f, ends[1]["fisher"][name])
    assert full["accuracy_matrix"][0][0] > 0.9


HELD_RUN = [
    "method=dwa",
    "dataset=split_mnist",
    "dataset.num_tasks=3",
    "dataset.max_train_samples=600",
    "dataset.max_test_samples=200",
    "dataset.batch_size=64",
    "epochs_per_task=1",
    "dataset.val_fraction=0",
    "logger=none",
]


@pytest.mark.integration
def test_held_dwa_keeps_every_finished_tasks_masks_and_resumes(mnist_root, tmp_path):
    """method=dwa (held masks): a finished task's masks do not move, nothing of it is lost that restoring a part
    would bring back, its accuracy stays; the state resumes exactly."""
    from scripts.dwa_diagnostics import diagnose

    args = [*HELD_RUN, f"dataset.root={mnist_root}"]
    full = compose_run(args, tmp_path / "full")
    report = diagnose(tmp_path / "full", samples=64, root=None)
    first = report["tasks"][0]
    for later in first["masks"][1:]:
        assert max(later["relative_change"]) == 0 and max(later["sign_flips"]) == 0
    assert first["accuracy_at_the_end"] >= first["accuracy_at_its_end"] - 0.02 > 0.9
    assert all(abs(acc - first["accuracy_at_the_end"]) < 0.01 for acc in first["swap"].values()), first["swap"]
    assert report["cosines"]["max_mask_cosine"] < 0.9  # the tasks' masks differ
    ckpt = tmp_path / "full" / "checkpoints" / "task_1.ckpt"
    state = next(v for k, v in load_checkpoint(ckpt)["callbacks"].items() if k.startswith("DWA"))
    assert state["held"]["finished"] == 1 and 0 < float(state["held"]["used"][0].mean()) < 1
    resumed = compose_run([*args, f"ckpt_path={ckpt}"], tmp_path / "resumed")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


@pytest.mark.integration
def test_finetune_with_frozen_layers_holds_them_after_the_first_task(mnist_root, tmp_path):
    """The control DWA must beat: fine-tuning whose first layer is held once the first task ends."""
    args = ["method=finetune", "method.freeze_layers=1", *HELD_RUN[1:], f"dataset.root={mnist_root}"]
    compose_run(args, tmp_path)
    first, last = (load_checkpoint(tmp_path / "checkpoints" / f"task_{k}.ckpt")["state_dict"] for k in (1, 3))
    assert torch.equal(first["net.layers.1.weight"], last["net.layers.1.weight"])
    assert not torch.equal(first["net.layers.3.weight"], last["net.layers.3.weight"])


@pytest.mark.integration
def test_dwa_trains_a_cnn(mnist_root, tmp_path):
    """model=cnn: the second conv and the hidden dense layer are masked (the dense one in chunks)."""
    m = compose_run(
        [
            "method=dwa_paper",
            "model=cnn",
            "model.channels=[8,16]",  # small, so the test is quick: the structure is what is tested
            "model.hidden_size=64",
            "epochs_per_task=2",
            "dataset=split_mnist",
            "dataset.num_tasks=2",
            "dataset.max_train_samples=256",
            "dataset.max_test_samples=100",
            "dataset.batch_size=32",
            f"dataset.root={mnist_root}",
            "method.curriculum=false",
            "method.anchor_samples=64",
            "logger=none",
        ],
        tmp_path,
    )
    assert m["accuracy_matrix"][0][0] > 0.9 and m["accuracy_matrix"][1][1] > 0.85, m["accuracy_matrix"]


def test_warmup_divides_the_learning_rate_at_every_task_start():
    from types import SimpleNamespace

    from lifelong.data import PermutedStream

    stream = PermutedStream(num_tasks=2, epochs_per_task=3)  # the clock only: no data is loaded
    dwa = DWA(warmup_epochs=2, warmup_divisor=100.0, curriculum=False, anchor_first_task=False)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    lrs = []
    for epoch in range(3):  # the first task: 2 warm-up epochs, then the full rate
        dwa.on_train_epoch_start(SimpleNamespace(datamodule=stream, current_epoch=epoch, optimizers=[opt]), None)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.005, 0.005, 0.5])
    resumed = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    resumed.load_state_dict(opt.state_dict())  # a resumed run keeps the base rate in the optimizer's state
    dwa.search_anchors = lambda *args: {}  # the second task would search anchors; not what is tested here
    dwa.on_train_epoch_start(SimpleNamespace(datamodule=stream, current_epoch=3, optimizers=[resumed]), None)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.005)  # the second task starts warm-up again
