"""DER, DER++, A-GEM and iCaRL: their mathematics on tiny tensors, their memories, and on real split MNIST."""

from __future__ import annotations

import pytest
import torch

from lifelong.methods import AGEM, DarkExperienceReplay, ICaRL, ReplayBuffer
from lifelong.methods.agem import project
from lifelong.methods.der import der_loss
from lifelong.methods.icarl import features, herding, nme_scores
from lifelong.models import MLP
from tests.conftest import compose_run, load_checkpoint


# ---- DER ------------------------------------------------------------------------------------------------
def test_der_loss_averages_over_the_batch_and_the_logits():
    outputs = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    stored = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    # squared errors 0, 4, 0 and 1, 1, 1: sum 7 over 2 samples x 3 logits; the paper's sum form would be 7 / 2
    torch.testing.assert_close(der_loss(outputs, stored, 0.5), torch.tensor(0.5 * 7 / 6))
    assert der_loss(stored, stored, 10.0) == 0


def test_reservoir_keeps_each_samples_values_with_it():
    buffer = ReplayBuffer(20, "reservoir")
    g = torch.Generator().manual_seed(0)
    for start in range(0, 100, 7):  # uneven batches, like a stream's last one
        rows = torch.arange(start, min(start + 7, 100))
        logits = torch.stack([rows.float(), -rows.float()], dim=1)
        buffer.add(rows, rows % 3, rows % 2, g, logits=logits)
    assert len(buffer) == 20 and buffer.seen == 100 and buffer.rows.unique().numel() == 20
    torch.testing.assert_close(buffer.fields["logits"][:, 0], buffer.rows.float())
    torch.testing.assert_close(buffer.fields["logits"][:, 1], -buffer.rows.float())
    assert torch.equal(buffer.tasks, buffer.rows % 3)
    state = buffer.state_dict()
    again = ReplayBuffer(20)
    again.load_state_dict(state)
    assert all(torch.equal(again.fields[k], buffer.fields[k]) for k in buffer.fields) and again.seen == 100
    pick = buffer.sample(50, torch.Generator().manual_seed(1))
    assert sorted(pick.tolist()) == list(range(20))  # without replacement: all of it when it holds fewer


def test_append_fills_quotas_and_never_replaces():
    buffer = ReplayBuffer(5)
    buffer.append(torch.arange(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    buffer.append(torch.arange(10, 14), torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    assert buffer.rows.tolist() == [0, 1, 2, 10, 11]


# ---- A-GEM ----------------------------------------------------------------------------------------------
def test_agem_projection_by_hand():
    ref = torch.tensor([1.0, 0.0, 0.0])
    conflicting = torch.tensor([-2.0, 1.0, 3.0])
    projected = project(conflicting, ref)
    torch.testing.assert_close(projected, torch.tensor([0.0, 1.0, 3.0]))  # its component along ref removed
    assert projected @ ref >= 0
    agreeing = torch.tensor([2.0, -1.0, 0.5])
    assert torch.equal(project(agreeing, ref), agreeing)  # no conflict: unchanged
    orthogonal = torch.tensor([0.0, 5.0, 0.0])
    assert torch.equal(project(orthogonal, ref), orthogonal)
    for seed in range(20):  # and in general: never against the reference
        g, r = torch.randn(2, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert project(g, r) @ r >= -1e-12
    assert torch.equal(project(agreeing, torch.zeros(3)), agreeing)  # an empty memory's zero gradient


# ---- iCaRL ----------------------------------------------------------------------------------------------
def test_herding_picks_the_greedy_means_of_a_small_set():
    feats = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # mean 3.25
    # 1st: 2 (|2 - 3.25| = 1.25); 2nd: mean of {2, x} nearest 3.25 -> x = 1 (1.5) beats 0 (1) and 10 (6);
    # 3rd: mean of {2, 1, x} -> x = 10 (4.33) beats 0 (1); then 0
    assert herding(feats, 4).tolist() == [2, 1, 3, 0]
    assert herding(feats, 2).tolist() == [2, 1]  # a prefix: the memory shrinks by keeping the first ones
    assert herding(feats, 9).tolist() == [2, 1, 3, 0]


def test_nearest_mean_of_exemplars_by_hand():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), float("nan")]])  # class 2: no exemplars yet
    feats = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    scores = nme_scores(feats, means)
    # squared distances: (0.04 + 0.36, 0.64 + 0.16) and (0.16 + 0.64, 0.36 + 0.04)
    torch.testing.assert_close(scores[:, :2], -torch.tensor([[0.4, 0.8], [0.8, 0.4]]))
    assert scores.argmax(1).tolist() == [0, 1] and (scores[:, 2] == torch.finfo(scores.dtype).min).all()


def test_features_are_the_normalised_inputs_of_the_last_layer():
    net = MLP((1, 2, 2), 3, hidden_sizes=[5])
    x = torch.randn(4, 1, 2, 2)
    hidden = net.layers[:-1](x)
    torch.testing.assert_close(features(net, x), hidden / hidden.norm(dim=1, keepdim=True))


def test_refuses_impossible_values(mnist_root, tmp_path, capsys):
    for make, match in (
        (lambda: DarkExperienceReplay(alpha=-1), "alpha"),
        (lambda: DarkExperienceReplay(replay_batch_size=0), "replay_batch_size"),
        (lambda: AGEM(buffer_size=0), "size"),
        (lambda: ICaRL(buffer_size=0), "size"),
    ):
        with pytest.raises(ValueError, match=match):
            make()
    base = [f"dataset.root={mnist_root}", "logger=none", "dataset.max_train_samples=100", "dataset.max_test_samples=50"]
    for args, message in (
        (["method=icarl", "dataset.scenario=domain"], "the domain scenario has no new classes"),
        (["method=agem", "method.buffer_size=3"], "buffer_size=3 gives no memory to each of 5 tasks"),
    ):
        with pytest.raises(SystemExit):
            compose_run([*args, "dataset=split_mnist", *base], tmp_path / args[0])
        assert message in capsys.readouterr().err


# ---- on real split MNIST ----------------------------------------------------------------------------------
SEQ_MNIST = ["experiment=der2020_seq_mnist", "dataset.max_train_samples=4000", "dataset.max_test_samples=1000"]


@pytest.mark.integration
def test_class_scenario_derpp_above_er_above_finetuning(mnist_root, tmp_path):
    """Buzzega et al.'s Seq-MNIST protocol on a third of the data: DER++ > ER > fine-tuning (class scenario)."""
    runs = {
        "finetune": ["method=finetune"],
        "er": ["method=er", "method.buffer_size=200", "method.replay_batch_size=10"],
        "derpp": ["method=derpp", "method.buffer_size=200", "method.alpha=0.2", "method.beta=1.0"],
        "icarl": ["method=icarl", "method.buffer_size=200", "optimizer.lr=0.1"],
        "agem": ["method=agem", "method.buffer_size=200", "method.replay_batch_size=128", "optimizer.lr=0.1"],
    }
    acc = {}
    for name, args in runs.items():
        m = compose_run([*SEQ_MNIST, *args, f"dataset.root={mnist_root}", "logger=none"], tmp_path / name)
        assert m["scenario"] == "class" and m["num_tasks"] == 5
        acc[name] = m["avg_accuracy"]
    assert acc["finetune"] < 0.25, acc  # one task's worth: the last task's two digits
    assert acc["derpp"] > acc["er"] + 0.01 and acc["er"] > acc["finetune"] + 0.3, acc
    assert acc["icarl"] > acc["finetune"] + 0.3 and acc["agem"] > acc["finetune"] + 0.05, acc
    ckpt = load_checkpoint(tmp_path / "icarl" / "checkpoints" / "task_5.ckpt")
    (state,) = [v for k, v in ckpt["callbacks"].items() if "ICaRL" in k]
    assert torch.bincount(state["buffer"]["classes"]).tolist() == [20] * 10  # 200 exemplars, 20 a class
