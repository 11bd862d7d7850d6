"""The vectorised per-sample Fisher against a per-sample loop and a closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lifelong.methods.fisher import FISHER_TYPES, fisher_sums, per_sample_loop_fisher
from lifelong.models import CNN, MLP


@pytest.fixture(autouse=True)
def _float64():
    """Compare the maths, not float32 round-off (restored afterwards: the default dtype is global)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _batches(n: int, shape: tuple[int, ...], classes: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    t = torch.zeros(n, dtype=torch.long)
    return [(x[i : i + batch], y[i : i + batch], t[i : i + batch]) for i in range(0, n, batch)]


class Shared(nn.Module):
    """A layer used twice per forward pass, and a LayerNorm: both need the torch.func fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.twice = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.out(self.norm(h))


class Tokens(nn.Module):
    """A Linear applied over a token dimension: its per-sample gradient sums over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):  # (B, S, 4)
        return self.out(torch.relu(self.proj(x)).mean(1))


class Strided(nn.Module):
    """Convolutions with stride, dilation, asymmetric padding and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=(1, 0))
        self.c2 = nn.Conv2d(3, 4, 3, dilation=2, padding=2, bias=False)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


MODELS = {
    "mlp": (lambda: MLP((1, 3, 4), 5, hidden_sizes=(7, 6)), (1, 3, 4), 5),
    "cnn": (lambda: CNN((2, 8, 8), 4, channels=(3, 5), hidden_size=6), (2, 8, 8), 4),
    "shared+layernorm": (Shared, (6,), 3),
    "tokens": (Tokens, (5, 4), 3),
    "strided-conv": (Strided, (2, 9, 8), 3),
}


def _rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in b)


@pytest.mark.parametrize("fisher_type", FISHER_TYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_per_sample_loop(name: str, fisher_type: str):
    make, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = make()
    batches = _batches(23, shape, classes, batch=8)
    fast = fisher_sums(model, batches, fisher_type, generator=torch.Generator().manual_seed(1))
    loop = per_sample_loop_fisher(model, batches, fisher_type, generator=torch.Generator().manual_seed(1))
    assert fast.count == loop.count == 23
    assert set(fast.sums) == {n for n, _ in model.named_parameters()}
    assert _rel_err(fast.mean(), loop.mean()) < 1e-5
    assert all(v.abs().sum() > 0 for v in fast.sums.values())


def test_fast_rule_covers_linear_and_conv_fallback_the_rest():
    make, shape, classes = MODELS["cnn"]
    r = fisher_sums(make(), _batches(4, shape, classes, 4))
    assert r.fallback == []
    r = fisher_sums(Shared(), _batches(4, (6,), 3, 4))
    assert set(r.fallback) == {"twice.weight", "twice.bias", "norm.weight", "norm.bias"}
    assert "inp.weight" in r.fast and "out.weight" in r.fast


def test_exact_fisher_closed_form_for_logistic_regression():
    # For softmax regression logits = W x (no bias): E_y[(d log p_y / dW_ck)^2] = x_k^2 p_c (1 - p_c).
    torch.manual_seed(3)
    model = nn.Linear(5, 4, bias=False)
    batches = _batches(50, (5,), 4, batch=16)
    x = torch.cat([b[0] for b in batches])
    p = torch.softmax(model(x), -1).detach()
    expected = (p * (1 - p)).T @ x.square() / len(x)  # (C, K)
    got = fisher_sums(model, batches, "exact").mean()["weight"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_weighted_fisher_closed_form_for_logistic_regression():
    # Mammoth's estimator: p_y (d log p_y / dW_ck)^2 = p_y (1[c = y] - p_c)^2 x_k^2, averaged over the samples.
    torch.manual_seed(4)
    model = nn.Linear(5, 4, bias=False)
    batches = _batches(50, (5,), 4, batch=16)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    p = torch.softmax(model(x), -1).detach()
    p_y = p.gather(1, y[:, None])  # (N, 1)
    expected = (p_y * (nn.functional.one_hot(y, 4) - p).square()).T @ x.square() / len(x)
    got = fisher_sums(model, batches, "weighted").mean()["weight"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    empirical = fisher_sums(model, batches, "empirical").mean()["weight"]
    assert (got < empirical).all()  # every sample's term shrinks by its p_y < 1


def test_not_the_squared_batch_gradient():
    # The per-sample Fisher is not the square of the mini-batch mean gradient (a biased shortcut).
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    batches = _batches(64, (5,), 3, batch=64)
    x, y, _ = batches[0]
    loss = nn.functional.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, [model.weight])
    per_sample = fisher_sums(model, batches).mean()["weight"]
    assert per_sample.sum() > 10 * g.square().sum()


def test_restores_training_mode_and_leaves_no_grads():
    model = MLP((4,), 3, hidden_sizes=(5,), dropout=0.5)
    model.train()
    fisher_sums(model, _batches(8, (4,), 3, 4))
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_sampled_labels_follow_the_generator():
    model = MLP((4,), 3, hidden_sizes=(5,))
    b = _batches(40, (4,), 3, 10)
    a1 = fisher_sums(model, b, "sampled", generator=torch.Generator().manual_seed(5)).mean()
    a2 = fisher_sums(model, b, "sampled", generator=torch.Generator().manual_seed(5)).mean()
    a3 = fisher_sums(model, b, "sampled", generator=torch.Generator().manual_seed(6)).mean()
    assert _rel_err(a1, a2) == 0
    assert _rel_err(a1, a3) > 0


def test_rejects_unknown_type():
    with pytest.raises(ValueError, match="fisher_type"):
        fisher_sums(nn.Linear(2, 2), [], "diagonal")
